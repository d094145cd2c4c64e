"""End to end through the CLI: the shared photos plus the hostile folder, reruns, bad configs, the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import pyarrow.dataset as ds
import pytest

from tests.conftest import (
    HOSTILE,
    HOSTILE_EMBEDDED,
    HOSTILE_ERRORS,
    HOSTILE_SKIPPED,
    IMAGES,
    REPO,
    run_cli,
    write_config,
)

SPEC_REPORT_FIELDS = [
    "run_id", "started_at", "finished_at", "model", "device", "gpu_name", "batch_size", "files_scanned", "files_new",
    "files_changed", "files_deleted", "files_unchanged", "images_embedded", "errors", "wall_s", "stage_s",
    "images_per_s", "peak_vram_allocated_mb", "peak_vram_reserved_mb", "peak_host_rss_mb", "output_rows",
    "storage_bytes",
]


def _tables(folder: Path) -> tuple:
    db = lancedb.connect(str(folder / "index"))
    return db.open_table("images").to_arrow(), db.open_table("images_errors").to_arrow()


def _latest_report(folder: Path) -> dict:
    reports = sorted((folder / "runs").glob("*/report.json"))
    return json.loads(reports[-1].read_text())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    """One run over the 400 photos and the hostile folder (two roots), shared by the checks below."""
    folder = tmp_path_factory.mktemp("e2e")
    config = write_config(folder, [str(IMAGES), str(HOSTILE)], str(tiny_models / "clip"))
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "SMOKE TEST" in result.stderr
    return folder


def test_every_valid_image_is_one_row(indexed: Path) -> None:
    images, _ = _tables(indexed)
    assert images.num_rows == 400 + len(HOSTILE_EMBEDDED)
    keys = list(zip(images["root"].to_pylist(), images["path"].to_pylist()))
    assert len(set(keys)) == len(keys)
    hostile_rows = {p for r, p in keys if r == str(HOSTILE)}
    assert hostile_rows == set(HOSTILE_EMBEDDED)
    assert {p for r, p in keys if r == str(IMAGES)} == set(os.listdir(IMAGES))


def test_broken_files_are_error_rows_with_reasons(indexed: Path) -> None:
    _, errors = _tables(indexed)
    reasons = dict(zip(errors["path"].to_pylist(), errors["error"].to_pylist()))
    assert set(reasons) == set(HOSTILE_ERRORS)
    assert reasons["zero_bytes.png"] == "empty file"
    assert reasons["truncated_half.jpg"] == "truncated file"
    assert reasons["decompression_bomb_400mpx.png"] == "too many pixels: 400000000 > 100000000"
    assert all(reason for reason in reasons.values())
    assert set(errors["attempts"].to_pylist()) == {1}


def test_skipped_files_appear_nowhere(indexed: Path) -> None:
    images, errors = _tables(indexed)
    everything = set(images["path"].to_pylist()) | set(errors["path"].to_pylist())
    assert not everything & set(HOSTILE_SKIPPED)


def test_parquet_holds_the_same_rows(indexed: Path) -> None:
    images, errors = _tables(indexed)
    parquet_images = ds.dataset(indexed / "embeddings" / "images").to_table()
    parquet_errors = ds.dataset(indexed / "embeddings" / "images_errors").to_table()
    assert sorted(zip(parquet_images["root"].to_pylist(), parquet_images["path"].to_pylist())) == sorted(
        zip(images["root"].to_pylist(), images["path"].to_pylist()))
    assert sorted(parquet_errors["path"].to_pylist()) == sorted(errors["path"].to_pylist())
    assert parquet_images.schema.field("embedding").type == images.schema.field("embedding").type


def test_exif_orientation_is_applied(indexed: Path) -> None:
    images, _ = _tables(indexed)
    row = [r for r in images.to_pylist() if r["path"] == "exif_orientation_6.jpg"][0]
    assert (row["width"], row["height"]) == (200, 400)


def test_schema_and_normalised_vectors(indexed: Path) -> None:
    import numpy as np

    images, _ = _tables(indexed)
    for name in ("path", "root", "size_bytes", "mtime_ns", "content_hash", "width", "height", "model", "embedding",
                 "indexed_at"):
        assert name in images.column_names
    assert str(images.schema.field("size_bytes").type) == "int64"
    assert str(images.schema.field("width").type) == "int32"
    vectors = np.stack(images["embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_report_has_every_spec_field(indexed: Path) -> None:
    report = _latest_report(indexed)
    for name in SPEC_REPORT_FIELDS:
        assert name in report, name
    assert report["files_scanned"] == 425 and report["files_new"] == 425
    assert report["images_embedded"] == 418
    assert sum(report["errors"].values()) == 7
    assert set(report["stage_s"]) >= {"scan", "decode", "encode", "write"}
    assert report["peak_host_rss_mb"] > 0 and report["output_rows"] == 418 and report["storage_bytes"] > 0
    assert (sorted((indexed / "runs").glob("*/report.md"))[-1]).read_text().startswith("# embindex run")


def test_second_run_embeds_nothing(indexed: Path) -> None:
    result = run_cli("run", str(indexed / "config.yaml"), "--quiet")
    assert result.returncode == 0, result.stderr
    report = _latest_report(indexed)
    assert report["images_embedded"] == 0 and report["files_unchanged"] == 425 and report["errors"] == {}
    # The model was only described: the report says so, and charges no loading to it.
    assert not report["model_loaded"] and report["model_load_s"] == 0.0 and report["describe_s"] > 0
    assert "model described, not loaded" in (sorted((indexed / "runs").glob("*/report.md"))[-1]).read_text()
    images, errors = _tables(indexed)
    assert images.num_rows == 418 and errors.num_rows == 7


def test_report_command_prints_the_latest(indexed: Path) -> None:
    result = run_cli("report", str(indexed / "config.yaml"))
    assert result.returncode == 0
    assert result.stdout.startswith("# embindex run")


@pytest.mark.parametrize(
    ("extra", "overrides", "key"),
    [
        ({"encoder": {"batch_sise": 4}}, [], "encoder.batch_sise"),
        ({"encoder": {"batch_size": "lots"}}, [], "encoder.batch_size"),
        ({"input": {"root": "./missing-folder"}}, [], "input.root"),
        ({}, ["--set", "decode.workers=-1"], "decode.workers"),
    ],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path: Path, extra: dict, overrides: list, key: str) -> None:
    config = write_config(tmp_path, str(IMAGES), "./no-model", **extra)
    before = set(tmp_path.iterdir())
    result = run_cli("run", str(config), *overrides)
    assert result.returncode == 2
    assert key in result.stderr
    assert set(tmp_path.iterdir()) == before


def test_missing_local_model_exits_1_with_advice(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), "./models/absent")
    result = run_cli("run", str(config))
    assert result.returncode == 1
    assert "encoder.model" in result.stderr and "Traceback" not in result.stderr


def test_error_rate_over_the_limit_exits_4(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(HOSTILE), str(tiny_models / "clip"), run={"max_error_rate": 0.1})
    result = run_cli("run", str(config), "--quiet")
    assert result.returncode == 4, result.stderr  # 7 of 25 files are broken: 28%
    assert "max_error_rate" in result.stderr


def test_second_concurrent_run_exits_3(tmp_path: Path, tiny_models: Path) -> None:
    from pipeline.index.lock import IndexLock

    config = write_config(tmp_path, str(HOSTILE), str(tiny_models / "clip"))
    with IndexLock(str(tmp_path / "index")):
        result = run_cli("run", str(config), "--quiet")
    assert result.returncode == 3
    assert f"pid {os.getpid()}" in result.stderr


def test_lock_of_a_killed_run_does_not_block(tmp_path: Path, tiny_models: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.index.lock import IndexLock; "
        "IndexLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"),
        str(REPO), str(tmp_path / "index")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    time.sleep(0.1)
    config = write_config(tmp_path, str(HOSTILE), str(tiny_models / "clip"))
    result = run_cli("run", str(config), "--quiet", "--set", "run.max_error_rate=0.5")
    assert result.returncode == 0, result.stderr


def test_parquet_only_index_stays_one_row_per_file(tmp_path: Path, tiny_models: Path) -> None:
    """With Parquet as the only sink, a changed file's row is replaced, not duplicated."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in sorted(os.listdir(IMAGES))[:3]:
        shutil.copy(IMAGES / name, photos / name)
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"), output={"lancedb": None})
    assert run_cli("run", str(config), "--quiet").returncode == 0
    first = sorted(photos.iterdir())[0]
    os.utime(first, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    for _ in range(2):
        assert run_cli("run", str(config), "--quiet").returncode == 0
    table = ds.dataset(tmp_path / "embeddings" / "images").to_table()
    assert sorted(table["path"].to_pylist()) == sorted(p.name for p in photos.iterdir())
    assert _latest_report(tmp_path)["images_embedded"] == 0


def test_two_concurrent_runs_one_proceeds_one_exits_3(tmp_path: Path, tiny_models: Path) -> None:
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in sorted(os.listdir(IMAGES))[:40]:
        shutil.copy(IMAGES / name, photos / name)
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    # The first run's decode workers hold every file until `go` exists, so it keeps the lock however slow
    # the machine is; the second is started once the lock file names its holder.
    go = tmp_path / "go"
    env = {**os.environ, "EMBINDEX_FAULT": f"wait:{go}"}
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                             env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "index" / ".embindex.lock"
    while not (lock.exists() and lock.read_text()) and first.poll() is None:
        time.sleep(0.05)
    second = run_cli("run", str(config), "--quiet")
    go.touch()
    assert second.returncode == 3, second.stderr
    assert f"pid {first.pid}" in second.stderr and "started" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    images, _ = _tables(tmp_path)
    assert images.num_rows == 40


def test_quiet_run_over_odd_files_prints_only_embindex_lines(tmp_path: Path, tiny_models: Path) -> None:
    """Issue 16: with --quiet, a cron job over odd files mailed ~480 lines of libtiff and PIL warnings; the
    decode workers now keep them per file (debug log, error reasons), and stderr has embindex's lines only."""
    import re
    import shutil

    from tests.decode import crafted

    odd = tmp_path / "odd"
    odd.mkdir()
    files = {"unknown_tags_cut.tif": crafted.tiff_with_unknown_tags_cut_short(), "garbled.tif": crafted.tiff_garbled(),
             "truncated.png": crafted.truncated_png(), "picture.eps": crafted.eps(),
             "icon_named_png.png": crafted.ico((16, 16), crafted.zero_png(64, 64)),
             "fine.png": crafted.zero_png(32, 32)}
    for name, data in files.items():
        (odd / name).write_bytes(data)
    config = write_config(tmp_path, "./odd", str(tiny_models / "clip"), input={"extensions": ["png", "tif", "eps"]},
                          run={"max_error_rate": 1.0})
    result = run_cli("run", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    own = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (WARNING|ERROR) (pipeline|embindex)[\w.]*: |^embindex: ")
    assert [line for line in result.stderr.splitlines() if not own.match(line)] == []
    images, errors = _tables(tmp_path)
    assert sorted(images["path"].to_pylist()) == ["fine.png", "icon_named_png.png"]
    reasons = dict(zip(errors["path"].to_pylist(), errors["error"].to_pylist()))
    assert reasons["unknown_tags_cut.tif"] == reasons["truncated.png"] == "truncated file"
    assert reasons["garbled.tif"].startswith("corrupt image data: ZIPDecode: ")
    if shutil.which("gs") is None:
        assert reasons["picture.eps"] == "missing decoder (ghostscript)"
