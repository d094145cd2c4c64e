"""Dynamic batching: the images (or texts) of concurrent requests share GPU batches, formed within a few ms."""

# Requests put jobs on one queue; a single thread owns the encoder, takes what is queued (waiting at most
# `window_s` after the first item for a batch to fill), runs one forward pass and hands each request its rows.
# A request larger than a batch spans several.

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.encode.models.base import Encoder

log = logging.getLogger(__name__)


@dataclass
class _Job:
    images: np.ndarray | list[np.ndarray] | None  # uint8 (n, H, W, 3); variable resolution: n of (H_i, W_i, 3)
    texts: list[str] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    out: np.ndarray | None = None  # (n, dim) float32, filled batch by batch
    taken: int = 0  # rows handed to a batch so far
    filled: int = 0  # rows with vectors
    failed: bool = False
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.images) if self.images is not None else len(self.texts or [])


def _resolve(job: _Job, result: np.ndarray | BaseException) -> None:
    def deliver() -> None:
        if job.future.done():  # the client went away
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(deliver)


class Batcher:
    def __init__(self, encoder: Encoder, batch_size: int, window_s: float,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.encoder, self.batch_size, self.window_s = encoder, batch_size, window_s
        self.on_batch = on_batch  # (kind, size, seconds) after each forward pass: metrics
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._deferred: collections.deque[_Job] = collections.deque()  # taken, of the other kind, or partial
        # Variable-resolution models (Qwen3-VL-Embedding) take a list of images of their own sizes.
        self.image_list = encoder.input_spec().dynamic
        if not self.image_list:
            height, width, _ = encoder.input_spec().output_shape
            pin = encoder.device.type == "cuda"
            self._buffer = torch.empty((batch_size, height, width, 3), dtype=torch.uint8, pin_memory=pin)
            self._staging = self._buffer.numpy()  # filled through NumPy: a plain memcpy
        self._thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self._stopped = False

    # -- the request side (event loop) ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def embed_images(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await self._submit(_Job(pixels, None, loop, loop.create_future()))

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await self._submit(_Job(None, texts, loop, loop.create_future()))

    async def _submit(self, job: _Job) -> np.ndarray:
        self._queue.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away: rows not yet in a batch are skipped (_gather)
            job.failed = True
            raise

    # -- the encoder thread ---------------------------------------------------------------
    def _next(self, timeout: float | None) -> _Job | None:
        if self._deferred:
            return self._deferred.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> list[tuple[_Job, int, int]]:
        """Rows (job, start, end) for one batch of first's kind: what is queued now, plus what arrives
        within the window, up to batch_size rows (texts: batch_size texts)."""
        is_image = first.images is not None
        parts: list[tuple[_Job, int, int]] = []
        count, deadline = 0, time.monotonic() + self.window_s
        job: _Job | None = first
        later: list[_Job] = []
        while job is not None:
            if (job.images is not None) != is_image or job.failed:
                if not job.failed:
                    later.append(job)
            else:
                take = min(job.size - job.taken, self.batch_size - count)
                parts.append((job, job.taken, job.taken + take))
                job.taken += take
                count += take
                if job.taken < job.size:  # the rest opens the next batch
                    later.insert(0, job)
                    break
            if count >= self.batch_size:
                break
            job = self._next(deadline - time.monotonic())
        self._deferred.extendleft(reversed(later))
        return parts

    def _encode(self, parts: list[tuple[_Job, int, int]]) -> np.ndarray:
        if parts[0][0].images is not None and self.image_list:
            images = [torch.from_numpy(image) for job, start, end in parts for image in job.images[start:end]]
            return torch.cat(self.encoder.encode_image_list(images)).to("cpu", torch.float32).numpy()
        if parts[0][0].images is not None:
            count = 0
            for job, start, end in parts:
                self._staging[count:count + end - start] = job.images[start:end]  # type: ignore[index]
                count += end - start
            vectors = self.encoder.encode_images(self._buffer[:count])
            return vectors.to("cpu", torch.float32).numpy()
        texts = [text for job, start, end in parts for text in job.texts[start:end]]  # type: ignore[index]
        return np.asarray(self.encoder.encode_texts(texts), dtype=np.float32)

    def _run(self) -> None:
        while not self._stopped:
            first = self._next(None)
            if first is None:
                continue
            parts = self._gather(first)
            if not parts:
                continue
            started = time.perf_counter()
            try:
                vectors = self._encode(parts)
            except Exception as exc:  # a failed forward fails its requests, not the server
                log.exception("encoder failed on a batch of %d", sum(end - start for _, start, end in parts))
                for job, _, _ in parts:
                    if not job.failed:
                        job.failed = True
                        _resolve(job, exc)
                continue
            if self.on_batch is not None:
                kind = "image" if parts[0][0].images is not None else "text"
                self.on_batch(kind, len(vectors), time.perf_counter() - started)
            row = 0
            for job, start, end in parts:
                if job.out is None:
                    job.out = np.empty((job.size, vectors.shape[1]), np.float32)
                job.out[start:end] = vectors[row:row + end - start]
                row += end - start
                job.filled += end - start
                if job.filled == job.size:
                    _resolve(job, job.out)
