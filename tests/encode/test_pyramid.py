"""Pyramid tiles: 35 vectors per image with their tile metadata, searched by MaxSim, and renames reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from PIL import Image

from pipeline.config import parse_pyramid
from pipeline.decode.tiles import pyramid_tiles
from pipeline.index.schema import vectors_of
from pipeline.search.query import Index
from tests.conftest import HOSTILE, IMAGES, run_cli, write_config

GRIDS = [[1, 1], [3, 3], [5, 5]]


@pytest.fixture(scope="module")
def pyramid_index(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    folder = tmp_path_factory.mktemp("pyramid")
    photos = folder / "photos"
    photos.mkdir()
    for path in sorted(IMAGES.iterdir())[::10]:  # 40 photos
        shutil.copy(path, photos / path.name)
    for name in ("exif_orientation_6.jpg", "extreme_aspect_4000x8.png", "truncated_half.jpg", "cmyk.jpg"):
        shutil.copy(HOSTILE / name, photos / name)
    config = write_config(folder, "photos", str(tiny_models / "clip"), encoder={"pyramid": GRIDS})
    result = run_cli("run", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    return config


def test_tiles_cover_the_image_exactly() -> None:
    tiles = pyramid_tiles(1000, 701, parse_pyramid(GRIDS))
    assert len(tiles) == 35 and tiles[0].box == (0, 0, 1000, 701)
    for level, (rows, cols) in enumerate(parse_pyramid(GRIDS)):
        cells = [t for t in tiles if t.level == level]
        assert len(cells) == rows * cols
        assert sum((t.box[2] - t.box[0]) * (t.box[3] - t.box[1]) for t in cells) == 1000 * 701
    with pytest.raises(ValueError, match="rows, cols"):
        parse_pyramid([[3, 0]])


def test_rows_hold_35_unit_vectors_and_their_tiles(pyramid_index: Path) -> None:
    table = lancedb.connect(str(pyramid_index.parent / "index")).open_table("images").to_arrow()
    assert table.num_rows == 43  # 40 photos + 3 decodable hostile files; the truncated one is an error row
    assert str(table.schema.field("embedding").type) == "list<item: fixed_size_list<item: halffloat>[32]>"
    for vectors, n_vectors, tiles in zip(vectors_of(table["embedding"]), table["n_vectors"].to_pylist(),
                                         table["tiles"].to_pylist()):
        assert vectors.shape == (35, 32) and n_vectors == 35
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # float16 storage
        assert tiles[0] == {"level": 0, "row": 0, "col": 0} and tiles[-1] == {"level": 2, "row": 4, "col": 4}
    parquet = ds.dataset(pyramid_index.parent / "embeddings" / "images").to_table()
    assert sorted(parquet["path"].to_pylist()) == sorted(table["path"].to_pylist())
    assert parquet["n_vectors"].to_pylist() == [35] * 43


def test_the_whole_image_vector_equals_the_single_vector_model(pyramid_index: Path, tiny_models: Path,
                                                              tmp_path: Path) -> None:
    """Tile 0 is the image as the plain model sees it."""
    plain = write_config(tmp_path, str(pyramid_index.parent / "photos"), str(tiny_models / "clip"))
    assert run_cli("run", str(plain), "--quiet").returncode == 0
    single = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow().sort_by("path")
    tiled = lancedb.connect(str(pyramid_index.parent / "index")).open_table("images").to_arrow().sort_by("path")
    whole = np.stack([v[0] for v in vectors_of(tiled["embedding"])])
    cosines = (whole * vectors_of(single["embedding"])).sum(axis=1)
    assert cosines.min() > 0.999


def test_query_reports_the_matching_tile(pyramid_index: Path) -> None:
    index = Index.open(pyramid_index)
    target = sorted((pyramid_index.parent / "photos").glob("*.JPEG"))[3]
    hits = index.search_image(target, k=3)
    assert hits["path"][0].as_py() == target.name and hits["score"][0].as_py() == pytest.approx(1.0, abs=2e-3)
    assert (hits["tile_level"][0].as_py(), hits["tile_row"][0].as_py(), hits["tile_col"][0].as_py()) == (0, 0, 0)
    # A crop of one 5x5 cell, given as a PIL image, finds its source image.
    image = Image.open(target)
    cell = pyramid_tiles(image.width, image.height, parse_pyramid(GRIDS))[-1]
    hits = index.search_image(image.crop(cell.box), k=1)
    assert hits["path"][0].as_py() == target.name
    assert hits["score"][0].as_py() > 0.99
    assert len(index.search_text("a photo", k=5)) == 5


def test_a_rename_reuses_the_stored_vectors(pyramid_index: Path) -> None:
    photos = pyramid_index.parent / "photos"
    first = sorted(photos.glob("*.JPEG"))[0]
    before = lancedb.connect(str(pyramid_index.parent / "index")).open_table("images").to_arrow()
    first.rename(photos / ("renamed_" + first.name))
    result = run_cli("run", str(pyramid_index), "--quiet")
    assert result.returncode == 0, result.stderr
    after = lancedb.connect(str(pyramid_index.parent / "index")).open_table("images").to_arrow()
    old = vectors_of(before.filter(pc.equal(before["path"], first.name))["embedding"])[0]
    new_rows = after.filter(pc.equal(after["path"], "renamed_" + first.name))
    assert new_rows["tiles"].to_pylist()[0][0] == {"level": 0, "row": 0, "col": 0}
    np.testing.assert_array_equal(vectors_of(new_rows["embedding"])[0], old)
    report = json.loads(run_cli("report", str(pyramid_index), "--json").stdout)
    assert report["images_encoded"] == 0 and report["images_reused"] == 1 and report["output_rows"] == 43
