"""The decode process pool: tasks of several files in order, results as they finish, crashes and hangs as errors."""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import selectors
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.decode import reasons
from pipeline.decode.jpeg_probe import JPEG_SUFFIXES
from pipeline.decode.regions import Regions, region_bytes
from pipeline.decode.spec import InputSpec
from pipeline.decode.worker import worker_main
from pipeline.records import DecodeResult, Item

log = logging.getLogger(__name__)

# A task is several files with one reply, so the main process pays its per-message costs (pickling,
# pipe, select) once per task: one message per file held the GPU path near 2,000 files/s under the GIL.
TASKS_PER_WORKER = 3  # one decoding, two queued: a worker never waits on the main process
TASK_SECONDS = 0.05  # files per task are sized to about this much worker time...
MAX_FILES_PER_TASK = 32  # ...within these bounds, so the last tasks of a run end close together


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

    def since(self) -> float:
        """When the file in hand started: the worker's own note once it is on the head task."""
        task_id, _, started = self.progress[:]
        return started if int(task_id) == self.tasks[0].task_id else self.current_since

    def in_hand(self) -> int:
        """Which file of the head task the worker is on (0 until it has noted one)."""
        task_id, index, _ = self.progress[:]
        return int(index) if int(task_id) == self.tasks[0].task_id else 0


class _Processes:
    """The worker processes, the selector that waits on their pipes and exits, and the blame when one dies."""

    def __init__(self, n_workers: int, args: tuple[Any, ...], ctx: Any) -> None:
        self._ctx, self._args = ctx, args
        self.selector = selectors.DefaultSelector()  # kept: building one per wait cost ~70 us a call
        self.workers = [self._start() for _ in range(n_workers)]
        self._next_id = 0
        self.crashes = 0
        self._crashes_in_a_row = 0  # a pool whose workers die at start-up must fail, not error every file

    def _start(self) -> _Worker:
        conn, child_conn = self._ctx.Pipe()
        progress = self._ctx.RawArray("d", [-1.0, 0.0, 0.0])  # no task yet
        process = self._ctx.Process(target=worker_main, args=(child_conn, progress, *self._args), daemon=True)
        process.start()
        child_conn.close()
        worker = _Worker(conn, process, progress)
        self.selector.register(conn, selectors.EVENT_READ, worker)
        self.selector.register(process.sentinel, selectors.EVENT_READ, worker)
        return worker

    def restart(self, worker: _Worker) -> None:
        self.selector.unregister(worker.conn)
        self.selector.unregister(worker.process.sentinel)
        worker.conn.close()
        self.workers[self.workers.index(worker)] = self._start()

    def send_tasks(self, pending: collections.deque[Item], regions: Regions, size: int, gpu_jpeg: bool) -> None:
        """Tasks of `size` files to the least loaded workers, while a worker has room and a region is free."""
        for worker in sorted(self.workers, key=lambda w: len(w.tasks)):
            while pending and regions.free and len(worker.tasks) < TASKS_PER_WORKER:
                items = [pending.popleft() for _ in range(min(size, len(pending)))]
                task = _Task(self._next_id, regions.free.pop(), items)
                self._next_id += 1
                if not worker.tasks:
                    worker.current_since = time.monotonic()
                worker.tasks.append(task)
                files = [(path, known_hashes, gpu_jpeg and not cpu_only and path.lower().endswith(JPEG_SUFFIXES))
                         for _, path, known_hashes, *cpu_only in items]
                worker.conn.send((task.task_id, task.region, files))

    def replied(self) -> None:
        self._crashes_in_a_row = 0

    def blame(self, worker: _Worker, reason: str, pending: collections.deque[Item], regions: Regions) -> DecodeResult:
        """The file in hand killed or hung its worker: record it, requeue the rest, start a new worker."""
        self.crashes += 1
        self._crashes_in_a_row += 1
        if self._crashes_in_a_row > max(4, 2 * len(self.workers)):
            raise RuntimeError(f"decode workers keep dying ({self._crashes_in_a_row} in a row, last: {reason})")
        head, in_hand = worker.tasks[0], worker.in_hand()
        culprit = head.items[in_hand]
        log.warning("%s: %s; starting a new decode worker", culprit[1], reason)
        # The others go out again, the GPU path open to them (a file that failed there carries its flag).
        requeue = head.items[:in_hand] + head.items[in_hand + 1:] + [i for t in list(worker.tasks)[1:] for i in t.items]
        pending.extendleft(reversed(requeue))
        for task in worker.tasks:
            regions.free.append(task.region)
        self.restart(worker)
        return DecodeResult(culprit[0], None, None, error=reason)

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.selector.close()


