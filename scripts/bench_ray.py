"""The Ray runner on 1, 2 or more GPU actors against the local runner, over the same corpus (issues 8, 20, 22).

On a 2-GPU machine, from the repository root (Ray from carried wheels: scripts/pack_ray_wheels.sh):

    python3 scripts/bench_ray.py --synth 40000 --runs local,ray-1gpu,ray-2gpu,ray-1gpu-q1024,ray-2gpu-q1024 \
        --work /tmp/bench-ray --out "$OUT"

ColNomic-3B (random init) over 2,000 photos of mixed real sizes, the local runner against one GPU actor and
two actors sharing the one GPU (half a GPU each):

    python3 scripts/bench_ray.py --images .carry/images --mixed 2000 --full-size colnomic-3b --batch-size 16 \
        --set encoder.max_pixels=602112 --set encoder.min_pixels=3136 --runs local,ray-1gpu,ray-2x0.5gpu \
        --work /tmp/bench-ray --out "$OUT"

Builds full-size random-init CLIP ViT-L/14 (make_full_size_models.py) and a corpus (--synth N photo-like
JPEGs of ImageNet size, or --images DIR --copies K distinct re-encodes of real photos), then runs
`embindex run` once per kind in --runs (--rounds times over), each into a fresh Parquet dataset: the
local runner, the Ray runner with N GPU actors, optionally with run.ray.max_queued_mb (-q<MB>). Each run
must write exactly one row per file. Writes bench_ray.json and bench_ray.md (the table, and the ratios
the issue asks for: Ray 2 GPUs / Ray 1 GPU >= 1.8, Ray 1 GPU / local >= 0.9, from each kind's median)
to --out. `--device cpu --model tiny-models/clip` runs the same steps on a CPU machine (CPU actors; the
ratios then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

KEYS = ("images_embedded", "images_per_s", "embed_s", "wall_s", "model_load_s", "decode_workers", "stage_s",
        "decode_wait_s", "peak_vram_allocated_mb", "gpu_name", "device")


def build_corpus(args: argparse.Namespace, folder: Path) -> int:
    if folder.exists() and any(folder.iterdir()):
        return sum(1 for p in folder.rglob("*") if p.is_file())
    if args.images:
        from gpu_report_check import build_corpus as copies_of

        if args.mixed:
            return mixed_corpus(args.images, args.mixed, folder)
        return copies_of(args.images, args.copies, folder)
    from pipeline.tools.synth import SynthSpec, write_corpus

    # ImageNet-like sizes (the shared photos are mostly ~500x375).
    return write_corpus(folder, SynthSpec(args.synth, 500, 60, 375, 45, "jpeg", seed=8))


SCALES = [1.0, 1.5, 2.2, 3.2, 4.5]  # 500x375 photos -> 256..768 tokens of 28x28 after smart_resize
ASPECTS = [1.0, 0.75, 1.33, 0.6, 1.7]


def _mixed_copy(job: tuple[str, str, int]) -> None:
    """A photo cropped to one of ASPECTS and scaled by one of SCALES (as scripts/bench_colnomic.sh), distinct bytes."""
    from gpu_report_check import distinct
    from PIL import Image

    source, target, copy = job
    image = Image.open(source).convert("RGB")
    aspect, (width, height) = ASPECTS[copy % len(ASPECTS)], image.size
    box = (0, 0, int(height * aspect), height) if width / height > aspect else (0, 0, width, int(width / aspect))
    image = image.crop(box)
    scale = SCALES[(copy // len(ASPECTS)) % len(SCALES)]
    image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    image, quality = distinct(image, copy)
    image.save(target, quality=quality)


def mixed_corpus(images: Path, count: int, folder: Path) -> int:
    """`count` JPEGs of mixed real sizes and aspects made from the photos in `images`."""
    from multiprocessing import Pool

    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    jobs = []
    for copy in range(-(-count // len(sources))):
        (folder / f"copy{copy:03d}").mkdir(parents=True, exist_ok=True)
        jobs += [(str(s), str(folder / f"copy{copy:03d}" / s.name), copy) for s in sources]
    with Pool() as pool:
        pool.map(_mixed_copy, jobs[:count], chunksize=8)
    return min(count, len(jobs))


def model_folder(args: argparse.Namespace) -> str:
    if args.model:
        return str(Path(args.model).resolve())
    models = args.work / "models"
    if not (models / args.full_size / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_full_size_models.py"), str(models),
                        "--models", args.full_size], check=True, capture_output=True)
    return str(models / args.full_size)


def parse_kind(kind: str) -> tuple[int | None, float, int | None]:
    """local -> (None, 1, None); ray-2gpu -> (2, 1, None); ray-2x0.5gpu -> (2, 0.5, None) (two actors sharing
    one GPU); ray-2gpu-q2048 -> (2, 1, 2048): actors, GPUs per actor, run.ray.max_queued_mb."""
    if kind == "local":
        return None, 1.0, None
    parts = kind.split("-")
    queued = int(parts[2].removeprefix("q")) if len(parts) > 2 else None
    actors, _, share = parts[1].removesuffix("gpu").partition("x")
    return int(actors), float(share or 1), queued


def run_config(args: argparse.Namespace, name: str, corpus: Path, model: str, kind: str) -> Path:
    actors, gpus_per_actor, queued_mb = parse_kind(kind)
    cuda = args.device == "cuda"
    config = {
        "input": {"root": str(corpus)},
        "encoder": {"model": model, "device": args.device, "dtype": "bfloat16" if cuda else "float32",
                    "batch_size": args.batch_size},
        "output": {"lancedb": None, "parquet": {"dir": str(args.work / f"{name}-embeddings")}},
        "run": {"report_dir": str(args.work / f"{name}-runs"), "shard_size": 8192},
    }
    for setting in args.set:  # --set encoder.max_pixels=602112
        dotted, _, value = setting.partition("=")
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = yaml.safe_load(value)
    if actors is not None:
        config["run"].update(runner="ray", ray={
            "num_gpu_actors": actors, "gpus_per_actor": gpus_per_actor if cuda else 0,
            "actor_cpus": 1 if cuda else 0.5, "decode_cpus": 1 if cuda else 0.5,
            "object_store_mb": args.object_store_mb, "max_queued_mb": queued_mb})
    path = args.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def embindex_run(args: argparse.Namespace, name: str, config: Path, files: int) -> dict:
    import shutil

    import pyarrow.dataset as ds

    for stale in (f"{name}-embeddings", f"{name}-runs"):  # a rerun into an old index would embed nothing
        shutil.rmtree(args.work / stale, ignore_errors=True)

    # The repository first, then what the caller had (carried wheels: /tmp/site); Ray's workers inherit it.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    outside_s = time.perf_counter() - started
    (args.out / f"{name}.log").write_text(done.stderr[-20000:])
    if done.returncode != 0:
        raise SystemExit(f"{name}: embindex exited {done.returncode}: {done.stderr[-3000:]}")
    report = json.loads(sorted((args.work / f"{name}-runs").glob("*/report.json"))[-1].read_text())
    keys = ds.dataset(str(args.work / f"{name}-embeddings" / "images"), format="parquet").to_table(
        columns=["root", "path"])
    distinct = len(set(zip(keys["root"].to_pylist(), keys["path"].to_pylist())))
    result = {**{k: report.get(k) for k in KEYS}, "outside_s": outside_s, "rows": keys.num_rows,
              "exactly_once": keys.num_rows == distinct == files}
    if "ray" in report:
        result["ray"] = {k: report["ray"][k] for k in ("nodes", "embed_actors", "cpus", "gpus", "first_result_s",
                                                       "actor_start_s", "actor_load_s", "total_s", "per_node",
                                                       "per_gpu")}
    print(name, json.dumps({k: result[k] for k in ("images_per_s", "embed_s", "wall_s", "rows", "exactly_once")}),
          flush=True)
    return result


def markdown(summary: dict) -> str:
    lines = [f"{summary['files']} files, {summary['model']}, batch {summary['batch_size']}, "
             f"{summary.get('gpu_name') or summary['device']}", "",
             "| Run | Images/s | Embed s | Model load s | Wall s | Files / wall s | Rows | Exactly once | "
             "Per-actor images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in summary["runs"].items():
        actors = ", ".join(f"{g['images_per_s']:.0f}" for g in run.get("ray", {}).get("per_gpu", {}).values()) or "-"
        lines.append(f"| {name} | {run['images_per_s']:.1f} | {run['embed_s']:.1f} | {run['model_load_s']:.1f} | "
                     f"{run['wall_s']:.1f} | {run['rows'] / run['wall_s']:.0f} | {run['rows']} | "
                     f"{run['exactly_once']} | {actors} |")
    lines += ["", *[f"- median images/s, {k}: {v:.1f}" for k, v in summary["median_images_per_s"].items()],
              *[f"- {k}: {v:.3f}" for k, v in summary["ratios"].items()]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synth", type=int, help="this many synthetic photo-like JPEGs")
    source.add_argument("--images", type=Path, help="a folder of JPEGs to copy (with --copies)")
    parser.add_argument("--copies", type=int, default=100, help="distinct re-encodes per photo (with --images)")
    parser.add_argument("--mixed", type=int, help="with --images: this many copies of mixed sizes and aspects "
                                                  "(scaled x1 to x4.5: document-model inputs) instead of --copies")
    parser.add_argument("--model", help="a model folder instead of a full-size random-init one")
    parser.add_argument("--full-size", default="clip-vit-l14",
                        help="the random-init model scripts/make_full_size_models.py builds (e.g. colnomic-3b)")
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE in every run's config")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--object-store-mb", type=int, default=None, help="the Ray object store (default Ray's)")
    parser.add_argument("--runs", default="local,ray-1gpu,ray-2gpu",
                        help="local, ray-<N>gpu, or ray-<N>gpu-q<MB> (run.ray.max_queued_mb: decoded images "
                             "waiting for the actors, so decoding cannot finish the corpus before they start)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the runs this many times (in turn)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray started by the driver, on loopback only

    model = model_folder(args)
    corpus = args.work / "corpus"
    files = build_corpus(args, corpus)
    print(f"corpus: {files} files", flush=True)
    runs = {}
    for round_ in range(1, args.rounds + 1):
        for kind in args.runs.split(","):
            name = kind if args.rounds == 1 else f"{kind}-r{round_}"
            runs[name] = embindex_run(args, name, run_config(args, name, corpus, model, kind), files)
            (args.out / "bench_ray.partial.json").write_text(json.dumps(runs, indent=2, default=str))
    # Each kind's median over the rounds: identical runs differ by several percent.
    rate = {kind: statistics.median(run["images_per_s"] for name, run in runs.items()
                                    if name == kind or name.startswith(f"{kind}-r"))
            for kind in args.runs.split(",")}
    ratios = {}
    for suffix in sorted({kind.partition("gpu")[2] for kind in rate if kind.startswith("ray-")}):
        one, two = f"ray-1gpu{suffix}", f"ray-2gpu{suffix}"
        if one in rate and two in rate:
            ratios[f"{two} / {one} (goal >= 1.8)"] = rate[two] / rate[one]
        if one in rate and "local" in rate:
            ratios[f"{one} / local (goal >= 0.95)"] = rate[one] / rate["local"]
    for kind in rate:
        if "x" in kind.partition("-")[2] and "ray-1gpu" in rate:  # actors sharing one GPU
            ratios[f"{kind} / ray-1gpu"] = rate[kind] / rate["ray-1gpu"]
    summary = {"files": files, "model": model, "batch_size": args.batch_size, "device": args.device,
               "gpu_name": next((r["gpu_name"] for r in runs.values() if r.get("gpu_name")), None),
               "cpus": os.cpu_count(), "runs": runs, "median_images_per_s": rate, "ratios": ratios}
    (args.out / "bench_ray.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "bench_ray.md").write_text(markdown(summary))
    print(markdown(summary))
    if not all(run["exactly_once"] for run in runs.values()):
        raise SystemExit("a run did not write exactly one row per file")


if __name__ == "__main__":
    main()
