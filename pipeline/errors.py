"""Exit codes of the SPEC and the failures the CLI turns into a one-line message (light to import: no torch)."""

from __future__ import annotations

EXIT_OK = 0  # done; per-file errors within run.max_error_rate
EXIT_FAILED = 1  # infrastructure: out of memory, disk, model load
EXIT_USAGE = 2  # bad usage or config; nothing written
EXIT_LOCKED = 3  # another run holds the index lock
EXIT_TOO_MANY_ERRORS = 4  # done, but the per-file error rate exceeded run.max_error_rate


class ConfigError(Exception):
    """A bad config: the message names the key and the problem (exit code 2)."""


class ModelLoadError(Exception):
    """The model could not be loaded; the message says how to point at a local copy (exit code 1)."""


class DecodeError(Exception):
    """A file that cannot become pixels; the message is the reason stored in images_errors."""
