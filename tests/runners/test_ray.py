"""The Ray runner on a local 2-CPU Ray: the local runner's rows, a killed worker, a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.index.sinks.lance import LanceSink
from pipeline.index.sinks.parquet import ParquetSink
from pipeline.runners.local import run_index
from pipeline.runners.ray_driver import _check_reachable, _n_actors, _require_ray
from tests.conftest import HOSTILE, HOSTILE_ERRORS, IMAGES, REPO, write_config

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

# Ray 2.60 turns on token auth for clusters it starts; a test cluster on loopback needs none.
TEST_ENV = {"RAY_AUTH_MODE": "disabled"}
# pipeline.decode.worker's test hook, which the Ray runner forwards to its decode tasks: every decode 20 ms
# longer, so a kill lands while most of the 400 files are in flight; a decoder that dies on one file.
SLOW = {"EMBINDEX_FAULT": "slow:0.02"}
CRASH = {"EMBINDEX_FAULT": "crash:plain.bmp"}
RAY_SECTION = {"gpus_per_actor": 0, "actor_cpus": 0.5, "decode_cpus": 0.5, "decode_files": 16}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray for the module: its start costs ~8 s on 2 cores."""
    saved = {key: os.environ.get(key) for key in TEST_ENV}
    os.environ.update(TEST_ENV)
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _config(folder: Path, model: Path, roots: list[str], runner: str, **run: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, roots, str(model),
                        run={"runner": runner, "shard_size": 64, "ray": RAY_SECTION, **run})


def _images(folder: Path) -> pa.Table:
    return LanceSink(str(folder / "index"), "images").read("images").sort_by([("root", "ascending"),
                                                                              ("path", "ascending")])


def _assert_exactly_once(folder: Path, rows: int) -> None:
    """`rows` rows in LanceDB and in Parquet, one per file, no key twice."""
    for table in (_images(folder), ParquetSink(str(folder / "embeddings")).read("images", ["root", "path"])):
        keys = pc.binary_join_element_wise(table["root"], table["path"], "\x00")
        assert table.num_rows == rows and pc.count_distinct(keys).as_py() == rows


def _worker_pids(name: str) -> list[int]:
    """Ray worker processes whose title names this stage (Ray sets `ray::<task or actor>`)."""
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::") and name in cmdline:
            pids.append(process.info["pid"])
    return pids


def _wait_for_rows(folder: Path, at_least: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rows = LanceSink(str(folder / "index"), "images").count_rows("images")
        except Exception:  # a table being created reads as absent for a moment
            rows = 0
        if rows >= at_least:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"no {at_least} committed rows within {timeout_s} s")


def run_killing(config: object, folder: Path, stages: tuple[str, ...]) -> tuple[object, dict[str, int]]:
    """run_index, SIGKILLing one worker process of each stage once the first shard is committed."""
    killed: dict[str, int] = {}

    def kill_workers() -> None:
        killed["rows_before"] = _wait_for_rows(folder, 1)
        for stage in stages:
            pids = _worker_pids(stage)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed[stage] = pids[0]

    killer = threading.Thread(target=kill_workers, daemon=True)
    killer.start()
    result = run_index(config, progress=False)
    killer.join(timeout=5)
    return result, killed


