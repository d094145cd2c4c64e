"""MemoryProbe: the host figure counts pages shared between the main process and its workers once."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Iterator
from multiprocessing.synchronize import Event

import psutil
import pytest

from pipeline.report import MemoryProbe, read_memory

BLOCK_MB = 200
N_CHILDREN = 3
MB = 1024 * 1024


def _read_block_and_wait(block: bytearray, ready: Event, done: Event) -> None:
    block.count(2)  # reads every page of the inherited block: shared, copy-on-write pages in this RSS
    ready.set()
    done.wait(30)


@pytest.fixture
def forked_readers() -> Iterator[bytearray]:
    """N_CHILDREN forked children that have each read a 200 MB block the parent wrote, and wait."""
    block = bytearray(b"\x01") * (BLOCK_MB * MB)  # written, so resident in the parent
    ctx = mp.get_context("fork")
    done = ctx.Event()
    readies = [ctx.Event() for _ in range(N_CHILDREN)]
    children = [ctx.Process(target=_read_block_and_wait, args=(block, ready, done)) for ready in readies]
    for child in children:
        child.start()
    try:
        for ready in readies:
            assert ready.wait(30)
        yield block
    finally:
        done.set()
        for child in children:
            child.join(10)


@pytest.mark.skipif(sys.platform != "linux", reason="fork and PSS: Linux")
def test_shared_pages_count_once(forked_readers: bytearray) -> None:
    probe = MemoryProbe()
    probe.sample()
    children = psutil.Process().children(recursive=True)
    assert len(children) >= N_CHILDREN
    naive_mb = (psutil.Process().memory_info().rss + sum(c.memory_info().rss for c in children)) / MB
    assert naive_mb > (N_CHILDREN + 1) * BLOCK_MB  # each child's RSS holds the whole block

    main_mb = probe.peak_main_rss_mb
    assert main_mb > BLOCK_MB
    assert probe.peak_workers_rss_mb > N_CHILDREN * BLOCK_MB  # plain RSS, as the name says
    # True use: the parent (block included) plus a few MB of private pages a child (interpreter state, stacks).
    assert main_mb <= probe.peak_host_rss_mb < main_mb + N_CHILDREN * 30
    assert probe.peak_host_rss_mb < 0.5 * naive_mb
    assert probe.peak_host_pss_mb is not None
    assert BLOCK_MB < probe.peak_host_pss_mb < main_mb + N_CHILDREN * 30


@pytest.mark.skipif(sys.platform != "linux", reason="fork and PSS: Linux")
def test_between_full_reads_the_shared_part_is_kept(forked_readers: bytearray) -> None:
    probe = MemoryProbe()
    probe.sample()
    full_mb = probe.peak_host_rss_mb
    probe.peak_host_rss_mb = 0.0
    probe.sample(full=False)  # RSS only: each worker less the shared part its full read found
    assert 0.8 * full_mb < probe.peak_host_rss_mb < full_mb + N_CHILDREN * 10


def test_refused_smaps_falls_back_to_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: psutil.Process) -> None:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_full_info", refuse)
    rss = psutil.Process().memory_info().rss
    reading = read_memory(psutil.Process())
    assert reading is not None
    assert reading[0] == reading[1] and reading[2] is None and abs(reading[0] - rss) < 50 * MB
    probe = MemoryProbe()
    probe.sample()
    assert probe.peak_host_rss_mb > 0 and probe.peak_host_pss_mb is None


def test_exited_process_reads_none() -> None:
    child = mp.get_context("spawn").Process(target=int)
    child.start()
    process = psutil.Process(child.pid)
    child.join(30)
    assert read_memory(process) is None


def test_probe_thread_keeps_peaks() -> None:
    with MemoryProbe() as probe:
        pass
    assert probe.peak_host_rss_mb >= probe.peak_main_rss_mb > 0
    if sys.platform == "linux":
        assert probe.peak_host_pss_mb is not None and probe.peak_host_pss_mb > 0
