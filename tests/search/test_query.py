"""Search: by indexed image (rank 1 is itself), by outside image, by text; filters, JSON, and during a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SearchConfig
from pipeline.search.query import Index, QueryError
from tests.conftest import HOSTILE, IMAGES, REPO, run_cli, write_config


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    folder = tmp_path_factory.mktemp("query")
    config = write_config(folder, str(IMAGES), str(tiny_models / "clip"))
    assert run_cli("run", str(config), "--quiet").returncode == 0
    return config


def test_each_indexed_image_finds_itself_first(indexed: Path) -> None:
    index = Index.open(indexed)
    for path in sorted(IMAGES.iterdir())[::20]:  # 20 images
        hits = index.search_image(path, k=5)
        assert hits["path"][0].as_py() == path.name
        assert hits["score"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    assert index._encoder is None, "indexed, unchanged files reuse their stored vector: no model load"


def test_an_image_outside_the_index_is_encoded(indexed: Path, tmp_path: Path) -> None:
    source = sorted(IMAGES.iterdir())[7]
    outside = tmp_path / "query.jpg"
    shutil.copy(source, outside)
    index = Index.open(indexed)
    hits = index.search_image(outside, k=3)
    assert hits["path"][0].as_py() == source.name and hits["score"][0].as_py() > 0.999
    pil_hits = index.search_image(Image.open(source), k=1)
    assert pil_hits["path"][0].as_py() == source.name


def test_text_and_vector_queries_return_k_rows(indexed: Path) -> None:
    index = Index.open(indexed)
    hits = index.search_text("a photo of a dog", k=7)
    assert hits.num_rows == 7 and hits.column_names[:4] == ["rank", "score", "path", "root"]
    assert hits["rank"].to_pylist() == list(range(1, 8))
    scores = hits["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    vector = np.random.default_rng(0).normal(size=32).astype(np.float32)
    assert index.search_vector(vector / np.linalg.norm(vector), k=4).num_rows == 4


def test_where_filters(indexed: Path) -> None:
    index = Index.open(indexed)
    wide = index.search_text("a cat", k=50, where="width > 500")
    assert wide.num_rows > 0 and all(w > 500 for w in wide["width"].to_pylist())
    birds = index.search_text("a cat", k=50, where="path LIKE 'n015%'")
    assert birds.num_rows > 0 and all(p.startswith("n015") for p in birds["path"].to_pylist())
    with pytest.raises(QueryError, match="search failed"):
        index.search_text("a cat", where="no_such_column > 1")


def test_cli_prints_a_table_and_json(indexed: Path) -> None:
    image = sorted(IMAGES.iterdir())[3]
    table = run_cli("query", str(indexed), "--image", str(image), "-k", "3")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "path", "root"] and len(lines) == 4
    assert image.name in lines[1]
    as_json = run_cli("query", str(indexed), "--text", "a red car", "-k", "4", "--json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(rows) == 4 and {"rank", "score", "path", "root"} <= set(rows[0])


def test_clear_errors(indexed: Path, tmp_path: Path, tiny_models: Path) -> None:
    unreadable = run_cli("query", str(indexed), "--image", str(HOSTILE / "zero_bytes.png"))
    assert unreadable.returncode == 2 and "cannot read query image" in unreadable.stderr
    missing = run_cli("query", str(indexed), "--image", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    both = run_cli("query", str(indexed), "--text", "x", "--image", "y.jpg")
    assert both.returncode == 2
    empty_folder = tmp_path / "fresh"
    empty_folder.mkdir()
    (empty_folder / "photos").mkdir()
    fresh = write_config(empty_folder, "./photos", str(tiny_models / "clip"))
    no_index = run_cli("query", str(fresh), "--text", "x")
    assert no_index.returncode == 2 and "run `embindex run` first" in no_index.stderr
    other_model = run_cli("query", str(indexed), "--text", "x", "--set", f"encoder.model={tiny_models / 'siglip'}")
    assert other_model.returncode == 2 and "--rebuild" in other_model.stderr


def test_query_while_a_run_is_writing(tmp_path: Path, tiny_models: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(IMAGES.iterdir())
    for source in sources[:20]:
        shutil.copy(source, photos / source.name)
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"), run={"shard_size": 10})
    assert run_cli("run", str(config), "--quiet").returncode == 0
    for source in sources[20:120]:
        shutil.copy(source, photos / source.name)
    env = {**os.environ, "EMBINDEX_FAULT": "slow:0.05"}  # a run that writes for several seconds
    writer = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(5)
        assert writer.poll() is None, "the run ended before the query"
        hits = Index.open(config).search_image(photos / sources[0].name, k=5)
        assert hits["path"][0].as_py() == sources[0].name
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr


def test_an_ann_index_is_built_past_the_threshold_and_used(tmp_path: Path, tiny_models: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import lancedb

    from pipeline.index.ann import INDEX_TYPES, vector_index_type
    from pipeline.search import query

    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"), search={"ann_min_rows": 300})
    assert run_cli("run", str(config), "--quiet").returncode == 0
    report = json.loads(sorted((tmp_path / "runs").glob("*/report.json"))[-1].read_text())
    built = INDEX_TYPES[SearchConfig().ann_index]
    assert report["index_maintenance"]["action"] == f"built {built}"
    assert vector_index_type(lancedb.connect(str(tmp_path / "index")).open_table("images")) == built
    index = Index.open(config, ["search.text_nprobes=7"])
    used = []
    real_tuned = query.tuned
    monkeypatch.setattr(query, "tuned", lambda q, kind, search, modality: used.append((kind, modality))
                        or real_tuned(q, kind, search, modality))
    for path in sorted(IMAGES.iterdir())[::40]:
        assert index.search_image(path, k=3)["path"][0].as_py() == path.name
    assert index.search_text("a dog", k=3).num_rows == 3
    assert set(used) == {(built, "image"), (built, "text")} and used[-1] == (built, "text")


def test_an_open_index_sees_later_runs_through_the_same_handle(tmp_path: Path, tiny_models: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(IMAGES.iterdir())
    for source in sources[:12]:
        shutil.copy(source, photos / source.name)
    config = write_config(tmp_path, "./photos", str(tiny_models / "clip"))
    assert run_cli("run", str(config), "--quiet").returncode == 0
    index = Index.open(config)
    handle = index._table.table
    assert index.search_image(photos / sources[0].name, k=50).num_rows == 12
    for source in sources[12:20]:
        shutil.copy(source, photos / source.name)
    assert run_cli("run", str(config), "--quiet").returncode == 0
    hits = index.search_image(photos / sources[15].name, k=50)
    assert hits.num_rows == 20 and hits["path"][0].as_py() == sources[15].name
    assert index._table.table is handle  # one handle for the Index's life
