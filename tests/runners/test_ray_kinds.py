"""The Ray runner for every encoder kind: multi-vector, dynamic resolution, VLM features, pyramid tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.index.schema import DEEPSTACK, vectors_of
from pipeline.index.sinks.lance import LanceSink
from pipeline.runners.local import run_index
from tests.conftest import HOSTILE, HOSTILE_ERRORS, IMAGES
from tests.runners.test_ray import (
    CRASH,
    SLOW,
    _assert_exactly_once,
    _config,
    _images,
    ray_address,  # noqa: F401 - the module's Ray, shared
    run_killing,
)

pytest.importorskip("ray.data")

# The tiny models' fastest settings: few image tokens per photo (the tiny towers run ~50 photos/s on 2 cores).
QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 12544}
KINDS = {
    "colqwen2_5": ("colqwen2_5", QWEN_PIXELS),
    "biqwen2_5": ("biqwen2_5", QWEN_PIXELS),
    "colpali": ("colpali", {}),
    "qwen_vl_features": ("qwen3_vl", {"kind": "qwen_vl_features", **QWEN_PIXELS}),
    "pyramid": ("clip", {"pyramid": [[1, 1], [2, 2]]}),
}


def _both_runs(tmp_path: Path, tiny_models: Path, kind: str, roots: list[str]) -> tuple[pa.Table, pa.Table, dict]:
    model, encoder = KINDS[kind]
    results = {}
    for runner in ("local", "ray"):
        path = _config(tmp_path / runner, tiny_models / model, roots, runner)
        config = load_config(path, [f"encoder.{key}={value}" for key, value in encoder.items()])
        results[runner] = run_index(config, progress=False)
        assert results[runner].exit_code == 0
    return _images(tmp_path / "local"), _images(tmp_path / "ray"), results


def _assert_same_vectors(expected: pa.ChunkedArray, got: pa.ChunkedArray) -> None:
    """Single-vector rows: cosine >= 0.9999 per row; multi-vector rows: the same count, cosine per vector."""
    for want, have in zip(vectors_of(expected), vectors_of(got)):
        want, have = np.asarray(want, np.float32), np.asarray(have, np.float32)
        assert want.shape == have.shape
        want, have = want.reshape(-1, want.shape[-1]), have.reshape(-1, have.shape[-1])
        cosine = (want * have).sum(-1) / np.maximum(np.linalg.norm(want, axis=-1) * np.linalg.norm(have, axis=-1),
                                                   1e-12)
        assert cosine.min() >= 0.9999


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_on_ray_writes_the_local_runners_rows(ray_address: str, tmp_path: Path,  # noqa: F811
                                                         tiny_models: Path, kind: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos and hostile files (one kills its decoder): the same rows, vectors, extra columns and errors."""
    monkeypatch.setenv(*next(iter(CRASH.items())))
    expected, got, results = _both_runs(tmp_path, tiny_models, kind, [str(IMAGES), str(HOSTILE)])
    # 416 or 417: for dynamic resolution, a 4000x8 image's aspect ratio is an error (as in the models' processors)
    assert got.schema == expected.schema and got.num_rows == expected.num_rows >= 400 + 16
    for column in got.column_names:
        if column in ("embedding", DEEPSTACK, "indexed_at"):
            continue
        assert got[column].equals(expected[column]), column
    _assert_same_vectors(expected["embedding"], got["embedding"])
    if DEEPSTACK in got.column_names:
        flat = [pa.chunked_array([t[DEEPSTACK].combine_chunks().flatten()]) for t in (expected, got)]
        _assert_same_vectors(*flat)
    errors = [LanceSink(str(tmp_path / f / "index"), "images").read("errors").sort_by("path") for f in ("local", "ray")]
    assert set(errors[1]["path"].to_pylist()) >= {*HOSTILE_ERRORS, "plain.bmp"}
    for column in ("path", "error", "attempts"):
        assert errors[1][column].equals(errors[0][column]), column
    _assert_exactly_once(tmp_path / "ray", expected.num_rows)
    local, on_ray = results["local"].report, results["ray"].report
    assert on_ray["fingerprint"] == local["fingerprint"]
    for field in ("images_embedded", "errors", "vectors_per_image", "embedding_bytes_per_image", "flops_per_image"):
        assert on_ray[field] == pytest.approx(local[field]), field


def test_a_killed_actor_of_a_multivector_model_loses_nothing(ray_address: str, tmp_path: Path,  # noqa: F811
                                                             tiny_models: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the ColQwen2.5 embed actor after the first shard: Ray restarts it and every row lands once."""
    monkeypatch.setenv(*next(iter(SLOW.items())))
    folder = tmp_path / "index-root"
    model, encoder = KINDS["colqwen2_5"]
    config = load_config(_config(folder, tiny_models / model, [str(IMAGES)], "ray"),
                         [f"encoder.{key}={value}" for key, value in encoder.items()])
    result, killed = run_killing(config, folder, ("EmbedActor",))

    assert "EmbedActor" in killed and killed["rows_before"] < 400, killed
    assert result.exit_code == 0 and result.report["images_embedded"] == 400
    _assert_exactly_once(folder, 400)
    rows = _images(folder)
    assert (pa.compute.list_value_length(rows["embedding"]).to_numpy() > 0).all()


def test_an_actor_that_finds_the_config_wrong_is_a_config_error(ray_address: str, tmp_path: Path,  # noqa: F811
                                                               tiny_models: Path) -> None:
    """encoder.compile: true with a multi-vector model is refused in the actor, as locally: exit code 2."""
    from pipeline.errors import ConfigError

    model, encoder = KINDS["colqwen2_5"]
    config = load_config(_config(tmp_path, tiny_models / model, [str(IMAGES)], "ray"),
                         [f"encoder.{key}={value}" for key, value in encoder.items()] + ["encoder.compile=true"])
    with pytest.raises(ConfigError, match="^encoder.compile: true needs a fixed-size single-vector encoder"):
        run_index(config, progress=False, limit=8)


def test_a_copied_file_reuses_its_pyramid_row_on_ray(ray_address: str, tmp_path: Path,  # noqa: F811
                                                     tiny_models: Path) -> None:
    """A copy of an indexed file takes the vectors and the tiles of its twin's row, without a decode."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(IMAGES.iterdir())[:6]:
        shutil.copy(source, photos / source.name)
    model, encoder = KINDS["pyramid"]
    path = _config(tmp_path / "ray", tiny_models / model, [str(photos)], "ray")
    overrides = [f"encoder.{key}={value}" for key, value in encoder.items()]
    assert run_index(load_config(path, overrides), progress=False).report["images_embedded"] == 6
    first = sorted(photos.iterdir())[0]
    shutil.copy(first, photos / "copy.jpeg")
    again = run_index(load_config(path, overrides), progress=False)
    assert again.exit_code == 0 and again.report["images_reused"] == again.report["images_embedded"] == 1
    rows = _images(tmp_path / "ray").to_pylist()
    twin, copy = (next(r for r in rows if r["path"] == name) for name in (first.name, "copy.jpeg"))
    assert copy["tiles"] == twin["tiles"] and len(copy["tiles"]) == 5
    assert np.array_equal(np.asarray(copy["embedding"]), np.asarray(twin["embedding"]))
