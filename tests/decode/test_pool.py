"""DecodePool: one result per file, crashes and hangs become error results, shared memory is cleaned up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.decode.pool import MAX_FILES_PER_TASK, DecodePool
from pipeline.decode.spec import InputSpec
from tests.conftest import HOSTILE, HOSTILE_EMBEDDED, HOSTILE_ERRORS

SPEC = InputSpec("shortest_edge", (64, 64), (64, 64))
MAX_PIXELS = 100_000_000
HOSTILE_FILES = sorted(HOSTILE_EMBEDDED + HOSTILE_ERRORS)


def shm_path(pool: DecodePool) -> Path:
    return Path("/dev/shm") / pool.regions.name.lstrip("/")


def run_pool(pool: DecodePool, names: list[str] = HOSTILE_FILES) -> dict[str, list[str | tuple]]:
    """Decode the hostile files by name; per name, the list of outcomes: an error string or the pixel shape."""
    outcomes: dict[str, list[str | tuple]] = {}
    for result in pool.imap((name, str(HOSTILE / name), None) for name in names):
        if result.error is None:
            pixels = np.array(result.pixels)  # copy out of shared memory before the slot is released
            assert pixels.dtype == np.uint8
            assert result.width > 0 and result.height > 0 and result.content_hash
            outcomes.setdefault(result.key, []).append(pixels.shape)
        else:
            assert result.pixels is None and result.slot is None
            outcomes.setdefault(result.key, []).append(result.error)
        pool.release(result.slot)
    return outcomes


def assert_hostile_outcomes(outcomes: dict[str, list], special: dict[str, str] | None = None) -> None:
    """Exactly one result per file; valid files have pixels, broken ones an error, `special` ones that error."""
    special = special or {}
    assert sorted(outcomes) == HOSTILE_FILES
    assert all(len(results) == 1 for results in outcomes.values()), outcomes
    for name, (outcome,) in outcomes.items():
        if name in special:
            assert isinstance(outcome, str) and special[name] in outcome, (name, outcome)
        elif name in HOSTILE_EMBEDDED:
            assert outcome == SPEC.output_shape, (name, outcome)
        else:
            assert isinstance(outcome, str) and outcome, (name, outcome)


def test_pool_returns_one_result_per_hostile_file() -> None:
    with DecodePool(SPEC, workers=2, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        assert_hostile_outcomes(run_pool(pool))
        assert pool.crashes == 0


def test_pool_reports_decode_reasons() -> None:
    with DecodePool(SPEC, workers=2, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        outcomes = run_pool(pool, ["zero_bytes.png", "decompression_bomb_400mpx.png", "plain.bmp"])
    assert outcomes["zero_bytes.png"] == ["empty file"]
    assert outcomes["decompression_bomb_400mpx.png"] == ["too many pixels: 400000000 > 100000000"]
    assert outcomes["plain.bmp"] == [SPEC.output_shape]


def test_pool_pixels_match_a_direct_decode() -> None:
    from pipeline.decode.image import decode_file

    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        for result in pool.imap([("cmyk", str(HOSTILE / "cmyk.jpg"), None)]):
            pixels = np.array(result.pixels)
            pool.release(result.slot)
    assert np.array_equal(pixels, decode_file(str(HOSTILE / "cmyk.jpg"), SPEC, MAX_PIXELS).pixels)


def test_worker_crash_becomes_an_error_and_the_rest_is_processed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBINDEX_FAULT", "crash:plain.bmp")  # before the pool spawns its workers
    with DecodePool(SPEC, workers=2, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        outcomes = run_pool(pool)
        assert pool.crashes == 1
    assert_hostile_outcomes(outcomes, {"plain.bmp": "crashed"})


def test_worker_hang_becomes_a_timeout_and_the_rest_is_processed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBINDEX_FAULT", "hang:plain.bmp")
    with DecodePool(SPEC, workers=2, max_image_pixels=MAX_PIXELS, timeout_s=2) as pool:
        outcomes = run_pool(pool)
        assert pool.crashes == 1
    assert_hostile_outcomes(outcomes, {"plain.bmp": "timeout"})


def test_pool_replaces_a_crashed_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBINDEX_FAULT", "crash:plain.bmp")
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        before = pool.pids()
        outcomes = run_pool(pool, ["plain.bmp", "Mixed.Png", "cmyk.jpg"])
        after = pool.pids()
    assert "crashed" in outcomes["plain.bmp"][0]
    assert outcomes["Mixed.Png"] == outcomes["cmyk.jpg"] == [SPEC.output_shape]
    assert len(after) == 1 and after != before


def test_unreleased_slots_are_reported_not_deadlocked() -> None:
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30, n_regions=1) as pool:
        stream = pool.imap([(n, str(HOSTILE / "plain.bmp"), None) for n in range(2 * MAX_FILES_PER_TASK)])
        held = []
        with pytest.raises(RuntimeError, match="release"):
            for result in stream:  # never released: the one region stays held after the first task
                assert result.error is None
                held.append(result)
        assert 0 < len(held) <= MAX_FILES_PER_TASK


def test_close_unlinks_the_shared_memory() -> None:
    pool = DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30)
    path = shm_path(pool)
    try:
        assert path.exists()
        run_pool(pool, ["plain.bmp"])
    finally:
        pool.close()
    assert not path.exists()
    assert not any(worker.process.is_alive() for worker in pool.processes.workers)


def test_close_after_a_crash_unlinks_the_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBINDEX_FAULT", "crash:plain.bmp")
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        path = shm_path(pool)
        run_pool(pool, ["plain.bmp", "Mixed.Png"])
    assert not path.exists()



def test_known_hash_skips_the_decode() -> None:
    """A file whose bytes hash to a known vector comes back `reused`, without pixels."""
    from pipeline.decode.image import content_hash

    digest = content_hash((HOSTILE / "cmyk.jpg").read_bytes())
    with DecodePool(SPEC, 1, MAX_PIXELS) as pool:
        results = list(pool.imap([("cmyk", str(HOSTILE / "cmyk.jpg"), frozenset({digest})),
                                  ("bmp", str(HOSTILE / "plain.bmp"), frozenset({digest}))]))
        by_key = {r.key: r for r in results}
        assert by_key["cmyk"].reused and by_key["cmyk"].pixels is None and by_key["cmyk"].content_hash == digest
        assert not by_key["bmp"].reused and by_key["bmp"].pixels is not None
        for result in results:
            pool.release(result.slot)


def test_a_full_region_sends_the_rest_of_a_task_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.decode.regions as regions

    # Room for three outputs per task, while tasks hold four files at first: the fourth comes back.
    monkeypatch.setattr(regions, "REGION_BYTES", 3 * regions.slot_bytes(SPEC))
    names = ["plain.bmp", "Mixed.Png", "cmyk.jpg", "exif_orientation_6.jpg"] * 5
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        assert pool.regions.n_bytes == 3 * regions.slot_bytes(SPEC)
        outcomes = {}
        for result in pool.imap((n, str(HOSTILE / name), None) for n, name in enumerate(names)):
            assert result.error is None
            outcomes[result.key] = np.array(result.pixels)
            pool.release(result.slot)
    assert sorted(outcomes) == list(range(len(names)))
    for n, name in enumerate(names):
        assert np.array_equal(outcomes[n], outcomes[names.index(name)])


def test_a_crash_in_the_middle_of_a_task_blames_the_file_in_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBINDEX_FAULT", "crash:plain.bmp")
    names = ["Mixed.Png", "cmyk.jpg", "plain.bmp", "exif_orientation_6.jpg", "Mixed.Png", "cmyk.jpg"]
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        results = list(pool.imap((n, str(HOSTILE / name), None) for n, name in enumerate(names)))
        for result in results:
            pool.release(result.slot)
    assert sorted(r.key for r in results) == list(range(len(names)))  # one result each, none lost
    errors = {r.key: r.error for r in results if r.error}
    assert list(errors) == [2] and "crashed" in errors[2]


def test_a_small_dev_shm_gets_fewer_regions_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import pipeline.decode.regions as regions

    region = regions.region_bytes(SPEC)
    room = os.statvfs_result((4096, 4096, 0, 0, int(3 * region / 0.8 / 4096) + 1, 0, 0, 0, 0, 255))
    monkeypatch.setattr(regions.os, "statvfs", lambda path: room)  # a container's /dev/shm: 3 regions
    with DecodePool(SPEC, workers=2, max_image_pixels=MAX_PIXELS, timeout_s=30) as pool:
        assert pool.n_regions == 3
        assert_hostile_outcomes(run_pool(pool))
