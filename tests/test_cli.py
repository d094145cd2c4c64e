"""The CLI's promises to cron: the lock before anything slow, exit 2 at once for a missing index or report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.index.lock import IndexLock
from tests.conftest import IMAGES, REPO, run_cli, write_config

# Runs `embindex ARGS` in a fresh interpreter and says, after it exits, whether torch was ever imported.
PROBE = """
import json, sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


def test_a_held_lock_refuses_the_run_before_torch_is_imported(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"))
    with IndexLock(str(tmp_path / "index")):
        result = _probe("run", str(config), "--quiet")
    assert result["code"] == 3, result["stderr"]
    assert not result["torch"], "the lock must be asked for before the heavy imports"
    assert "holds the index lock" in result["stderr"]


def test_a_config_error_found_after_the_lock_still_writes_nothing(tmp_path: Path, tiny_models: Path) -> None:
    # A CLIP checkpoint forced to another family: the model's description refuses it, after the lock.
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"), encoder={"kind": "colpali"})
    result = run_cli("run", str(config), "--quiet")
    assert result.returncode == 2 and "encoder.kind" in result.stderr
    assert not (tmp_path / "index").exists() and not (tmp_path / "embeddings").exists()


def test_query_of_a_missing_index_exits_2_at_once_and_creates_nothing(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"))
    result = _probe("query", str(config), "--text", "a dog")
    assert result["code"] == 2 and "run `embindex run` first" in result["stderr"]
    assert not result["torch"], "a missing index is found before the model is described"
    assert not (tmp_path / "index").exists()


def test_report_without_a_run_exits_2(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"))
    result = run_cli("report", str(config))
    assert result.returncode == 2 and "no run report" in result.stderr
    assert not (tmp_path / "runs").exists()
