"""One night of changes: new, rewritten, touched, deleted and renamed files; only real changes are encoded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.encode.models.load import load_encoder
from pipeline.runners.local import run_index
from tests.conftest import IMAGES, write_config

SOURCES = sorted(IMAGES.iterdir())


class CountingEncoder:
    """The real encoder, counting the images it is given."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder
        self.images_seen = 0

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_seen += pixels.shape[0]
        return self._encoder.encode_images(pixels)


def _run(config_path: Path, **options) -> tuple[dict, int]:
    config = load_config(config_path)
    encoder = CountingEncoder(load_encoder(config.encoder))
    result = run_index(config, progress=False, encoder=encoder, **options)
    assert result.exit_code == 0
    return result.report, encoder.images_seen


def _table(folder: Path) -> dict[str, dict]:
    rows = lancedb.connect(str(folder / "index")).open_table("images").to_arrow().to_pylist()
    assert len({r["path"] for r in rows}) == len(rows), "duplicate paths"
    return {r["path"]: r for r in rows}


def _folder_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for index, source in enumerate(SOURCES[:50]):
        shutil.copy(source, root / ("sub" if index % 3 == 0 else "") / source.name)
    return root


def test_one_night_of_changes(tmp_path: Path, tiny_models: Path, photos: Path) -> None:
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    report, encoded = _run(config)
    assert encoded == 50 and report["files_new"] == 50
    before = _table(tmp_path)

    files = sorted(_folder_files(photos))
    rewritten, touched, deleted, renamed = files[0:5], files[5:10], files[10:15], files[15:20]
    for source in SOURCES[100:110]:  # 10 new files
        shutil.copy(source, photos / source.name)
    for name in rewritten:  # new bytes at the same path
        Image.open(photos / name).convert("RGB").rotate(90, expand=True).save(photos / name, "JPEG", quality=70)
    for name in touched:  # same bytes, new mtime
        os.utime(photos / name, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    for name in deleted:
        os.remove(photos / name)
    renames = {name: f"renamed/{Path(name).name}" for name in renamed}
    (photos / "renamed").mkdir()
    for old, new in renames.items():
        os.rename(photos / old, photos / new)

    report, encoded = _run(config)
    assert encoded == 15, "only the 10 new and 5 rewritten files reach the encoder"
    assert (report["files_new"], report["files_changed"], report["files_deleted"], report["files_unchanged"]) == (
        15, 10, 10, 30)
    assert report["images_encoded"] == 15 and report["images_reused"] == 10
    assert report["images_embedded"] == 25

    after = _table(tmp_path)
    assert set(after) == _folder_files(photos)
    for old, new in renames.items():
        assert after[new]["content_hash"] == before[old]["content_hash"]
        assert np.allclose(after[new]["embedding"], before[old]["embedding"])
        assert (after[new]["width"], after[new]["height"]) == (before[old]["width"], before[old]["height"])
    for name in rewritten:
        assert after[name]["content_hash"] != before[name]["content_hash"]
        assert (after[name]["width"], after[name]["height"]) == (before[name]["height"], before[name]["width"])
    for name in touched:
        assert after[name]["mtime_ns"] == 1_600_000_000_000_000_000
        assert np.allclose(after[name]["embedding"], before[name]["embedding"])
    parquet = ds.dataset(tmp_path / "embeddings" / "images").to_table()
    assert sorted(parquet["path"].to_pylist()) == sorted(after)

    report, encoded = _run(config)
    assert encoded == 0 and report["files_unchanged"] == 55 and report["images_embedded"] == 0


def test_identical_bytes_in_one_run_are_encoded_once(tmp_path: Path, tiny_models: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for copy in range(4):
        shutil.copy(SOURCES[0], root / f"copy{copy}.jpg")
    shutil.copy(SOURCES[1], root / "other.jpg")
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"), encoder={"batch_size": 2})
    report, encoded = _run(config)
    assert encoded == 2
    rows = _table(tmp_path)
    assert len(rows) == 5
    assert len({r["content_hash"] for name, r in rows.items() if name.startswith("copy")}) == 1
    vectors = [np.array(rows[f"copy{i}.jpg"]["embedding"]) for i in range(4)]
    assert all(np.allclose(v, vectors[0]) for v in vectors)


def test_errors_are_retried_when_changed_or_asked(tmp_path: Path, tiny_models: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(SOURCES[0], root / "good.jpg")
    (root / "bad.jpg").write_bytes(b"not an image at all")
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"), run={"max_error_rate": 1.0})
    _run(config)

    def attempts() -> list[int]:
        return lancedb.connect(str(tmp_path / "index")).open_table("images_errors").to_arrow()["attempts"].to_pylist()

    assert attempts() == [1]

    report, encoded = _run(config)  # unchanged error: skipped
    assert report["errors"] == {} and encoded == 0
    report, _ = _run(config, retry_errors=True)  # asked: tried again, attempts counted
    assert report["files_retried"] == 1 and report["errors"] == {"not an image": 1}
    assert attempts() == [2]

    shutil.copy(SOURCES[1], root / "bad.jpg")  # fixed: becomes a row, leaves images_errors
    report, encoded = _run(config)
    assert encoded == 1 and attempts() == []
    assert set(_table(tmp_path)) == {"good.jpg", "bad.jpg"}


def test_a_model_change_refuses_without_rebuild(tmp_path: Path, tiny_models: Path) -> None:
    from tests.conftest import run_cli

    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(SOURCES[0], root / "a.jpg")
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    assert run_cli("run", str(config), "--quiet").returncode == 0
    before = _table(tmp_path)

    other_model = ["--set", f"encoder.model={tiny_models / 'dinov2'}"]
    refused = run_cli("run", str(config), "--quiet", *other_model)
    assert refused.returncode == 2
    assert "--rebuild" in refused.stderr and "encoder.model" in refused.stderr
    assert _table(tmp_path)["a.jpg"]["model"] == before["a.jpg"]["model"]

    rebuilt = run_cli("run", str(config), "--quiet", "--rebuild", *other_model)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert _table(tmp_path)["a.jpg"]["model"] == str(tiny_models / "dinov2")
