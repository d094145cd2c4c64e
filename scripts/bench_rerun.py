"""Time a nightly no-change rerun over many small files: wall clock and peak RSS of the whole process tree.

    python scripts/bench_rerun.py --model tiny-models/clip --count 100000 --work /tmp/rerun

Writes COUNT distinct small JPEGs, indexes them once, then runs `embindex run` again with nothing
changed and measures it from outside (wall clock; RSS of the command and its children sampled every
20 ms). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FILES_PER_FOLDER = 1000


def _write_chunk(job: tuple[str, int, int]) -> None:
    folder, start, stop = job
    rng = np.random.default_rng(start)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for index in range(start, stop):
        pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"{folder}/img{index:07d}.jpg", quality=85)


def make_files(root: Path, count: int) -> None:
    jobs = [(str(root / f"d{start // FILES_PER_FOLDER:04d}"), start, min(start + FILES_PER_FOLDER, count))
            for start in range(0, count, FILES_PER_FOLDER)]
    with Pool() as pool:
        pool.map(_write_chunk, jobs)


def timed_run(config: Path) -> dict:
    """Run embindex; sample the RSS of it and its children from outside."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                               stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall_s = time.perf_counter() - started
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"embindex run failed ({process.returncode}): {stderr[-2000:]}")
    return {"wall_s": round(wall_s, 2), "peak_tree_rss_mb": round(peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--skip-first", action="store_true", help="reuse an index built by an earlier call")
    args = parser.parse_args()

    photos = args.work / "photos"
    config = args.work / "config.yaml"
    if not args.skip_first:
        started = time.perf_counter()
        make_files(photos, args.count)
        print(f"wrote {args.count} files in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        config.write_text(yaml.safe_dump({
            "input": {"root": str(photos)},
            "encoder": {"model": str(Path(args.model).resolve()), "batch_size": 256},
            "output": {"lancedb": {"uri": "./index"}, "parquet": {"dir": "./embeddings"}},
            "run": {"report_dir": "./runs", "shard_size": 4096},
        }))
    first = None if args.skip_first else timed_run(config)
    rerun = timed_run(config)
    report = json.loads(sorted((args.work / "runs").glob("*/report.json"))[-1].read_text())
    print(json.dumps({
        "files": report["files_scanned"],
        "first_run": first,
        "no_change_rerun": rerun,
        "rerun_report": {k: report[k] for k in ("wall_s", "model_loaded", "files_unchanged", "images_embedded",
                                                "peak_host_rss_mb", "stage_s", "output_rows")},
    }, indent=2))


if __name__ == "__main__":
    main()
