"""`embindex query` through a running server: the Python API's rows, printed alike; no model or LanceDB imported; the
config's own server found and used; the server's refusals as exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.search.query import Index
from tests.conftest import REPO, run_cli
from tests.serve.conftest import PHOTOS, SEARCH_KEY, SEARCH_KEY_ENV
from tests.serve.test_server import free_port

# Runs `embindex ARGS` in a fresh interpreter and says, after it exits, which heavy libraries it imported.
PROBE = """
import json, sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "imported": [m for m in ("torch", "transformers", "lancedb", "pyarrow", "numpy")
                                             if m in sys.modules]}))
"""


def _env(**variables: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("EMBINDEX_API_KEY", SEARCH_KEY_ENV)}, **variables}


def _probe(*args: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stdout": done.stdout, "stderr": done.stderr}


def test_query_through_the_server_equals_the_python_api(search_server: dict) -> None:
    url, env = search_server["url"], _env(EMBINDEX_API_KEY=SEARCH_KEY)
    index = Index.open(search_server["config"])
    done = run_cli("query", "--server", url, "--text", "a red car", "-k", "6", "--json", env=env)
    assert done.returncode == 0, done.stderr
    served = [json.loads(line) for line in done.stdout.splitlines()]
    local = index.search_text("a red car", k=6).to_pylist()
    assert [row["path"] for row in served] == [row["path"] for row in local]
    assert [row["score"] for row in served] == pytest.approx([row["score"] for row in local], abs=1e-6)
    assert [list(row) for row in served] == [list(row) for row in local]  # the same columns, in the same order
    assert "SMOKE TEST" in done.stderr
    photo = str(Path(search_server["root"]) / PHOTOS[2].name)  # indexed: its stored vector, here and there
    done = run_cli("query", "--server", url, "--image", photo, "-k", "4", "--json", "--where", "width > 100", env=env)
    assert done.returncode == 0, done.stderr
    local = index.search_image(photo, k=4, where="width > 100").to_pylist()
    assert [json.loads(line) for line in done.stdout.splitlines()] == json.loads(json.dumps(local, default=str))


def test_the_printed_table_is_the_local_commands(search_server: dict) -> None:
    photo = str(Path(search_server["root"]) / PHOTOS[3].name)
    served = run_cli("query", "--server", search_server["url"], "--image", photo, "-k", "5",
                     env=_env(EMBINDEX_API_KEY=SEARCH_KEY))
    local = run_cli("query", str(search_server["config"]), "--local", "--image", photo, "-k", "5", env=_env())
    assert served.returncode == local.returncode == 0, served.stderr + local.stderr
    assert served.stdout == local.stdout and PHOTOS[3].name in served.stdout.splitlines()[1]


def test_query_through_a_server_imports_no_model_or_storage_library(search_server: dict) -> None:
    result = _probe("query", "--server", search_server["url"], "--text", "a dog", env=_env(EMBINDEX_API_KEY=SEARCH_KEY))
    assert result["code"] == 0, result["stderr"]
    assert result["imported"] == [], "the --server path must stay light"
    assert len(result["stdout"].splitlines()) == 12  # the header, 10 hits, the probe's own line


def test_query_uses_the_configs_server_when_it_serves_that_index(search_server: dict) -> None:
    config = str(search_server["config"])  # serve.port is the test server's; serve.api_key_env names the key
    through = _probe("query", config, "--text", "a dog", "-k", "3", env=_env(**{SEARCH_KEY_ENV: SEARCH_KEY}))
    assert through["code"] == 0 and through["imported"] == [], through["stderr"]
    # Without the key the server refuses: the query runs here instead, and gives the same hits.
    photo = str(Path(search_server["root"]) / PHOTOS[4].name)
    here = _probe("query", config, "--image", photo, "-k", "3", env=_env())
    assert here["code"] == 0 and "lancedb" in here["imported"], here["stderr"]
    there = _probe("query", config, "--image", photo, "-k", "3", env=_env(**{SEARCH_KEY_ENV: SEARCH_KEY}))
    assert there["imported"] == [] and there["stdout"].splitlines()[:4] == here["stdout"].splitlines()[:4]
    local = _probe("query", config, "--local", "--image", photo, "-k", "3", env=_env(**{SEARCH_KEY_ENV: SEARCH_KEY}))
    assert local["code"] == 0 and "lancedb" in local["imported"]


def test_the_servers_refusals_are_exit_codes(search_server: dict, tmp_path: Path) -> None:
    url, env = search_server["url"], _env(EMBINDEX_API_KEY=SEARCH_KEY)
    cases = [
        (("--server", url, "--text", "a", "--where", "no_such_column > 1"), env, 2, "where: search failed"),
        (("--server", url, "--text", "a"), _env(EMBINDEX_API_KEY="wrong"), 2, "API key"),
        (("--server", f"http://127.0.0.1:{free_port()}", "--text", "a"), env, 1, "cannot reach"),
        (("--server", url, "--image", str(tmp_path / "missing.jpg")), env, 2, "cannot read query image"),
        (("--text", "a"), env, 2, "give CONFIG"),
        (("--server", url, "--local", "--text", "a"), env, 2, "not both"),
        (("--server", url), env, 2, "exactly one of --text or --image"),
    ]
    for args, variables, code, message in cases:
        done = run_cli("query", *args, env=variables)
        assert done.returncode == code and message in done.stderr, (args, done.returncode, done.stderr)
