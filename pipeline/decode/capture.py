"""Decoder chatter kept per file: a decode process's fd 2 (libtiff, warnings) goes to a buffer read after each file."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

# Bytes of one file's chatter kept: a broken TIFF can say a line per scanline; the first lines say why.
MAX_SAID = 4096

_saved_fd: int | None = None  # the real stderr, while this process's fd 2 points at the buffer


def _flush() -> None:
    if sys.stderr is not None:  # None where the process started without fd 2
        sys.stderr.flush()


def install() -> None:
    """Point this process's fd 2 at an anonymous file. C libraries (libtiff's error handler) write to fd 2
    directly, so redirecting Python's sys.stderr alone would not do; a cron run's mail got ~480 such lines."""
    global _saved_fd
    if _saved_fd is not None:
        return
    _flush()
    try:
        _saved_fd = os.dup(2)
    except OSError:  # started with stderr closed (2>&-): nothing to give back later
        _saved_fd = -1
    if hasattr(os, "memfd_create"):  # Linux: memory, no file on disk
        buffer_fd = os.memfd_create("embindex-decoder-stderr", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as handle:
            buffer_fd = os.dup(handle.fileno())
    if buffer_fd != 2:  # with fd 2 closed, the new file took its number
        os.dup2(buffer_fd, 2)
        os.close(buffer_fd)
    # Every warning is shown, so it lands with the file that raised it (by default a warning is shown
    # once per code location, so only the first file to trigger it would carry it).
    warnings.simplefilter("always")


def _written() -> int:
    """Bytes on fd 2 since the last take (0 where nothing is captured)."""
    if _saved_fd is None:
        return 0
    _flush()  # Python's own writes (warnings) are line-buffered: a partial line would come late
    return os.lseek(2, 0, os.SEEK_CUR)


def _read(end: int) -> str:
    return os.pread(2, min(end, MAX_SAID), 0).decode("utf-8", "replace").strip()


def peek() -> str:
    """What the decoder wrote since the last take(), left in place ("" where nothing: one lseek)."""
    end = _written()
    return _read(end) if end else ""


def take() -> str:
    """What the decoder wrote since the last take(), and an empty buffer for the next file (one lseek when
    nothing was written: a file's cost stays under a microsecond)."""
    end = _written()
    if not end:
        return ""
    said = _read(end)
    os.ftruncate(2, 0)
    os.lseek(2, 0, os.SEEK_SET)
    return said


def release() -> None:
    """fd 2 back to the real stderr: a traceback that ends the process must reach a person."""
    global _saved_fd
    if _saved_fd is None:
        return
    _flush()
    if _saved_fd >= 0:
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
    _saved_fd = None