class _TaskSizer:
    """Files per task, from a worker's seconds and output bytes per file, smoothed over the tasks so far."""

    def __init__(self, region_bytes: int) -> None:
        self.region_bytes = region_bytes
        self.seconds_per_file, self.bytes_per_file = TASK_SECONDS / 4, region_bytes / 8

    def files_per_task(self) -> int:
        by_time = TASK_SECONDS / max(self.seconds_per_file, 1e-6)
        by_room = 0.8 * self.region_bytes / max(self.bytes_per_file, 1)  # a full region sends files back
        return max(1, min(MAX_FILES_PER_TASK, int(by_time), int(by_room)))

    def observe(self, n_files: int, spent: float, used: int) -> None:
        if n_files:
            self.seconds_per_file += 0.2 * (spent / n_files - self.seconds_per_file)
            self.bytes_per_file += 0.2 * (used / n_files - self.bytes_per_file)


def _results_of(task: _Task, replies: list[tuple[Any, ...]],
                region: np.ndarray) -> tuple[list[DecodeResult], float, int]:
    """A task's replies -> its results, the worker seconds they took and the region bytes they fill."""
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
            # A view into the region, which the result holds until nvJPEG has read it (feed.Feed releases it):
            # copying 4,000 JPEGs out held the GIL 42 us a file here (fresh pages), a third of the main process.
            data = region[offset:offset + size]
            used += size
            results.append(DecodeResult(key, None, task.region, width, height, digest, decode_s=decode_s, jpeg=data,
                                        orientation=orientation, path=path))
        elif kind == "reuse":
            results.append(DecodeResult(key, None, None, content_hash=reply[1], reused=True))
        else:
            results.append(DecodeResult(key, None, None, error=reply[1], decode_s=reply[2]))
        spent += results[-1].decode_s
    return results, spent, used


def regions_per_worker(gpu_jpeg_bytes: int) -> int:
    """Shared-memory regions per worker: its tasks in flight, twice over (results the encoder has not copied
    yet hold theirs); JPEGs queued for the GPU hold their tasks' regions too, so a third more with nvJPEG."""
    return TASKS_PER_WORKER * (3 if gpu_jpeg_bytes else 2)


def _take(source: Iterator[Item | None], pending: collections.deque[Item], wanted: int) -> str:
    """Items from `source` until `pending` holds `wanted` ("full"); "idle" when the source has nothing
    right now (it yields None; see feed.Feed), "exhausted" when it has ended."""
    while len(pending) < wanted:
        try:
            item = next(source)
        except StopIteration:
            return "exhausted"
        if item is None:
            return "idle"
        pending.append(item)
    return "full"


