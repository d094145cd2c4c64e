"""Run history and rollback: each changing run is a LanceDB tag; rollback restores its rows exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lancedb
import pyarrow.dataset as ds

from tests.conftest import IMAGES, run_cli, write_config


def _rows(folder: Path) -> list[dict]:
    table = lancedb.connect(str(folder / "index")).open_table("images").to_arrow()
    return sorted(table.drop_columns(["indexed_at"]).to_pylist(), key=lambda r: r["path"])


def _history(config: Path) -> list[dict]:
    result = run_cli("history", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_rollback_restores_the_previous_rows_exactly(tmp_path: Path, tiny_models: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(IMAGES.iterdir())
    for source in sources[:6]:
        shutil.copy(source, photos / source.name)
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    assert run_cli("run", str(config), "--quiet").returncode == 0
    first_rows = _rows(tmp_path)

    (photos / sources[0].name).unlink()
    shutil.copy(sources[10], photos / sources[10].name)
    assert run_cli("run", str(config), "--quiet").returncode == 0
    assert run_cli("run", str(config), "--quiet").returncode == 0  # no change: not tagged
    assert _rows(tmp_path) != first_rows

    history = _history(config)
    assert len(history) == 2
    assert history[0]["files_new"] == 6 and history[1]["files_new"] == 1 and history[1]["files_deleted"] == 1

    result = run_cli("rollback", str(config), history[0]["run_id"])
    assert result.returncode == 0, result.stderr
    assert _rows(tmp_path) == first_rows
    parquet = ds.dataset(tmp_path / "embeddings" / "images").to_table()
    assert sorted(parquet["path"].to_pylist()) == [r["path"] for r in first_rows]

    # The folder still holds the second night's files: the next run brings the index back to it.
    assert run_cli("run", str(config), "--quiet").returncode == 0
    assert {r["path"] for r in _rows(tmp_path)} == {p.name for p in photos.iterdir()}


def test_rollback_to_an_unknown_run_exits_2(tmp_path: Path, tiny_models: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted(IMAGES.iterdir())[0], photos / "a.jpg")
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    assert run_cli("run", str(config), "--quiet").returncode == 0
    result = run_cli("rollback", str(config), "20000101T000000_000000Z")
    assert result.returncode == 2
    assert "no run" in result.stderr
