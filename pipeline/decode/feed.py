"""Feed the decode workers and the GPU JPEG decoder at once; merge what they produce."""

# Every file goes to a decode worker process, which reads and hashes it. A JPEG the GPU can take
# comes back as bytes (probed, not decoded) while the GPU decoder has room; any other file, or any
# file while the GPU path is backed up, is decoded by the worker itself. So both decoders stay busy,
# and no per-file Python work (reads, hashes, header probes) runs in the main process, where it would
# compete for the GIL with the threads that launch GPU work. Files nvJPEG rejects go back to the
# workers for a CPU decode, which records errors with their reasons: the rows are the same either way.

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipeline.decode.nvjpeg import DECODE_PIXELS, GpuBatch, JpegFile
from pipeline.decode.pool import DecodePool
from pipeline.records import DecodeResult, Item

# At most this many GPU batches decoded and not yet taken by the encode stage: beyond it the GPU
# decoder waits, its queue fills, and the workers decode on the CPU instead.
READY_BATCHES = 2
# A batch fills up to gpu_batch while JPEGs keep coming: each GPU batch is also one forward pass, and
# small ones waste the model (ViT-B/16 runs ~3x fewer images/s at batch 32 than at 256). It goes out
# early only when no JPEG arrived for this long (the workers are busy decoding, or the end is near).
BATCH_GAP_S = 0.01
# Source pixels queued for the GPU decoder, and per batch: two decode chunks (~0.1 s of nvJPEG). Large
# files make short queues (12 MP: ~66 files, not 512), so the workers do not idle at the end.
QUEUE_PIXELS = 2 * DECODE_PIXELS
_DONE = object()


class _Backlog:
    """JPEGs handed to the GPU path and not yet decoded or rejected; it opens and closes the pool's GPU room."""

    def __init__(self, gpu_room: Any, gpu_batch: int) -> None:
        self._room, self._gpu_batch = gpu_room, gpu_batch
        self._lock = threading.Lock()
        self.outstanding = 0
        self._queued = self._queued_pixels = 0  # of those, not yet taken into a batch; their source pixels

    def count(self, outstanding: int, queued: int, pixels: int) -> None:
        with self._lock:
            self.outstanding += outstanding
            self._queued += queued
            self._queued_pixels += pixels
            # The queue counts, not the batch in the decoder: the next batch fills while this one decodes,
            # so nvJPEG never waits for the workers to switch back. More than two batches of files or
            # QUEUE_PIXELS waiting: the GPU is behind, and the workers decode on the CPU instead.
            self._room.value = self._queued < 2 * self._gpu_batch and self._queued_pixels < QUEUE_PIXELS

    def take(self, item: DecodeResult) -> int:
        """One queued JPEG goes into a batch: its source pixels."""
        pixels = item.width * item.height
        self.count(0, -1, -pixels)
        return pixels