def test_ray_runner_writes_the_local_runners_rows(ray_address: str, tmp_path: Path, tiny_models: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos and hostile files, one of which kills its decoder: the same rows, vectors and errors."""
    monkeypatch.setenv(*next(iter(CRASH.items())))
    roots = [str(IMAGES), str(HOSTILE)]
    local = run_index(load_config(_config(tmp_path / "local", tiny_models / "clip", roots, "local")), progress=False)
    on_ray = run_index(load_config(_config(tmp_path / "ray", tiny_models / "clip", roots, "ray")), progress=False)

    assert local.exit_code == on_ray.exit_code == 0
    expected, got = _images(tmp_path / "local"), _images(tmp_path / "ray")
    keys = [set(zip(t["root"].to_pylist(), t["path"].to_pylist())) for t in (expected, got)]
    assert keys[0] == keys[1], f"only in the local run: {keys[0] - keys[1]}; only on Ray: {keys[1] - keys[0]}"
    assert got.schema == expected.schema and got.num_rows == expected.num_rows == 400 + 17
    for column in ("root", "path", "size_bytes", "mtime_ns", "content_hash", "width", "height", "model"):
        assert got[column].equals(expected[column]), column
    vectors = [np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (expected, got)]
    assert (vectors[0] * vectors[1]).sum(axis=1).min() >= 0.9999
    errors = [LanceSink(str(tmp_path / f / "index"), "images").read("errors").sort_by("path") for f in ("local", "ray")]
    assert errors[1]["path"].to_pylist() == sorted([*HOSTILE_ERRORS, "plain.bmp"])
    for column in ("path", "error", "attempts"):
        assert errors[1][column].equals(errors[0][column]), column
    assert "decoder crashed (exit code 139)" in errors[1]["error"].to_pylist()
    _assert_exactly_once(tmp_path / "ray", 417)

    report = on_ray.report
    assert report["runner"] == "ray" and report["images_embedded"] == 417 and report["errors"] == local.report["errors"]
    assert report["fingerprint"] == local.report["fingerprint"]
    nodes, gpus = report["ray"]["per_node"], report["ray"]["per_gpu"]
    assert sum(n["decoded"] for n in nodes.values()) == 425 and sum(n["encoded"] for n in nodes.values()) == 417
    assert sum(g["images"] for g in gpus.values()) == 417 and all(g["images_per_s"] > 0 for g in gpus.values())
    # The embedding phase starts when the first actor has loaded its model, as the local runner's does.
    ray = report["ray"]
    assert 0 < ray["actor_start_s"] <= ray["first_result_s"] <= ray["total_s"]
    assert report["embed_s"] == pytest.approx(ray["total_s"] - ray["actor_start_s"])
    assert report["model_load_s"] >= ray["actor_start_s"] >= ray["actor_load_s"]
    markdown = (on_ray.report_dir / "report.md").read_text()
    assert "| Node | Decoded |" in markdown and next(iter(gpus)) in markdown
    assert f"the first actor ready {ray['actor_start_s']:.1f} s after the pipeline's start" in markdown


def test_a_killed_ray_worker_loses_nothing(ray_address: str, tmp_path: Path, tiny_models: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the embed actor and a decode worker after the first shard: Ray restarts and retries them."""
    monkeypatch.setenv(*next(iter(SLOW.items())))
    folder = tmp_path / "index-root"
    config = load_config(_config(folder, tiny_models / "clip", [str(IMAGES)], "ray"))
    result, killed = run_killing(config, folder, ("EmbedActor", "decode_block"))

    assert "EmbedActor" in killed and killed["rows_before"] < 400, killed
    assert result.exit_code == 0 and result.report["images_embedded"] == 400
    assert result.report["ray"]["first_result_s"] is not None
    _assert_exactly_once(folder, 400)


def test_a_killed_driver_resumes_exactly_once(ray_address: str, tmp_path: Path, tiny_models: Path) -> None:
    """SIGKILL `embindex run --address` after its first shard; the next run adds only what is missing."""
    folder = tmp_path / "index-root"
    config_path = _config(folder, tiny_models / "clip", [str(IMAGES)], "ray")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config_path), "--quiet",
                               "--address", ray_address], cwd=REPO, env={**os.environ, **TEST_ENV, **SLOW},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_rows(folder, 1)
    finally:
        driver.send_signal(signal.SIGKILL)
        _, stderr = driver.communicate(timeout=30)
    committed = LanceSink(str(folder / "index"), "images").count_rows("images")
    assert 0 < committed < 400, (committed, stderr[-2000:])

    resumed = run_index(load_config(config_path), progress=False)
    assert resumed.exit_code == 0
    assert resumed.report["files_unchanged"] == committed
    assert resumed.report["images_embedded"] == 400 - committed
    _assert_exactly_once(folder, 400)

    again = run_index(load_config(config_path), progress=False)  # nothing pending: Ray is not even asked
    assert again.report["images_embedded"] == 0 and again.report["files_unchanged"] == 400
    assert "ray" not in again.report


def test_no_gpu_in_the_cluster_is_a_config_error(ray_address: str, tmp_path: Path, tiny_models: Path) -> None:
    config = load_config(_config(tmp_path, tiny_models / "clip", [str(IMAGES)], "ray",
                                 ray={**RAY_SECTION, "gpus_per_actor": 1}))
    with pytest.raises(ConfigError, match="run.ray.gpus_per_actor"):
        run_index(config, progress=False)


def test_more_gpu_actors_than_gpus_is_a_config_error(tmp_path: Path, tiny_models: Path) -> None:
    """Ray would wait for ever for GPUs the cluster lacks; the run stops at once naming the key."""
    class TwoGpuCluster:
        @staticmethod
        def cluster_resources() -> dict[str, float]:
            return {"CPU": 32.0, "GPU": 2.0}

    def actors(**ray: object) -> int:
        return _n_actors(TwoGpuCluster, load_config(_config(tmp_path, tiny_models / "clip", [str(IMAGES)], "ray",
                                                           ray={**RAY_SECTION, **ray})))

    assert actors(gpus_per_actor=1, num_gpu_actors="auto") == 2
    assert actors(gpus_per_actor=0.5, num_gpu_actors="auto") == 4
    assert actors(gpus_per_actor=1, num_gpu_actors=2) == 2
    with pytest.raises(ConfigError, match=r"run.ray.num_gpu_actors: 3 actors of 1 GPU need more than the cluster's 2"):
        actors(gpus_per_actor=1, num_gpu_actors=3)


def test_ray_options_are_checked(tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, tiny_models / "clip", [str(IMAGES)], "ray", ray={"num_gpu_actors": 0})
    with pytest.raises(ConfigError, match="run.ray.num_gpu_actors"):
        load_config(path)
    path = _config(tmp_path, tiny_models / "clip", [str(IMAGES)], "ray", ray={"decode_files": 16, "colour": 1})
    with pytest.raises(ConfigError, match="run.ray.colour: unknown key"):
        load_config(path)
    # Without the extra, run.runner: ray is a config error (exit 2) naming the key and the install.
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"run.runner: 'ray' needs Ray Data: pip install 'embindex\[ray\]'"):
        _require_ray()
    monkeypatch.undo()
    # An address that does not answer fails at once (ray.init would retry it for many minutes); the CLI
    # turns the ConnectionError into exit 1 and one line.
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 127.0.0.1:1 .run.ray.address."):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(ConfigError, match="run.ray.address: expected auto, HOST:PORT"):
        _check_reachable("ray://headnode")
