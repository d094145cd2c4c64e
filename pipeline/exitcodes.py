"""The exit codes of the SPEC, importable without loading torch."""

EXIT_OK = 0  # done; per-file errors within run.max_error_rate
EXIT_FAILED = 1  # infrastructure: out of memory, disk, model load
EXIT_USAGE = 2  # bad usage or config; nothing written
EXIT_LOCKED = 3  # another run holds the index lock
EXIT_TOO_MANY_ERRORS = 4  # done, but the per-file error rate exceeded run.max_error_rate
