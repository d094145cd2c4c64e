"""Feed pending files to the GPU JPEG decoder and the CPU decode pool at once; merge what they produce.

Both paths pull from one queue of files, so each takes what it can keep up with: on ImageNet-size
JPEGs the GPU does most, on 12-megapixel ones the CPU pool (JPEG draft mode) adds its share.
Files the GPU path cannot take (other formats, CMYK, corrupt data, possible duplicates) go to the
CPU pool, which records errors with their reasons, so the set of rows is the same either way.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.decode import DecodeError, content_hash, read_file
from pipeline.gpu_decode import GpuBatch, GpuJpegDecoder, JpegFile, probe_jpeg
from pipeline.reuse import VectorReuse
from pipeline.workers import DecodePool, DecodeResult, Item

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
READER_THREADS = 8  # file reads and hashing release the GIL
_DONE = object()


class Feed:
    def __init__(self, pool: DecodePool, gpu: GpuJpegDecoder, reuse: VectorReuse, max_image_pixels: int,
                 gpu_batch: int = 256) -> None:
        self.pool, self.gpu, self.reuse = pool, gpu, reuse
        self.max_image_pixels, self.gpu_batch = max_image_pixels, gpu_batch
        self.gpu_decoded = 0
        self._source: Iterator[Item] | None = None
        self._source_lock = threading.Lock()
        self._source_empty = False
        self._overflow: queue.SimpleQueue[Item] = queue.SimpleQueue()  # files the GPU path handed back
        self._gpu_done = threading.Event()
        self._out: queue.Queue[Any] = queue.Queue(maxsize=64)

    # -- the shared source ------------------------------------------------------------------
    def _take(self, n: int) -> list[Item]:
        taken: list[Item] = []
        with self._source_lock:
            while len(taken) < n and not self._source_empty:
                try:
                    taken.append(next(self._source))  # type: ignore[arg-type]
                except StopIteration:
                    self._source_empty = True
        return taken

    def _cpu_items(self) -> Iterator[Item | None]:
        """Hand-backs first, then the shared source; None means 'nothing right now' to the pool."""
        while True:
            try:
                yield self._overflow.get_nowait()
                continue
            except queue.Empty:
                pass
            taken = self._take(1)
            if taken:
                yield taken[0]
            elif self._gpu_done.is_set() and self._overflow.empty():
                return
            else:
                yield None

    # -- the two producers ----------------------------------------------------------------------
    def _run_cpu(self) -> None:
        try:
            for result in self.pool.imap(self._cpu_items()):
                self._out.put(result)
        except BaseException as exc:  # re-raised in the consumer
            self._out.put(exc)
        finally:
            self._out.put(_DONE)

    def _read(self, item: Item) -> tuple[Item, bytes | None, str | None, Any]:
        key, path, known = item
        try:
            data = read_file(path)
        except DecodeError as exc:
            return item, None, None, str(exc)
        return item, data, content_hash(data), probe_jpeg(data, self.max_image_pixels)

    def _gpu_chunk(self, readers: ThreadPoolExecutor) -> list[Any]:
        chunk = []
        for item in self._take(self.gpu_batch):
            if not item[1].lower().endswith(JPEG_SUFFIXES):
                self._overflow.put(item)  # other formats: the CPU pool
            else:
                chunk.append(item)
        return list(readers.map(self._read, chunk))

    def _run_gpu(self) -> None:
        try:
            with ThreadPoolExecutor(READER_THREADS, thread_name_prefix="jpeg-reader") as readers:
                upcoming = readers.submit(self._gpu_chunk, readers)
                while True:
                    chunk = upcoming.result()
                    if not chunk and self._source_empty:
                        break
                    upcoming = readers.submit(self._gpu_chunk, readers)  # read the next while this decodes
                    self._decode_chunk(chunk)
        except BaseException as exc:
            self._out.put(exc)
        finally:
            self._gpu_done.set()
            self._out.put(_DONE)

    def _decode_chunk(self, chunk: list[Any]) -> None:
        files = []
        for item, data, digest, probe in chunk:
            key, path, known = item
            if data is None:
                self._out.put(DecodeResult(key, None, None, error=probe))
            elif self.reuse.lookup(digest) is not None:
                self._out.put(DecodeResult(key, None, None, content_hash=digest, reused=True))
            elif probe is None:
                self._overflow.put(item)
            else:
                width, height, orientation = probe
                files.append(JpegFile(key, path, data, digest, width, height, orientation))
        if not files:
            return
        started = time.perf_counter()
        pixels, good, bad, ready = self.gpu.decode(files)
        for file in bad:
            self._overflow.put((file.key, file.path, None))
        if pixels is not None:
            self.gpu_decoded += len(good)
            items = [DecodeResult(f.key, None, None, f.width, f.height, f.content_hash) for f in good]
            self._out.put(GpuBatch(items, pixels, ready, time.perf_counter() - started))

    # -- the merged stream ------------------------------------------------------------------
    def stream(self, items: Iterator[Item]) -> Iterator[DecodeResult | GpuBatch]:
        self._source = iter(items)
        threads = [threading.Thread(target=self._run_gpu, name="gpu-feed", daemon=True),
                   threading.Thread(target=self._run_cpu, name="cpu-feed", daemon=True)]
        # Four busy Python threads: hand the GIL over every 0.5 ms instead of 5 ms, so the GPU feed
        # does not wait behind the readers between its many short CUDA calls.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        for thread in threads:
            thread.start()
        finished = 0
        try:
            while finished < len(threads):
                event = self._out.get()
                if event is _DONE:
                    finished += 1
                elif isinstance(event, BaseException):
                    raise event
                else:
                    yield event
        finally:
            sys.setswitchinterval(switch_interval)


def gpu_workers(cores: int) -> int:
    """Decode processes beside the GPU path: leave two cores for the readers and the main thread."""
    return max(1, cores - 2)
