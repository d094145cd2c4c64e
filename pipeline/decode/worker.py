"""A decode worker process: takes tasks of several files, writes each output into the task's region, replies once."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from pipeline.decode import capture
from pipeline.decode.image import content_hash, decode_file, read_file
from pipeline.decode.jpeg_probe import probe_jpeg
from pipeline.decode.limits import prepare_decode_process
from pipeline.decode.regions import slot_bytes
from pipeline.decode.spec import InputSpec
from pipeline.errors import DecodeError


def inject_fault(path: str) -> None:
    """Test hook: EMBINDEX_FAULT=crash:NAME or hang:NAME makes the worker die or hang on that file;
    slow:SECONDS makes every file take that much longer (so kill tests can land mid-run); wait:PATH holds
    every file until PATH exists (a run that keeps its lock until the test lets it go)."""
    fault = os.environ.get("EMBINDEX_FAULT", "")
    action, _, name = fault.partition(":")
    if action == "slow":
        time.sleep(float(name))
    elif action == "wait":
        while not os.path.exists(name):
            time.sleep(0.01)
    elif name and os.path.basename(path) == name:
        if action == "crash":
            os._exit(139)
        if action == "hang":
            time.sleep(3600)


def decode_one(path: str, known_hashes: frozenset[str] | None, gpu_may_take: bool, region: np.ndarray,
               offset: int, spec: InputSpec, max_image_pixels: int, jpeg_draft: bool, gpu_room: Any,
               largest: int) -> tuple[Any, ...]:
    """One file of a task -> its reply; ("later",) when its output would not fit in what is left of the region."""
    started = time.perf_counter()
    try:
        data = read_file(path)
        digest = content_hash(data)
        if known_hashes and digest in known_hashes:
            return ("reuse", digest)
        # While the GPU decoder has room, JPEGs it can take leave as bytes: the worker only read,
        # hashed and probed them. Otherwise (or when it is backed up) they are decoded here.
        probe = probe_jpeg(data, max_image_pixels) if gpu_may_take and gpu_room.value else None
        if probe is not None and len(data) <= len(region):
            if offset + len(data) > len(region):
                return ("later",)
            region[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
            return ("jpeg", offset, len(data), *probe, digest, time.perf_counter() - started)
        if offset + largest > len(region):
            return ("later",)
        decoded = decode_file(path, spec, max_image_pixels, jpeg_draft, data=data, digest=digest)
    except DecodeError as exc:
        return ("error", str(exc), time.perf_counter() - started)
    # Images of many sizes share the region: the pixels go first, their shape with the reply.
    region[offset:offset + decoded.pixels.size] = decoded.pixels.reshape(-1)
    return ("pixels", offset, decoded.pixels.shape, decoded.width, decoded.height, decoded.content_hash,
            decoded.decode_s)


def worker_main(conn: Connection, progress: Any, shm_name: str, n_bytes: int, n_regions: int,
                spec: InputSpec, max_image_pixels: int, jpeg_draft: bool, gpu_room: Any,
                max_worker_mb: int | None = None) -> None:
    shm = SharedMemory(name=shm_name)
    regions = np.ndarray((n_regions, n_bytes), dtype=np.uint8, buffer=shm.buf)
    largest = slot_bytes(spec)
    # After the shared memory is mapped: the bound counts from this process's size with the regions in it.
    prepare_decode_process(max_worker_mb)
    capture.take()  # start-up chatter is no file's
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            task_id, region_index, files = task
            region, offset, replies, said = regions[region_index], 0, [], []
            for index, (path, known_hashes, gpu_may_take) in enumerate(files):
                # Which file is in hand, and since when: the pool blames it if this process dies or hangs.
                progress[0], progress[1], progress[2] = task_id, index, time.monotonic()
                inject_fault(path)
                reply = decode_one(path, known_hashes, gpu_may_take, region, offset, spec, max_image_pixels,
                                   jpeg_draft, gpu_room, largest)
                words = capture.take()  # what libtiff or PIL wrote while decoding it: for the pool's debug log
                if reply[0] == "later":  # the region is full: the rest go back to the queue
                    break
                replies.append(reply)
                if words:
                    said.append((index, words))
                if reply[0] == "jpeg":
                    offset += reply[2]
                elif reply[0] == "pixels":
                    offset += int(np.prod(reply[2]))
            conn.send((task_id, replies, said))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        capture.release()
        del regions
        shm.close()
