"""encoder.compile: the compiled forward gives the eager vectors and fills its cache; when auto compiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.encode import compiled
from pipeline.errors import ConfigError
from pipeline.runners.local import run_index
from tests.conftest import IMAGES, write_config


def _vectors(folder: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(folder / "embeddings" / "images")
    return dict(zip(table["path"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))))


def _run(folder: Path, model: Path, setting: object) -> dict:
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for source in sorted(IMAGES.iterdir())[:21]:  # 21 at batch 8: batches of 8, 8 and 5, and one graph for all
        shutil.copy(source, photos / source.name)
    config = write_config(folder, "./photos", str(model),
                          encoder={"batch_size": 8, "compile": setting, "device": "cpu"},
                          output={"lancedb": None, "parquet": {"dir": "./embeddings"}})
    return run_index(load_config(config), progress=False).report


def test_compiled_encoder_gives_the_eager_vectors_and_fills_its_cache(tmp_path: Path, tiny_models: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    eager = _run(tmp_path / "eager", tiny_models / "clip", False)
    assert eager["compile"]["enabled"] is False and eager["compile_s"] == 0.0
    first = _run(tmp_path / "first", tiny_models / "clip", True)
    assert first["compile"]["enabled"] is True and first["compile"]["cache_dir"] == str(cache)
    assert first["compile_s"] > 0 and first["startup_s"] >= first["describe_s"] + first["compile_s"]
    records = json.loads((cache / compiled.RECORDS).read_text())
    assert list(records.values()) == [pytest.approx(first["compile_s"], abs=0.01)]
    assert any(cache.rglob("*.py")), "Inductor wrote its generated code to the cache folder"
    want, got = _vectors(tmp_path / "eager"), _vectors(tmp_path / "first")
    assert sorted(got) == sorted(want) and first["images_embedded"] == 21
    for path, vector in want.items():
        assert float(vector @ got[path]) >= 0.9999, path


def test_compile_true_refuses_an_encoder_it_cannot_compile(tiny_models: Path) -> None:
    class MultiVector:
        kind, multivector = "colpali", True

    with pytest.raises(ConfigError, match="encoder.compile: true"):
        compiled.choose(True, MultiVector(), 1000, 8)
    assert compiled.choose("auto", MultiVector(), 10**9, 8).enabled is False


def test_auto_compiles_when_the_saving_repays_the_compile() -> None:
    # 0.11 ms/image eager (ViT-B/16 on an H200): a fifth of it saved over 20,000 images is 0.45 s.
    assert compiled.repays(0.11, 20_000, None)[0] is False
    assert compiled.repays(0.11, 20_000_000, None)[0] is True  # 450 s saved against a cold compile
    enabled, reason = compiled.repays(0.43, 1_000_000, 8.0)  # L/14, a warm cache: 86 s saved, 8 s paid
    assert enabled and "warm cache" in reason
    assert compiled.repays(0.43, 50_000, compiled.COLD_COMPILE_S)[0] is False


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled.cache_dir() == tmp_path / "embindex" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "given"))
    assert compiled.cache_dir() == tmp_path / "given"


class _Failing:
    """A stand-in encoder whose compile fails at its first call, as a missing compiler toolchain does."""

    kind, multivector, device = "clip", False, None

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def input_spec(self):  # noqa: ANN201
        from pipeline.decode.spec import InputSpec

        return InputSpec("shortest_edge", (8, 8), (8, 8))

    def fingerprint(self) -> dict:
        return {"model": "failing", "dtype": "float32"}

    def forward(self, pixels):  # noqa: ANN001, ANN201
        raise RuntimeError("no C compiler found")


def test_a_failed_compile_runs_eager_under_auto_and_is_an_error_when_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the failure surfaces at the first call, as Inductor's
    encoder = _Failing()
    auto = compiled.CompileChoice(True, "auto: saves ~90 s", str(tmp_path))
    compiled.compile_encoder(encoder, auto, 4)
    assert auto.enabled is False and "the compile failed, running eager" in auto.reason
    assert encoder.forward.__func__ is _Failing.forward  # the eager forward is kept
    with pytest.raises(ConfigError, match="encoder.compile: true, but compiling the encoder failed"):
        compiled.compile_encoder(encoder, compiled.CompileChoice(True, "encoder.compile: true", str(tmp_path)), 4)
