"""Shared memory for decoded outputs: one region per task, filled file after file, free when its results are copied."""

from __future__ import annotations

import logging
import os
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from pipeline.decode.spec import InputSpec
from pipeline.decode.tiles import tile_count

log = logging.getLogger(__name__)

REGION_BYTES = 4 << 20  # each task writes its outputs (pixels or JPEG bytes) one after another in a region


def slot_bytes(spec: InputSpec) -> int:
    """The largest pixels one file can give: one image, every pyramid tile, or the largest smart resize."""
    tiles = tile_count(list(spec.tiles)) if spec.tiles else 1
    return tiles * spec.max_output_pixels * 3


def region_bytes(spec: InputSpec, gpu_jpeg_bytes: int = 0) -> int:
    """A task's share of shared memory: room for its files' outputs, and at least one file's largest."""
    return max(REGION_BYTES, slot_bytes(spec), gpu_jpeg_bytes)


def fit_shared_memory(n_regions: int, n_bytes: int) -> int:
    """Fewer regions where /dev/shm is small (containers often give 64 MB): writing past it kills with SIGBUS."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (macOS): the system decides
        return n_regions
    fits = int(0.8 * stats.f_bavail * stats.f_frsize) // n_bytes
    if fits < n_regions:
        log.warning("/dev/shm has room for %d decode regions of %d MB, not %d: fewer files in flight", fits,
                    n_bytes >> 20, n_regions)
    return max(1, min(n_regions, fits))


class Regions:
    """Equal regions of one shared-memory block. A region is lent to one task; its results then hold it
    until each is released (pixels copied out), and it is free again when the last one is."""

    def __init__(self, n_regions: int, n_bytes: int) -> None:
        self.n_regions, self.n_bytes = fit_shared_memory(n_regions, n_bytes), n_bytes
        self._shm = SharedMemory(create=True, size=self.n_regions * n_bytes)
        self.views = np.ndarray((self.n_regions, n_bytes), dtype=np.uint8, buffer=self._shm.buf)
        self.free = list(range(self.n_regions))
        self._holders = [0] * self.n_regions  # results still holding pixels in each region

    @property
    def name(self) -> str:
        return self._shm.name

    def hold(self, region: int, holders: int) -> None:
        """A task's results came back: `holders` of them keep pixels in its region."""
        self._holders[region] = holders
        if holders == 0:
            self.free.append(region)

    def release(self, slot: int | None) -> None:
        """One result's pixels were copied out. Another thread may call this while the pool runs:
        a region's count is set before its results are yielded, and list append/pop are atomic under the GIL."""
        if slot is not None:
            self._holders[slot] -= 1
            if self._holders[slot] == 0:
                self.free.append(slot)

    def close(self) -> None:
        del self.views
        self._shm.close()
        self._shm.unlink()
