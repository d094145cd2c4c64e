"""The decode process pool: pixels return through shared memory; hangs and crashes become error records."""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from pipeline.decode import DecodeError, InputSpec, content_hash, decode_file, read_file
from pipeline.jpeg_probe import JPEG_SUFFIXES, probe_jpeg
from pipeline.pyramid import tile_count

log = logging.getLogger(__name__)

# (caller's key, path, hashes that need no decode), optionally a 4th element: True = decode on the CPU
# even where the GPU could take the file (it failed there)
Item = tuple[Any, ...]
TASKS_PER_WORKER = 4  # one decoding, three queued: a worker never waits on the main process


@dataclass
class DecodeResult:
    key: Any  # the caller's handle for the file
    pixels: np.ndarray | None  # a view into shared memory; valid until release(slot)
    slot: int | None
    width: int = 0
    height: int = 0
    content_hash: str | None = None
    error: str | None = None
    decode_s: float = 0.0
    reused: bool = False  # the bytes hash to a known vector: read and hashed, not decoded
    needs_encoding: bool = False  # set by the encode stage for GPU-decoded items it will encode
    jpeg: bytes | None = None  # a JPEG the GPU decoder takes: read, hashed and probed, not decoded
    orientation: int = 1  # its EXIF orientation (width and height are already upright)
    path: str | None = None  # set on `jpeg` results, so a file the GPU rejects can go back to a worker


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _inject_fault(path: str) -> None:
    """Test hook: EMBINDEX_FAULT=crash:NAME or hang:NAME makes the worker die or hang on that file;
    slow:SECONDS makes every file take that much longer (so kill tests can land mid-run)."""
    fault = os.environ.get("EMBINDEX_FAULT", "")
    action, _, name = fault.partition(":")
    if action == "slow":
        time.sleep(float(name))
    elif name and os.path.basename(path) == name:
        if action == "crash":
            os._exit(139)
        if action == "hang":
            time.sleep(3600)


def slot_bytes(spec: InputSpec) -> int:
    """The largest pixels one file can give: one image, every pyramid tile, or the largest smart resize."""
    tiles = tile_count(list(spec.tiles)) if spec.tiles else 1
    return tiles * spec.max_output_pixels * 3


def _worker_main(conn: Connection, shm_name: str, n_bytes: int, n_slots: int,
                 spec: InputSpec, max_image_pixels: int, jpeg_draft: bool, gpu_room: Any) -> None:
    shm = SharedMemory(name=shm_name)
    slots = np.ndarray((n_slots, n_bytes), dtype=np.uint8, buffer=shm.buf)
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            task_id, path, slot, known_hashes, gpu_may_take = task
            _inject_fault(path)
            try:
                started = time.perf_counter()
                data = read_file(path)
                digest = content_hash(data)
                if known_hashes and digest in known_hashes:
                    conn.send((task_id, ("reuse", digest), None, 0.0))
                    continue
                # While the GPU decoder has room, JPEGs it can take leave as bytes: the worker only read,
                # hashed and probed them. Otherwise (or when it is backed up) they are decoded here.
                probe = probe_jpeg(data, max_image_pixels) if gpu_may_take and gpu_room.value else None
                if probe is not None and len(data) <= n_bytes:
                    slots[slot, :len(data)] = np.frombuffer(data, np.uint8)
                    conn.send((task_id, ("jpeg", *probe, digest, len(data)), None, time.perf_counter() - started))
                    continue
                decoded = decode_file(path, spec, max_image_pixels, jpeg_draft, data=data, digest=digest)
            except DecodeError as exc:
                conn.send((task_id, None, str(exc), 0.0))
                continue
            # Images of many sizes share fixed slots: the pixels go first, their shape with the reply.
            slots[slot, :decoded.pixels.size] = decoded.pixels.reshape(-1)
            meta = (decoded.width, decoded.height, decoded.content_hash, decoded.pixels.shape)
            conn.send((task_id, meta, None, decoded.decode_s))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        del slots
        shm.close()


