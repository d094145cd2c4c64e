"""The decode process pool: tasks of several files, outputs in shared memory, crashes and hangs as error rows."""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import selectors
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
# A task is several files with one reply, so the main process pays its per-message costs (pickling,
# pipe, select) once per task: one message per file held the GPU path near 2,000 files/s under the GIL.
TASKS_PER_WORKER = 3  # one decoding, two queued: a worker never waits on the main process
TASK_SECONDS = 0.05  # files per task are sized to about this much worker time...
MAX_FILES_PER_TASK = 32  # ...within these bounds, so the last tasks of a run end close together
REGION_BYTES = 4 << 20  # each task writes its outputs (pixels or JPEG bytes) one after another in a region


@dataclass
class DecodeResult:
    key: Any  # the caller's handle for the file
    pixels: np.ndarray | None  # a view into shared memory; valid until release(slot)
    slot: int | None  # the shared-memory region holding its pixels (its task's other results share it)
    width: int = 0
    height: int = 0
    content_hash: str | None = None
    error: str | None = None
    decode_s: float = 0.0
    reused: bool = False  # the bytes hash to a known vector: read and hashed, not decoded
    needs_encoding: bool = False  # set by the encode stage for GPU-decoded items it will encode
    jpeg: bytes | bytearray | None = None  # a JPEG the GPU decoder takes: read, hashed and probed, not decoded
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


def region_bytes(spec: InputSpec, gpu_jpeg_bytes: int = 0) -> int:
    """A task's share of shared memory: room for its files' outputs, and at least one file's largest."""
    return max(REGION_BYTES, slot_bytes(spec), gpu_jpeg_bytes)


def _fit_shared_memory(n_regions: int, n_bytes: int) -> int:
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


