"""A memory bound per decode process: its address space capped (RLIMIT_AS) at its own size at start plus a budget."""

from __future__ import annotations

import logging
import os

from PIL import Image

from pipeline.decode import capture

log = logging.getLogger(__name__)

_bound_mb: int | None = None  # this process's budget, once bound_memory has set it


def address_space_bytes() -> int | None:
    """This process's virtual size (libraries, heap, mapped shared memory); None without /proc (macOS)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            pages = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def bound_memory(max_mb: int | None) -> int | None:
    """Cap this process's address space at its present size plus `max_mb` MB; the cap in bytes, or None where
    unbounded or unsupported. Relative, not absolute: every decode process maps the pool's shared-memory
    regions (hundreds of MB) and its libraries, which are not its decode's to spend. An allocation past the cap
    fails at once (MemoryError), where the RSS would otherwise grow: a 256x256 ICNS took 8.1 GB and 41 s."""
    global _bound_mb
    if not max_mb:
        return None
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    baseline = address_space_bytes()
    if baseline is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = baseline + (max_mb << 20)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError) as exc:
        log.debug("decode memory bound not set: %s", exc)
        return None
    _bound_mb = max_mb
    return cap


def bound_mb() -> int | None:
    """The budget bound_memory set in this process (None: unbounded)."""
    return _bound_mb


def prepare_decode_process(max_worker_mb: int | None) -> None:
    """A decode process's start, in this order: its stderr captured (capture.py); PIL's plugins imported, so
    their libraries count in the baseline, not against the budget (Image.init: 27 ms, 9 MB); then the bound."""
    capture.install()
    Image.init()
    bound_memory(max_worker_mb)
