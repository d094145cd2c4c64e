"""Runners: the local orchestrator, the Ray driver and its stages, and the remote-encoder stream."""