def _decode_one(path: str, known_hashes: frozenset[str] | None, gpu_may_take: bool, region: np.ndarray,
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


def _worker_main(conn: Connection, progress: Any, shm_name: str, n_bytes: int, n_regions: int,
                 spec: InputSpec, max_image_pixels: int, jpeg_draft: bool, gpu_room: Any) -> None:
    shm = SharedMemory(name=shm_name)
    regions = np.ndarray((n_regions, n_bytes), dtype=np.uint8, buffer=shm.buf)
    largest = slot_bytes(spec)
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            task_id, region_index, files = task
            region, offset, replies = regions[region_index], 0, []
            for index, (path, known_hashes, gpu_may_take) in enumerate(files):
                # Which file is in hand, and since when: the pool blames it if this process dies or hangs.
                progress[0], progress[1], progress[2] = task_id, index, time.monotonic()
                _inject_fault(path)
                reply = _decode_one(path, known_hashes, gpu_may_take, region, offset, spec, max_image_pixels,
                                    jpeg_draft, gpu_room, largest)
                if reply[0] == "later":  # the region is full: the rest go back to the queue
                    break
                replies.append(reply)
                if reply[0] == "jpeg":
                    offset += reply[2]
                elif reply[0] == "pixels":
                    offset += int(np.prod(reply[2]))
            conn.send((task_id, replies))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        del regions
        shm.close()


@dataclass
class _Task:
    task_id: int
    region: int
    items: list[Item]


@dataclass
class _Worker:
    conn: Connection
    process: Any
    progress: Any  # shared (task id, index of the file in hand, since when on the monotonic clock)
    tasks: collections.deque[_Task] = field(default_factory=collections.deque)
    current_since: float = field(default_factory=time.monotonic)  # when the head task was sent or the last reply came


class DecodePool:
    """A fixed number of decode processes fed tasks in order; results come back as tasks finish."""

    def __init__(self, spec: InputSpec, workers: int, max_image_pixels: int, timeout_s: float = 60.0,
                 jpeg_draft: bool = True, n_regions: int | None = None, gpu_jpeg_bytes: int = 0) -> None:
        """`gpu_jpeg_bytes` > 0: JPEGs up to that size that the GPU decoder takes come back as bytes
        (DecodeResult.jpeg) while `gpu_room` is set (see feed.Feed). `n_regions`: shared-memory
        regions (one per task in flight, plus those whose results the consumer still holds)."""
        self.spec, self.timeout_s = spec, timeout_s
        self.n_workers = max(1, workers)
        self.gpu_jpeg = gpu_jpeg_bytes > 0
        n_bytes = region_bytes(spec, gpu_jpeg_bytes)
        self.n_regions = _fit_shared_memory(n_regions or self.n_workers * TASKS_PER_WORKER * 2, n_bytes)
        self._shm = SharedMemory(create=True, size=self.n_regions * n_bytes)
        self._regions = np.ndarray((self.n_regions, n_bytes), dtype=np.uint8, buffer=self._shm.buf)
        self._free = list(range(self.n_regions))
        self._holders = [0] * self.n_regions  # results still holding pixels in each region
        self._ctx = mp.get_context("spawn")  # the main process holds CUDA and threads: never fork it
        self.gpu_room = self._ctx.RawValue("b", 1)  # cleared while the GPU decoder is backed up
        self._args = (self._shm.name, n_bytes, self.n_regions, spec, max_image_pixels, jpeg_draft, self.gpu_room)
        self._selector = selectors.DefaultSelector()  # kept: building one per wait cost ~70 us a call
        self._workers = [self._start_worker() for _ in range(self.n_workers)]
        self._next_id = 0
        # A worker's time and output bytes per file, smoothed: they size the tasks.
        self._seconds_per_file, self._bytes_per_file = TASK_SECONDS / 4, n_bytes / 8
        self.crashes = 0
        self._crashes_in_a_row = 0  # a pool whose workers die at start-up must fail, not error every file

    # -- lifecycle -------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        conn, child_conn = self._ctx.Pipe()
        progress = self._ctx.RawArray("d", [-1.0, 0.0, 0.0])  # no task yet
        process = self._ctx.Process(target=_worker_main, args=(child_conn, progress, *self._args), daemon=True)
        process.start()
        child_conn.close()
        worker = _Worker(conn, process, progress)
        self._selector.register(conn, selectors.EVENT_READ, worker)
        self._selector.register(process.sentinel, selectors.EVENT_READ, worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        self._selector.unregister(worker.conn)
        self._selector.unregister(worker.process.sentinel)
        worker.conn.close()

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
        self._selector.close()
        del self._regions
        self._shm.close()
        self._shm.unlink()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def release(self, slot: int | None) -> None:
        """Give a result's hold on its shared-memory region back once its pixels have been copied out.
        One consumer thread may call this while another runs imap: a region's count is set before its
        results are yielded, and list append/pop are atomic under the GIL."""
        if slot is not None:
            self._holders[slot] -= 1
            if self._holders[slot] == 0:
                self._free.append(slot)

    # -- the stream ------------------------------------------------------------------------
    def imap(self, items: Iterable[Item], consumer_thread: bool = False) -> Iterator[DecodeResult]:
        """Decode (key, path, known_hashes) items; yields results in completion order.

        A file whose bytes hash to one of its `known_hashes` is not decoded: its result has
        `reused` set. Release each result's slot once its pixels are copied out. With
        `consumer_thread`, results are released by another thread: when all shared memory is
        held, wait for it rather than report a consumer that never releases."""
        pending: collections.deque[Item] = collections.deque()
        source = iter(items)
        exhausted = False
        while True:
            idle = False  # the source had nothing right now (it yields None; see feed.Feed)
            wanted = self.n_workers * TASKS_PER_WORKER * self._files_per_task()
            while not exhausted and len(pending) < wanted:
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
            if not any(w.tasks for w in self._workers):
                if exhausted and not pending:
                    return
                if not self._free and not consumer_thread:
                    raise RuntimeError("all decode slots are held: release() each result after copying it")
                if idle or not self._free:
                    time.sleep(0.002)
                continue
            yield from self._collect(pending)

    def _files_per_task(self) -> int:
        by_time = TASK_SECONDS / max(self._seconds_per_file, 1e-6)
        by_room = 0.8 * len(self._regions[0]) / max(self._bytes_per_file, 1)  # a full region sends files back
        return max(1, min(MAX_FILES_PER_TASK, int(by_time), int(by_room)))

    def _dispatch(self, pending: collections.deque[Item]) -> None:
        size = self._files_per_task()
        for worker in sorted(self._workers, key=lambda w: len(w.tasks)):
            while pending and self._free and len(worker.tasks) < TASKS_PER_WORKER:
                items = [pending.popleft() for _ in range(min(size, len(pending)))]
                task = _Task(self._next_id, self._free.pop(), items)
                self._next_id += 1
                if not worker.tasks:
                    worker.current_since = time.monotonic()
                worker.tasks.append(task)
                files = [(path, known_hashes, self.gpu_jpeg and not cpu_only and path.lower().endswith(JPEG_SUFFIXES))
                         for _, path, known_hashes, *cpu_only in items]
                worker.conn.send((task.task_id, task.region, files))

    def _since(self, worker: _Worker) -> float:
        """When the file in hand started: the worker's own note once it is on the head task."""
        task_id, _, started = worker.progress[:]
        return started if int(task_id) == worker.tasks[0].task_id else worker.current_since

    def _collect(self, pending: collections.deque[Item]) -> Iterator[DecodeResult]:
        busy = [w for w in self._workers if w.tasks]
        now = time.monotonic()
        wait_s = max(0.0, min(self._since(w) + self.timeout_s - now for w in busy))
        for key, _ in self._selector.select(timeout=wait_s):
            worker = key.data
            if key.fileobj is worker.conn and worker in self._workers:
                try:
                    while worker.tasks and worker.conn.poll():
                        results = self._receive(worker, pending)
                        self._dispatch(pending)  # refill before the consumer takes its time
                        yield from results
                    continue
                except (EOFError, OSError):
                    pass  # the pipe broke: the worker died mid-send; handled below
            if worker in self._workers and not worker.process.is_alive():
                worker.process.join(1)  # reap it, so exitcode is known
                # Replies it sent before dying may still sit in the pipe: take them first, or a file
                # it finished would be blamed for the crash.
                yield from self._drain(worker, pending)
                reason = f"decoder crashed (exit code {worker.process.exitcode})"
                if worker.tasks:
                    yield self._replace(worker, pending, reason)
                else:  # it died idle: nothing to blame, start another
                    log.warning("a decode worker died idle (%s); starting a new one", reason)
                    self._retire(worker)
                    self._workers[self._workers.index(worker)] = self._start_worker()
        now = time.monotonic()
        for worker in [w for w in self._workers if w.tasks]:
            if now - self._since(worker) > self.timeout_s:
                worker.process.kill()
                worker.process.join()
                yield self._replace(worker, pending, f"timeout: decoding took longer than {self.timeout_s:g} s")

    def _drain(self, worker: _Worker, pending: collections.deque[Item]) -> Iterator[DecodeResult]:
        try:
            while worker.tasks and worker.conn.poll():
                yield from self._receive(worker, pending)
        except (EOFError, OSError):
            pass  # the rest of the pipe is a message cut short by the death

    def _receive(self, worker: _Worker, pending: collections.deque[Item]) -> list[DecodeResult]:
        task_id, replies = worker.conn.recv()
        task = worker.tasks.popleft()
        assert task.task_id == task_id, "decode results arrive in the order they were sent"
        self._crashes_in_a_row = 0
        worker.current_since = time.monotonic()
        region = self._regions[task.region]
        results, spent, used = [], 0.0, 0
        for (key, path, *_), reply in zip(task.items, replies):
            kind = reply[0]
            if kind == "pixels":
                _, offset, shape, width, height, digest, decode_s = reply
                pixels = region[offset:offset + int(np.prod(shape))].reshape(shape)
                results.append(DecodeResult(key, pixels, task.region, width, height, digest, decode_s=decode_s))
                used += pixels.size
            elif kind == "jpeg":
                _, offset, size, width, height, orientation, digest, decode_s = reply
                # Copied out, so the region is not held for it; a bytearray, which torch wraps without a copy.
                data = bytearray(region[offset:offset + size])
                used += size
                results.append(DecodeResult(key, None, None, width, height, digest, decode_s=decode_s, jpeg=data,
                                            orientation=orientation, path=path))
            elif kind == "reuse":
                results.append(DecodeResult(key, None, None, content_hash=reply[1], reused=True))
            else:
                results.append(DecodeResult(key, None, None, error=reply[1], decode_s=reply[2]))
            spent += results[-1].decode_s
        pending.extendleft(reversed(task.items[len(replies):]))  # the region filled up: they go out again
        if replies:
            self._seconds_per_file += 0.2 * (spent / len(replies) - self._seconds_per_file)
            self._bytes_per_file += 0.2 * (used / len(replies) - self._bytes_per_file)
        self._hold(task.region, sum(r.pixels is not None for r in results))
        return results

    def _hold(self, region: int, holders: int) -> None:
        self._holders[region] = holders
        if holders == 0:
            self._free.append(region)

    def _replace(self, worker: _Worker, pending: collections.deque[Item], reason: str) -> DecodeResult:
        """The file in hand killed or hung its worker: record it, requeue the rest, start a new worker."""
        self.crashes += 1
        self._crashes_in_a_row += 1
        if self._crashes_in_a_row > max(4, 2 * self.n_workers):
            raise RuntimeError(f"decode workers keep dying ({self._crashes_in_a_row} in a row, last: {reason})")
        head = worker.tasks[0]
        task_id, in_hand, _ = worker.progress[:]
        in_hand = int(in_hand) if int(task_id) == head.task_id else 0
        culprit = head.items[in_hand]
        log.warning("%s: %s; starting a new decode worker", culprit[1], reason)
        # The others go out again, the GPU path open to them (a file that failed there carries its flag).
        requeue = head.items[:in_hand] + head.items[in_hand + 1:] + [i for t in list(worker.tasks)[1:] for i in t.items]
        pending.extendleft(reversed(requeue))
        for task in worker.tasks:
            self._free.append(task.region)
        self._retire(worker)
        self._workers[self._workers.index(worker)] = self._start_worker()
        return DecodeResult(culprit[0], None, None, error=reason)
