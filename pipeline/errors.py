"""Failures the CLI turns into a one-line message and an exit code (light to import: no torch)."""

from __future__ import annotations


class ModelLoadError(Exception):
    """The model could not be loaded; the message says how to point at a local copy."""