@contextlib.contextmanager
def _quick_gil_handover() -> Iterator[None]:
    """Three busy Python threads: hand the GIL over every 0.5 ms instead of 5 ms, so the GPU decode
    thread does not wait behind the others between its many short CUDA calls."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)


class Feed:
    """The decode pool and nvJPEG side by side: a worker thread merges the pool's results, a GPU thread batches
    and decodes the JPEGs the workers hand over, and `stream` yields both kinds of output as they come."""

    def __init__(self, pool: DecodePool, gpu: Any, gpu_batch: int = 256) -> None:
        """`gpu` decodes lists of JpegFile: (pixels, decoded, rejected, ready event) (GpuJpegDecoder)."""
        self.pool, self.gpu, self.gpu_batch = pool, gpu, gpu_batch
        self.gpu_decoded = 0
        # Where the GPU decode thread's time went (the run report's gpu_feed): waiting for JPEGs, decoding.
        self.stats = {"batches": 0, "wait_s": 0.0, "decode_s": 0.0, "ready_wait_s": 0.0}
        self._jpegs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._rejected: queue.SimpleQueue[Item] = queue.SimpleQueue()  # back to the workers, CPU only
        # Unbounded: decoded results hold shared memory until the encode stage copies them, and the pool
        # waits when all of it is held (imap's consumer_thread), so that bounds what queues here.
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.BoundedSemaphore(READY_BATCHES)
        self._backlog = _Backlog(pool.gpu_room, gpu_batch)

    def _items(self, items: Iterator[Item]) -> Iterator[Item | None]:
        """Rejected JPEGs first, then the source; None tells the pool 'nothing right now'."""
        source_done = False
        while True:
            try:
                yield self._rejected.get_nowait()
                continue
            except queue.Empty:
                pass
            if not source_done:
                try:
                    yield next(items)
                    continue
                except StopIteration:
                    source_done = True
            # The count first: the GPU thread queues rejections before it lowers the count.
            if self._backlog.outstanding == 0 and self._rejected.empty():
                return
            yield None

    def _run_workers(self, items: Iterator[Item]) -> None:
        try:
            for result in self.pool.imap(self._items(items), consumer_thread=True):
                if result.jpeg is not None:
                    self._backlog.count(+1, +1, result.width * result.height)
                    self._jpegs.put(result)
                else:
                    self._out.put(result)
        except BaseException as exc:  # re-raised in the consumer
            self._out.put(exc)
        finally:
            self._jpegs.put(_DONE)
            self._out.put(_DONE)

    def _next_batch(self) -> tuple[list[DecodeResult], bool]:
        """Up to gpu_batch files or QUEUE_PIXELS source pixels; the end of the stream says so."""
        batch: list[DecodeResult] = []
        started = time.perf_counter()
        first = self._jpegs.get()
        self.stats["wait_s"] += time.perf_counter() - started
        if first is _DONE:
            return batch, True
        batch.append(first)
        pixels = self._backlog.take(first)
        while len(batch) < self.gpu_batch and pixels < QUEUE_PIXELS:
            try:
                item = self._jpegs.get(timeout=BATCH_GAP_S)
            except queue.Empty:
                break
            if item is _DONE:
                return batch, True
            batch.append(item)
            pixels += self._backlog.take(item)
        return batch, False

    def _run_gpu(self) -> None:
        try:
            done = False
            while not done:
                batch, done = self._next_batch()
                if batch:
                    self._decode(batch)
        except BaseException as exc:
            self._out.put(exc)
        finally:
            self._out.put(_DONE)

    def _decode(self, batch: list[DecodeResult]) -> None:
        files = [JpegFile(r, "", r.jpeg, r.content_hash, r.width, r.height, r.orientation) for r in batch]
        started = time.perf_counter()
        pixels, good, bad, ready = self.gpu.decode(files)
        self.stats["decode_s"] += time.perf_counter() - started
        self.stats["batches"] += 1
        for result in batch:  # nvJPEG has read the bytes (staged before decode returns): their regions go back
            self.pool.release(result.slot)
            result.jpeg, result.slot = None, None
        for file in bad:
            self._rejected.put((file.key.key, file.key.path, None, True))
        if pixels is not None:
            self.gpu_decoded += len(good)
            items = [file.key for file in good]
            waited = time.perf_counter()
            self._ready.acquire()  # released when the encode stage takes the batch
            self.stats["ready_wait_s"] += time.perf_counter() - waited
            self._out.put(GpuBatch(items, pixels, ready, time.perf_counter() - started))
        self._backlog.count(-len(batch), 0, 0)

    def stream(self, items: Iterator[Item]) -> Iterator[DecodeResult | GpuBatch]:
        threads = [threading.Thread(target=self._run_workers, args=(iter(items),), name="decode-feed", daemon=True),
                   threading.Thread(target=self._run_gpu, name="gpu-decode", daemon=True)]
        with _quick_gil_handover():
            for thread in threads:
                thread.start()
            finished = 0
            while finished < len(threads):
                event = self._out.get()
                if event is _DONE:
                    finished += 1
                elif isinstance(event, BaseException):
                    raise event
                else:
                    if isinstance(event, GpuBatch):
                        self._ready.release()
                    yield event

