"""Shared fixtures: tiny offline models, the shared data folders, and config files in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The shared data beside the checkout; EMBINDEX_SHARED_DATA points elsewhere (the GPU machine gets a
    copy). A clone made elsewhere (a CI scratch folder) finds it beside the repository it was cloned from."""
    if "EMBINDEX_SHARED_DATA" in os.environ:  # absolute: tests write it into configs in their own folders
        return Path(os.environ["EMBINDEX_SHARED_DATA"]).resolve()
    beside = REPO.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        cloned_from = Path(origin).resolve().parent / "shared" / "data"
        if cloned_from.is_dir():
            return cloned_from
    return beside


SHARED_DATA = _shared_data()
IMAGES = SHARED_DATA / "images"
HOSTILE = SHARED_DATA / "hostile"

HOSTILE_EMBEDDED = [
    "Mixed.Png", "UPPERCASE_EXT.JPG", "animated.gif", "bilevel_1x1.png", "tiny_1x1.png", "cmyk.jpg",
    "exif_orientation_6.jpg", "extreme_aspect_4000x8.png", "gray16.png", "gray_alpha.png", "large_24mp.jpg",
    "lzw.tiff", "name with spaces & ünïcödé.jpg", "odd_size.webp", "palette_transparent.png", "plain.bmp",
    "png_with_jpg_extension.jpg", "rgba_half_alpha.png",
]
HOSTILE_ERRORS = [
    "zero_bytes.png", "not_an_image.jpg", "truncated_half.jpg", "truncated.png", "garbage_in_middle.jpg",
    "header_only.gif", "decompression_bomb_400mpx.png",
]
HOSTILE_SKIPPED = ["notes.txt", "data.json", ".hidden_file.jpg"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random models of every family, written by the project's own script (no downloads)."""
    out = tmp_path_factory.mktemp("tiny-models")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(out)], check=True,
                   capture_output=True)
    return out


def write_config(folder: Path, roots: list[str] | str, model: str, **sections: dict) -> Path:
    """A config file in `folder` with both sinks, its paths relative to the file."""
    config = {
        "input": {"root": roots},
        "decode": {"workers": 2},
        "encoder": {"model": model, "batch_size": 16},
        "output": {"lancedb": {"uri": "./index", "table": "images"}, "parquet": {"dir": "./embeddings"}},
        "run": {"report_dir": "./runs"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`embindex ARGS` in a subprocess, exactly as a user or cron runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)
