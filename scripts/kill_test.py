"""SIGKILL `embindex run` at random moments, again and again, then let one run finish; check nothing was lost.

    python scripts/kill_test.py --model tiny-models/clip --trials 50 --work /tmp/kill

Checks after the final run: one row per image, no duplicate paths, every vector equal (cosine >=
0.9999) to a clean uninterrupted run's, LanceDB and Parquet holding the same paths, no temporary
files, no decode worker outliving its killed parent, and the index readable after every kill.
Prints a JSON summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import psutil
import pyarrow.dataset as ds
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, photos: Path, model: str, shard_size: int, batch_size: int, workers: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "input": {"root": str(photos)},
        "decode": {"workers": workers},
        "encoder": {"model": model, "device": "cpu", "batch_size": batch_size},
        "output": {"lancedb": {"uri": "./index"}, "parquet": {"dir": "./embeddings"}},
        "run": {"report_dir": "./runs", "shard_size": shard_size},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_run(config: Path, slow_s: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "EMBINDEX_FAULT": f"slow:{slow_s}"} if slow_s else None
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def committed_rows(folder: Path) -> int:
    try:
        return lancedb.connect(str(folder / "index")).open_table("images").count_rows()
    except (ValueError, FileNotFoundError, OSError):
        return 0


def wait_for_next_commit(process: subprocess.Popen, folder: Path, timeout_s: float = 30.0) -> None:
    """Return once the run has committed a new shard (or ended): the kill then lands mid-work."""
    before = committed_rows(folder)
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline and committed_rows(folder) == before:
        time.sleep(0.05)


def read_index(folder: Path) -> dict[str, np.ndarray]:
    """Open both sinks as a reader would; raises if either is unreadable."""
    uri = folder / "index"
    vectors: dict[str, np.ndarray] = {}
    if uri.exists() and "images" in lancedb.connect(str(uri)).list_tables().tables:
        table = lancedb.connect(str(uri)).open_table("images").to_arrow()
        paths = table["path"].to_pylist()
        if len(set(paths)) != len(paths):
            raise AssertionError("duplicate paths in LanceDB")
        vectors = dict(zip(paths, np.stack(table["embedding"].to_numpy(zero_copy_only=False)) if paths else []))
    parquet = folder / "embeddings" / "images"
    if parquet.exists():
        ds.dataset(parquet).to_table(columns=["path"])
    return vectors


def leftovers(folder: Path) -> list[str]:
    """Temporary files our code writes (dot-named .tmp parquet parts, identity and report .tmp)."""
    return [str(p) for p in folder.rglob("*.tmp")]


def children_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def still_alive(processes: list[psutil.Process]) -> list[int]:
    """Children of a killed run that outlived it (decode workers exit when their pipe closes)."""
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "images")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work", type=Path, required=True)
    # Start-up (imports, model load) takes ~4 s on 2 cores: kill before, during and after it.
    parser.add_argument("--min-delay", type=float, default=0.5, help="kill no sooner than this after the start")
    parser.add_argument("--max-delay", type=float, default=9.0, help="kill within this many seconds of the start")
    # Small shards, one decode worker: a run takes long enough for kills to land mid-work and mid-commit.
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slow", type=float, default=0.02, help="extra seconds per file decode in killed runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    model = str(Path(args.model).resolve())

    shutil.rmtree(args.work, ignore_errors=True)
    photos = args.work / "photos"
    shutil.copytree(args.images, photos)
    n_images = len(list(photos.iterdir()))

    clean = write_config(args.work / "clean", photos, model, args.shard_size, args.batch_size, args.workers)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(clean), "--quiet"], cwd=REPO, check=True)
    reference = read_index(args.work / "clean")

    killed = write_config(args.work / "killed", photos, model, args.shard_size, args.batch_size, args.workers)
    kills, rows_after_kill, orphans = [], [], []
    for trial in range(args.trials):
        # Killed runs decode slowly (EMBINDEX_FAULT=slow) so that 20 kills spread over the work
        # instead of the first two finishing it; the vectors are the same, only later.
        process = start_run(killed, args.slow)
        started = time.monotonic()
        if trial % 4 == 0:  # any moment: start-up, scan, the first batches
            delay = rng.uniform(args.min_delay, args.max_delay)
        else:  # mid-work: after the run's next commit, inside a later batch or commit
            wait_for_next_commit(process, args.work / "killed")
            delay = time.monotonic() - started + rng.uniform(0.0, 1.0)
        try:
            process.wait(timeout=max(0.0, delay - (time.monotonic() - started)))
            kills.append(None)  # finished before its kill time
        except subprocess.TimeoutExpired:
            children = children_of(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills.append(round(delay, 2))
            time.sleep(1.0)
            orphans += still_alive(children)
        rows_after_kill.append(len(read_index(args.work / "killed")))  # readable after every kill

    final = start_run(killed)
    _, stderr = final.communicate()
    vectors = read_index(args.work / "killed")
    lance_paths = sorted(vectors)
    parquet_paths = sorted(ds.dataset(args.work / "killed" / "embeddings" / "images").to_table()["path"].to_pylist())
    cosines = [float(np.dot(vectors[p], reference[p])) for p in lance_paths if p in reference]
    summary = {
        "trials": args.trials,
        "killed": sum(k is not None for k in kills),
        "finished_before_kill": sum(k is None for k in kills),
        "kill_delays_s": kills,
        "rows_after_each_kill": rows_after_kill,
        "final_exit_code": final.returncode,
        "rows": len(lance_paths),
        "expected_rows": n_images,
        "parquet_rows": len(parquet_paths),
        "sinks_identical": lance_paths == parquet_paths,
        "min_cosine_vs_clean": min(cosines) if cosines else None,
        "temporary_files": leftovers(args.work / "killed"),
        "orphan_workers": orphans,
    }
    ok = (final.returncode == 0 and summary["rows"] == n_images and summary["parquet_rows"] == n_images
          and summary["sinks_identical"] and len(cosines) == n_images and min(cosines) >= 0.9999
          and not summary["temporary_files"] and not orphans)
    summary["ok"] = ok
    print(json.dumps(summary))
    if not ok:
        print(stderr, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