@dataclass
class _Task:
    task_id: int
    key: Any
    path: str
    slot: int
    known_hashes: frozenset[str] | None


class _Worker:
    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()
        self.tasks: collections.deque[_Task] = collections.deque()
        self.current_since = time.monotonic()  # when the task at the head of the queue started


class DecodePool:
    """A fixed number of decode processes fed in order; results come back as they finish."""

    def __init__(self, spec: InputSpec, workers: int, max_image_pixels: int, timeout_s: float = 60.0,
                 jpeg_draft: bool = True, n_slots: int | None = None, gpu_jpeg_bytes: int = 0) -> None:
        """`gpu_jpeg_bytes` > 0: JPEGs up to that size that the GPU decoder takes come back as bytes
        (DecodeResult.jpeg) while `gpu_room` is set (see feed.Feed)."""
        self.spec, self.timeout_s = spec, timeout_s
        self.n_workers = max(1, workers)
        self.n_slots = n_slots or self.n_workers * TASKS_PER_WORKER * 2
        self.gpu_jpeg = gpu_jpeg_bytes > 0
        n_bytes = max(slot_bytes(spec), gpu_jpeg_bytes)
        self._shm = SharedMemory(create=True, size=self.n_slots * n_bytes)
        self._slots = np.ndarray((self.n_slots, n_bytes), dtype=np.uint8, buffer=self._shm.buf)
        self._free = list(range(self.n_slots))
        self._ctx = mp.get_context("spawn")  # the main process holds CUDA and threads: never fork it
        self.gpu_room = self._ctx.RawValue("b", 1)  # cleared while the GPU decoder is backed up
        self._args = (self._shm.name, n_bytes, self.n_slots, spec, max_image_pixels, jpeg_draft, self.gpu_room)
        self._workers = [_Worker(self._ctx, self._args) for _ in range(self.n_workers)]
        self._next_id = 0
        self.crashes = 0
        self._crashes_in_a_row = 0  # a pool whose workers die at start-up must fail, not error every file

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        del self._slots
        self._shm.close()
        self._shm.unlink()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def release(self, slot: int | None) -> None:
        """Give a result's shared-memory slot back once its pixels have been copied out."""
        if slot is not None:
            self._free.append(slot)

    # -- the stream ------------------------------------------------------------------------
    def imap(self, items: Iterable[Item]) -> Iterator[DecodeResult]:
        """Decode (key, path, known_hashes) items; yields results in completion order.

        A file whose bytes hash to one of its `known_hashes` is not decoded: its result has
        `reused` set. Release each result's slot once its pixels are copied out."""
        pending: collections.deque[Item] = collections.deque()
        source = iter(items)
        exhausted = False
        while True:
            idle = False  # the source had nothing right now (it yields None; see feed.Feed)
            while not exhausted and len(pending) < self.n_workers * TASKS_PER_WORKER:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if item is None:
                    idle = True
                    break
                pending.append(item)
            self._dispatch(pending)
            busy = [w for w in self._workers if w.tasks]
            if not busy:
                if exhausted and not pending:
                    return
                if not self._free:
                    raise RuntimeError("all decode slots are held: release() each result after copying it")
                if idle:
                    time.sleep(0.002)
                continue
            yield from self._collect(busy, pending)

    def _dispatch(self, pending: collections.deque[Item]) -> None:
        for worker in sorted(self._workers, key=lambda w: len(w.tasks)):
            while pending and self._free and len(worker.tasks) < TASKS_PER_WORKER:
                key, path, known_hashes, *cpu_only = pending.popleft()
                task = _Task(self._next_id, key, path, self._free.pop(), known_hashes)
                self._next_id += 1
                if not worker.tasks:
                    worker.current_since = time.monotonic()
                worker.tasks.append(task)
                gpu_may_take = self.gpu_jpeg and not cpu_only and path.lower().endswith(JPEG_SUFFIXES)
                worker.conn.send((task.task_id, task.path, task.slot, task.known_hashes, gpu_may_take))

    def _collect(self, busy: list[_Worker], pending: collections.deque[Item]) -> Iterator[DecodeResult]:
        now = time.monotonic()
        wait_s = max(0.0, min(w.current_since + self.timeout_s - now for w in busy))
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s)
        for worker in busy:
            if worker.conn in ready:
                try:
                    while worker.conn.poll():
                        result = self._receive(worker)
                        self._dispatch(pending)  # refill before the consumer takes its time
                        yield result
                    continue
                except (EOFError, OSError):
                    pass  # the pipe broke: the worker died mid-send; handled below
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join(1)  # reap it, so exitcode is known
                # Results it sent before dying may still sit in the pipe (it died after `wait` returned):
                # take them first, or the file it finished would be blamed for the crash.
                yield from self._drain(worker)
                reason = f"decoder crashed (exit code {worker.process.exitcode})"
                if worker.tasks:
                    yield self._replace(worker, pending, reason)
                else:  # it died idle: nothing to blame, start another
                    log.warning("a decode worker died idle (%s); starting a new one", reason)
                    worker.conn.close()
                    self._workers[self._workers.index(worker)] = _Worker(self._ctx, self._args)
            elif time.monotonic() - worker.current_since > self.timeout_s:
                worker.process.kill()
                worker.process.join()
                yield self._replace(worker, pending, f"timeout: decoding took longer than {self.timeout_s:g} s")

    def _drain(self, worker: _Worker) -> Iterator[DecodeResult]:
        try:
            while worker.tasks and worker.conn.poll():
                yield self._receive(worker)
        except (EOFError, OSError):
            pass  # the rest of the pipe is a message cut short by the death

    def _receive(self, worker: _Worker) -> DecodeResult:
        task_id, meta, error, decode_s = worker.conn.recv()
        task = worker.tasks.popleft()
        assert task.task_id == task_id, "decode results arrive in the order they were sent"
        self._crashes_in_a_row = 0
        worker.current_since = time.monotonic()
        if error is not None or meta[0] in ("reuse", "jpeg"):
            if meta is not None and meta[0] == "jpeg":
                _, width, height, orientation, digest, size = meta
                data = self._slots[task.slot, :size].tobytes()  # copied out: the slot is free at once
                self._free.append(task.slot)
                return DecodeResult(task.key, None, None, width, height, digest, decode_s=decode_s, jpeg=data,
                                    orientation=orientation, path=task.path)
            self._free.append(task.slot)
            if error is not None:
                return DecodeResult(task.key, None, None, error=error, decode_s=decode_s)
            return DecodeResult(task.key, None, None, content_hash=meta[1], reused=True)
        width, height, digest, shape = meta
        pixels = self._slots[task.slot, :int(np.prod(shape))].reshape(shape)
        return DecodeResult(task.key, pixels, task.slot, width, height, digest, decode_s=decode_s)

    def _replace(self, worker: _Worker, pending: collections.deque[Item], reason: str) -> DecodeResult:
        """The head task killed or hung its worker: record it, requeue the rest, start a new worker."""
        self.crashes += 1
        self._crashes_in_a_row += 1
        if self._crashes_in_a_row > max(4, 2 * self.n_workers):
            raise RuntimeError(f"decode workers keep dying ({self._crashes_in_a_row} in a row, last: {reason})")
        culprit = worker.tasks.popleft()
        log.warning("%s: %s; starting a new decode worker", culprit.path, reason)
        for task in reversed(worker.tasks):
            pending.appendleft((task.key, task.path, task.known_hashes))  # may go to the GPU again
            self._free.append(task.slot)
        self._free.append(culprit.slot)
        worker.conn.close()
        index = self._workers.index(worker)
        self._workers[index] = _Worker(self._ctx, self._args)
        return DecodeResult(culprit.key, None, None, error=reason)
