"""A cron run's fixed cost: what `embindex run` imports when it finds nothing new, and when it embeds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IMAGES, REPO, write_config

HEAVY = ["lancedb", "sklearn", "torchvision", "transformers"]
# Runs `embindex ARGS` in a fresh interpreter and says, after it exits, which heavy libraries were imported.
PROBE = f"""
import json, sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "imported": sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r})}}))
"""


def _run(config: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, "run", str(config), "--quiet"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(IMAGES.glob("*.JPEG"))[:3]:
        shutil.copy2(path, folder / path.name)
    return folder


def test_a_run_with_nothing_new_imports_no_transformers(tmp_path: Path, photos: Path, tiny_models: Path) -> None:
    """The model's identity comes from its files: transformers (and the torchvision and scikit-learn it pulls
    in when installed) only load with the weights, when a file needs embedding."""
    config = write_config(tmp_path, str(photos), str(tiny_models / "clip"), decode={"workers": 1})
    first = _run(config)
    assert first["code"] == 0, first["stderr"]
    assert "transformers" in first["imported"]  # the weights loaded: the probe sees what a run imports
    again = _run(config)
    assert again["code"] == 0, again["stderr"]
    assert again["imported"] == ["lancedb"], again


def test_a_parquet_only_run_with_nothing_new_imports_no_lancedb(tmp_path: Path, photos: Path,
                                                                 tiny_models: Path) -> None:
    config = write_config(tmp_path, str(photos), str(tiny_models / "clip"), decode={"workers": 1},
                          output={"lancedb": None})
    assert _run(config)["code"] == 0
    again = _run(config)
    assert again["code"] == 0, again["stderr"]
    assert again["imported"] == [], again
