"""`embindex bench` sweeps batch sizes with the real pipeline; `embindex synth` writes sized corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tools.synth import SynthSpec, image_sizes, write_corpus
from tests.conftest import IMAGES, run_cli, write_config


def test_bench_writes_a_row_per_batch_size(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"))
    out = tmp_path / "bench"
    result = run_cli("bench", str(config), "--batch-sizes", "1,4,16", "--limit", "40", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4, 16]
    assert all(r["images"] == 40 and r["images_per_s"] > 0 for r in rows)
    table = (out / "bench.md").read_text()
    assert "| Batch Size | Peak VRAM | Processing Time | Images/s | Command |" in table
    for size in (1, 4, 16):
        assert f"--set encoder.batch_size={size}`" in table
    assert not (tmp_path / "index").exists(), "the user's index is never touched"
    assert not list(out.glob("scratch-*"))


def test_bench_rejects_bad_batch_sizes(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"))
    result = run_cli("bench", str(config), "--batch-sizes", "4,zero")
    assert result.returncode == 2 and "--batch-sizes" in result.stderr


def test_an_out_of_memory_batch_size_is_a_row(tmp_path: Path, tiny_models: Path, monkeypatch) -> None:
    from pipeline.config import load_config
    from pipeline.tools import bench

    real_run = bench.run_index

    def run_or_fail(config, **options):
        if config.encoder.batch_size > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run(config, **options)

    monkeypatch.setattr(bench, "run_index", run_or_fail)
    config = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / "clip")))
    rows = bench.sweep(config, [4, 32], 20, tmp_path / "out")
    assert rows[0]["images"] == 20
    assert rows[1]["out_of_memory"].startswith("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "out of memory" in bench.format_table(rows)


@pytest.mark.parametrize("image_format", ["jpeg", "png", "random"])
def test_synth_writes_sized_images(tmp_path: Path, image_format: str) -> None:
    result = run_cli("synth", str(tmp_path / "out"), "--count", "120", "--width-mean", "300", "--width-stddev", "40",
                     "--height-mean", "200", "--height-stddev", "20", "--format", image_format, "--seed", "3")
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "out").rglob("*.*"))
    assert len(files) == 120
    suffixes = {f.suffix for f in files}
    assert suffixes == {"jpeg": {".jpg"}, "png": {".png"}, "random": {".jpg", ".png"}}[image_format]
    sizes = np.array([Image.open(f).size for f in files])
    assert abs(sizes[:, 0].mean() - 300) < 12 and abs(sizes[:, 0].std() - 40) < 8
    assert abs(sizes[:, 1].mean() - 200) < 6 and abs(sizes[:, 1].std() - 20) < 5
    assert Image.open(files[0]).format == ("JPEG" if files[0].suffix == ".jpg" else "PNG")


def test_synth_images_are_not_flat(tmp_path: Path) -> None:
    write_corpus(tmp_path, SynthSpec(4, 128, 0, 96, 0, "png", seed=1), workers=1)
    for path in tmp_path.rglob("*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        assert pixels.std() > 10, "natural-looking content, not a constant colour"


def test_sizes_follow_the_requested_distribution() -> None:
    sizes = image_sizes(SynthSpec(20_000, 1000, 100, 500, 50, "jpeg"))
    assert abs(sizes[:, 0].mean() - 1000) < 3 and abs(sizes[:, 0].std() - 100) < 3
    assert sizes.min() >= 8
