"""The Ray runner's decode tasks: a block of the plan's files -> the encoder's pixels, on CPUs."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import DecodeConfig
from pipeline.decode import reasons
from pipeline.decode.image import content_hash, decode_file, read_file
from pipeline.decode.spec import InputSpec
from pipeline.decode.tiles import tile_count
from pipeline.decode.worker import inject_fault  # the same EMBINDEX_FAULT test hook as the local decode pool
from pipeline.errors import DecodeError

META_COLUMNS = ("root", "path", "size_bytes", "mtime_ns", "attempts", "was_in")
KV_NAMESPACE = "embindex"  # Ray's key-value store: which blocks a decode task has started
DEFAULT_MAX_WORKER_MB = DecodeConfig().max_worker_mb  # decode.max_worker_mb's default (decode/limits.py)
NO_PIXELS = np.zeros((0, 0, 3), np.uint8)  # a dynamic-resolution file without pixels (an error, a reused vector)


def node_label() -> str:
    """IP plus a short node id: two Ray nodes may share a machine (and so an IP)."""
    import ray

    return f"{ray.util.get_node_ip_address()}#{ray.get_runtime_context().get_node_id()[:6]}"


@contextmanager
def _deadline(timeout_s: float) -> Iterator[None]:
    """Raise DecodeError once a file has taken longer than timeout_s (the local pool kills such a worker).
    SIGALRM interrupts Python code and PIL between its decode calls; Ray runs tasks on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise DecodeError(reasons.timed_out(timeout_s))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _started_before(key: str) -> bool:
    """Marks this block as started; True if a task for it started before. Ray runs a task again only
    when its worker died (Ray Data retries without limit), perhaps killed by a file of this block."""
    from ray.experimental.internal_kv import _internal_kv_put

    return _internal_kv_put(key, b"1", overwrite=False, namespace=KV_NAMESPACE)


class _Decoded:
    """The per-file outputs of one block. "" stands for none: Ray turns an object column holding
    only None into floats. Pixels as the local decode pool gives them: (H, W, 3) per file, (tiles, H, W, 3)
    with pyramid tiles, or for dynamic resolution each file its own size (an object column: Ray ships it as
    a variable-shaped tensor; (0, 0, 3) where a file has none)."""

    def __init__(self, n: int, spec: InputSpec) -> None:
        if spec.dynamic:
            self.pixels = np.empty(n, dtype=object)
            for index in range(n):
                self.pixels[index] = NO_PIXELS
        else:
            tiles = (tile_count(list(spec.tiles)),) if spec.tiles else ()
            self.pixels = np.zeros((n, *tiles, *spec.output_shape), np.uint8)
        self.width, self.height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.decode_s = np.zeros(n, np.float64)
        self.hashes, self.errors = [""] * n, [""] * n
        self.reused = np.zeros(n, np.bool_)


def _decode_here(rows: list[dict[str, Any]], out: _Decoded, spec: InputSpec, max_image_pixels: int,
                 jpeg_draft: bool, timeout_s: float) -> None:
    """The fast path: decode in this task's own process."""
    for index, row in enumerate(rows):
        path = os.path.join(row["root"], *row["path"].split("/"))
        started = time.perf_counter()
        try:
            with _deadline(timeout_s):
                inject_fault(path)
                data = read_file(path)
                out.hashes[index] = digest = content_hash(data)
                if row["known_hashes"] and digest in row["known_hashes"]:
                    out.reused[index] = True
                    continue
                decoded = decode_file(path, spec, max_image_pixels, jpeg_draft, data=data, digest=digest)
            out.pixels[index] = decoded.pixels
            out.width[index], out.height[index] = decoded.width, decoded.height
        except DecodeError as exc:
            out.errors[index] = str(exc)
        finally:
            out.decode_s[index] = time.perf_counter() - started


def _decode_isolated(rows: list[dict[str, Any]], out: _Decoded, spec: InputSpec, max_image_pixels: int,
                     jpeg_draft: bool, timeout_s: float, max_worker_mb: int | None) -> None:
    """The second try of a block whose task died: the local runner's one-process decode pool, so a
    file that kills or hangs its decoder, or needs more than max_worker_mb, becomes an error row with the
    local runner's reason. (The first try is not bounded: an address-space cap on a Ray worker process would
    also bind Ray's own threads and buffers in it. A file that needs too much gets the task killed by Ray's
    memory monitor, and the retry lands here.)"""
    from pipeline.decode.pool import DecodePool

    items = [(index, os.path.join(row["root"], *row["path"].split("/")),
              frozenset(row["known_hashes"]) if row["known_hashes"] else None) for index, row in enumerate(rows)]
    with DecodePool(spec, 1, max_image_pixels, timeout_s, jpeg_draft, max_worker_mb=max_worker_mb) as pool:
        for result in pool.imap(items):
            index = result.key
            out.decode_s[index] = result.decode_s
            if result.error is not None:
                out.errors[index] = result.error
                continue
            out.hashes[index] = result.content_hash
            if result.reused:
                out.reused[index] = True
                continue
            out.pixels[index] = result.pixels.copy() if spec.dynamic else result.pixels  # out of shared memory
            out.width[index], out.height[index] = result.width, result.height
            pool.release(result.slot)


def decode_block(block: pa.Table, spec: InputSpec, max_image_pixels: int, jpeg_draft: bool,
                 timeout_s: float, run_key: str, max_worker_mb: int | None = DEFAULT_MAX_WORKER_MB,
                 ) -> dict[str, np.ndarray]:
    """A block of the plan -> the same columns plus pixels (uint8, N x H x W x 3; zeros where there are
    none), width, height, content_hash, the readable error of a bad file, and `reused` for bytes whose
    vector the driver already holds (hashed, not decoded)."""
    rows = block.to_pylist()
    n = len(rows)
    out = _Decoded(n, spec)
    retry = n > 0 and _started_before(f"{run_key}:{rows[0]['root']}/{rows[0]['path']}")
    if retry:
        _decode_isolated(rows, out, spec, max_image_pixels, jpeg_draft, timeout_s, max_worker_mb)
    else:
        _decode_here(rows, out, spec, max_image_pixels, jpeg_draft, timeout_s)
    columns = {name: block[name].to_numpy(zero_copy_only=False) for name in META_COLUMNS}
    columns["was_in"] = np.array([value or "" for value in columns["was_in"]], dtype=object)
    return {**columns, "pixels": out.pixels, "width": out.width, "height": out.height,
            "content_hash": np.array(out.hashes, dtype=object), "error": np.array(out.errors, dtype=object),
            "reused": out.reused, "decode_s": out.decode_s,
            "decode_node": np.array([node_label()] * n, dtype=object)}