class DecodePool:
    """A fixed number of decode processes fed tasks in order; results come back as tasks finish."""

    def __init__(self, spec: InputSpec, workers: int, max_image_pixels: int, timeout_s: float = 60.0,
                 jpeg_draft: bool = True, n_regions: int | None = None, gpu_jpeg_bytes: int = 0,
                 max_worker_mb: int | None = None) -> None:
        """`gpu_jpeg_bytes` > 0: JPEGs up to that size that the GPU decoder takes come back as bytes
        (DecodeResult.jpeg) while `gpu_room` is set (see feed.Feed). `n_regions`: shared-memory
        regions (one per task in flight, plus those whose results the consumer still holds).
        `max_worker_mb`: the memory each worker may add to its size at start (limits.py; None: unbounded)."""
        self.spec, self.timeout_s = spec, timeout_s
        self.n_workers = max(1, workers)
        self.gpu_jpeg = gpu_jpeg_bytes > 0
        n_bytes = region_bytes(spec, gpu_jpeg_bytes)
        self.regions = Regions(n_regions or self.n_workers * regions_per_worker(gpu_jpeg_bytes), n_bytes)
        self.n_regions = self.regions.n_regions
        ctx = mp.get_context("spawn")  # the main process holds CUDA and threads: never fork it
        self.gpu_room = ctx.RawValue("b", 1)  # cleared while the GPU decoder is backed up
        args = (self.regions.name, n_bytes, self.n_regions, spec, max_image_pixels, jpeg_draft, self.gpu_room,
                max_worker_mb)
        self.processes = _Processes(self.n_workers, args, ctx)
        self._sizer = _TaskSizer(n_bytes)

    @property
    def crashes(self) -> int:
        return self.processes.crashes

    def close(self) -> None:
        self.processes.close()
        self.regions.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.processes.workers if w.process.pid is not None]

    def release(self, slot: int | None) -> None:
        """Give a result's hold on its shared-memory region back once its pixels have been copied out."""
        self.regions.release(slot)

    def imap(self, items: Iterable[Item], consumer_thread: bool = False) -> Iterator[DecodeResult]:
        """Decode (key, path, known_hashes) items; yields results in completion order.

        A file whose bytes hash to one of its `known_hashes` is not decoded: its result has
        `reused` set. Release each result's slot once its pixels are copied out. With
        `consumer_thread`, results are released by another thread: when all shared memory is
        held, wait for it rather than report a consumer that never releases."""
        pending: collections.deque[Item] = collections.deque()
        source = iter(items)
        state = "full"
        while True:
            wanted = self.n_workers * TASKS_PER_WORKER * self._sizer.files_per_task()
            state = "exhausted" if state == "exhausted" else _take(source, pending, wanted)
            self._dispatch(pending)
            if not any(w.tasks for w in self.processes.workers):
                if state == "exhausted" and not pending:
                    return
                if not self.regions.free and not consumer_thread:
                    raise RuntimeError("all decode slots are held: release() each result after copying it")
                if state == "idle" or not self.regions.free:
                    time.sleep(0.002)
                continue
            yield from self._collect(pending)

    def _dispatch(self, pending: collections.deque[Item]) -> None:
        self.processes.send_tasks(pending, self.regions, self._sizer.files_per_task(), self.gpu_jpeg)

    def _collect(self, pending: collections.deque[Item]) -> Iterator[DecodeResult]:
        """Results of the tasks that finished; an error row for the file in hand of a worker that died or hung."""
        busy = [w for w in self.processes.workers if w.tasks]
        wait_s = max(0.0, min(w.since() + self.timeout_s - time.monotonic() for w in busy))
        for key, _ in self.processes.selector.select(timeout=wait_s):
            worker = key.data
            if key.fileobj is worker.conn and worker in self.processes.workers:
                try:
                    while worker.tasks and worker.conn.poll():
                        results = self._receive(worker, pending)
                        self._dispatch(pending)  # refill before the consumer takes its time
                        yield from results
                    continue
                except (EOFError, OSError):
                    pass  # the pipe broke: the worker died mid-send; handled below
            if worker in self.processes.workers and not worker.process.is_alive():
                worker.process.join(1)  # reap it, so exitcode is known
                # Replies it sent before dying may still sit in the pipe: take them first, or a file
                # it finished would be blamed for the crash.
                yield from self._drain(worker, pending)
                reason = reasons.crashed(worker.process.exitcode)
                if worker.tasks:
                    yield self.processes.blame(worker, reason, pending, self.regions)
                else:  # it died idle: nothing to blame, start another
                    log.warning("a decode worker died idle (%s); starting a new one", reason)
                    self.processes.restart(worker)
        now = time.monotonic()
        for worker in [w for w in self.processes.workers if w.tasks]:
            if now - worker.since() > self.timeout_s:
                worker.process.kill()
                worker.process.join()
                reason = reasons.timed_out(self.timeout_s)
                yield self.processes.blame(worker, reason, pending, self.regions)

    def _drain(self, worker: _Worker, pending: collections.deque[Item]) -> Iterator[DecodeResult]:
        try:
            while worker.tasks and worker.conn.poll():
                yield from self._receive(worker, pending)
        except (EOFError, OSError):
            pass  # the rest of the pipe is a message cut short by the death

    def _receive(self, worker: _Worker, pending: collections.deque[Item]) -> list[DecodeResult]:
        task_id, replies, said = worker.conn.recv()
        task = worker.tasks.popleft()
        assert task.task_id == task_id, "decode results arrive in the order they were sent"
        for index, words in said:  # libtiff's and PIL's words on a file: for --verbose, never raw on stderr
            log.debug("%s: the decoder said: %s", task.items[index][1], words)
        self.processes.replied()
        worker.current_since = time.monotonic()
        results, spent, used = _results_of(task, replies, self.regions.views[task.region])
        pending.extendleft(reversed(task.items[len(replies):]))  # the region filled up: they go out again
        self._sizer.observe(len(replies), spent, used)
        self.regions.hold(task.region, sum(r.slot is not None for r in results))
        return results
