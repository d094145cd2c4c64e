"""One mapping of decode failures to the stable, readable reasons that `images_errors` records."""

from __future__ import annotations

import re

from PIL import Image, UnidentifiedImageError

from pipeline.decode import limits
from pipeline.errors import DecodeError

# The labels. A reason is a label, or a label, ": " and a detail; SPEC.md, README and the tests name the
# first four and the crash and timeout forms, so they never change.
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated file"
TOO_MANY_PIXELS = "too many pixels"  # ": 400000000 > 100000000"
CORRUPT = "corrupt image data"  # ": what the decoder said"
UNSUPPORTED = "unsupported format"  # ": what PIL said" (a mode, compression or variant it has no code for)
INCONSISTENT = "inconsistent header"  # ": what it claims" (guards.py: containers whose parts disagree)
MISSING_DECODER = "missing decoder"  # " (ghostscript)": PIL knows the format, the library that decodes it is absent
OUT_OF_MEMORY = "out of memory"  # unbounded processes; bounded ones say "needs more than N MB to decode"
CRASHED = "decoder crashed"  # " (exit code -11)"
DETAIL_CHARS = 160  # a reason stays one short line (the tests hold it under 300 characters)

# PIL's messages, read once per failed file (never on the hot path). Order matters: first match wins.
_MISSING = [
    (re.compile(r"unable to locate ghostscript", re.I), "ghostscript"),
    (re.compile(r"(?:decoder|encoder) (\w+) not available", re.I), None),
    (re.compile(r"(\w+) support not installed", re.I), None),
    (re.compile(r"rebuild PIL with ([\w ]+?) support", re.I), None),
]
_MEMORY = re.compile(r"out of memory|cannot allocate memory|decoder error -9\b", re.I)
_TRUNCATED = re.compile(r"truncated|broken data stream|premature end|unexpected end", re.I)
# libtiff's own lines for a file that ends early (seen on fd 2, capture.py): "Read error on strip 0; got 5
# bytes, expected 35", "Read error at scanline 12".
_TRUNCATED_SAID = re.compile(r"read error (?:on|at) (?:strip|tile|scanline)|got \d+ bytes, expected \d+", re.I)
_UNSUPPORTED = re.compile(r"unsupported|not supported|unknown (?:raw |pixel |color |image )?mode|unrecognized mode"
                          r"|cannot handle|unknown compression|not implemented", re.I)
_GENERIC = re.compile(r"^decoder error -?\d+$")  # PIL's words when a C decoder said more
_PIL_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def too_many_pixels(pixels: int, limit: int) -> str:
    return f"{TOO_MANY_PIXELS}: {pixels} > {limit}"


def out_of_memory() -> str:
    """The reason for a file whose decode could not get memory: the bound in MB where this process has one."""
    bound = limits.bound_mb()
    return f"needs more than {bound} MB to decode" if bound else OUT_OF_MEMORY


def crashed(exit_code: int | None = None) -> str:
    return CRASHED if exit_code is None else f"{CRASHED} (exit code {exit_code})"


def timed_out(timeout_s: float) -> str:
    return f"timeout: decoding took longer than {timeout_s:g} s"


def _detail(text: str) -> str:
    """The first line of a message, whitespace collapsed, cut to DETAIL_CHARS."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    return line if len(line) <= DETAIL_CHARS else line[:DETAIL_CHARS - 3] + "..."


def _missing_decoder(message: str) -> str | None:
    for pattern, name in _MISSING:
        found = pattern.search(message)
        if found:
            return f"{MISSING_DECODER} ({name or found.group(1).lower()})"
    return None


def reason_for(exc: BaseException, said: str = "") -> str:
    """The one reason for a decode failure, whatever stage raised it (open, load, convert, resize). `said` is what
    the decoder wrote on stderr while failing (libtiff explains PIL's bare "decoder error -2" there)."""
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return out_of_memory()
    message = str(exc)
    missing = _missing_decoder(message)
    if missing:
        return missing
    if isinstance(exc, UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(exc, Image.DecompressionBombError):
        found = _PIL_BOMB.search(message)
        return too_many_pixels(int(found.group(1)), int(found.group(2))) if found else f"{TOO_MANY_PIXELS}: {message}"
    if _MEMORY.search(message):
        return out_of_memory()
    if isinstance(exc, EOFError) or _TRUNCATED.search(message) or _TRUNCATED_SAID.search(said):
        return TRUNCATED
    if _UNSUPPORTED.search(message):
        return f"{UNSUPPORTED}: {_detail(message)}"
    return f"{CORRUPT}: {_corrupt_detail(exc, message, said)}"


def _corrupt_detail(exc: BaseException, message: str, said: str) -> str:
    if said and (not message or _GENERIC.match(message)):
        return _detail(said.strip().splitlines()[-1])  # the decoder's last word, e.g. "ZIPDecode: Decoding error ..."
    if isinstance(exc, (OSError, ValueError, SyntaxError)):  # PIL's own types for bad data
        return _detail(message) or type(exc).__name__
    # struct.error, IndexError, KeyError, ZeroDivisionError...: a parser tripped on bytes it did not expect
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return _detail(f"{name}: {message}" if message else name)
