"""The test suite: one folder per package of pipeline/, end-to-end tests through the CLI at the top."""
