"""Check a GPU run's report against independent witnesses: nvidia-smi sampling, an outside clock,
the rows actually written, and a plain Hugging Face forward pass's torch memory counters.

Run on a CUDA machine from the repository root, e.g.:
    python scripts/gpu_report_check.py --images .carry/images --copies 48 --model /tmp/models/clip-vit-b16 \
        --batch-size 256 --work /tmp/check --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import pyarrow.dataset as ds
import yaml
from PIL import Image, ImageOps


def distinct(image: Image.Image, copy: int) -> tuple[Image.Image, int]:
    """Copy number -> (image, JPEG quality), different for every copy: mirrored or not (copy % 2), one of
    20 qualities ((copy // 2) % 20) and 0, 1, 2... columns cut off (copy // 40). Identical bytes would be
    embedded once (content-hash reuse) and inflate images/s."""
    if copy % 2:
        image = ImageOps.mirror(image)
    if copy // 40:
        image = image.crop((0, 0, image.width - copy // 40, image.height))
    return image, 75 + (copy // 2) % 20


def _variant(job: tuple[str, str, int]) -> None:
    source, target, copy = job
    image, quality = distinct(Image.open(source).convert("RGB"), copy)
    image.save(target, quality=quality)


def build_corpus(images: Path, copies: int, folder: Path, make: Callable = _variant, chunksize: int = 32) -> int:
    """`copies` distinct files per source JPEG, one folder per copy, written by `make` in parallel."""
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    jobs = []
    for copy in range(copies):
        (folder / f"copy{copy:03d}").mkdir(parents=True, exist_ok=True)
        jobs += [(str(s), str(folder / f"copy{copy:03d}" / s.name), copy) for s in sources]
    with Pool() as pool:
        pool.map(make, jobs, chunksize=chunksize)
    return len(jobs)


class SmiSampler:
    """nvidia-smi's own loop, every 50 ms: memory used (MiB) and GPU utilisation (%)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,memory.used,utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "50"], stdout=path.open("w"), stderr=subprocess.DEVNULL)

    def stop(self) -> list[tuple[float, float]]:
        self.process.terminate()
        self.process.wait()
        samples = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[1].isdigit():
                samples.append((float(parts[1]), float(parts[2])))
        return samples


def plain_forward_peak_mb(model_dir: str, batch_size: int) -> dict:
    """Peak torch memory of the bare HF model at this batch size, bf16, outside the pipeline."""
    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    pixels = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(3):
            model.get_image_features(pixel_values=pixels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        steps = 20
        for _ in range(steps):
            model.get_image_features(pixel_values=pixels)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    mb = 1024 * 1024
    return {"allocated_mb": torch.cuda.max_memory_allocated() / mb,
            "reserved_mb": torch.cuda.max_memory_reserved() / mb,
            "model_only_images_per_s": steps * batch_size / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=48)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    corpus = args.work / "corpus"
    started = time.perf_counter()
    n_files = build_corpus(args.images, args.copies, corpus)
    print(f"corpus: {n_files} JPEGs in {time.perf_counter() - started:.1f} s", flush=True)

    config = {
        "input": {"root": str(corpus)},
        "encoder": {"model": args.model, "device": "cuda", "dtype": "bfloat16", "batch_size": args.batch_size},
        "output": {"lancedb": None, "parquet": {"dir": str(args.work / "embeddings")}},
        "run": {"report_dir": str(args.work / "runs")},
    }
    config_path = args.work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    sampler = SmiSampler(args.out / "nvidia_smi.csv")
    time.sleep(0.5)
    outside_started = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config_path), "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True)
    outside_wall_s = time.perf_counter() - outside_started
    samples = sampler.stop()
    print(run.stderr[-3000:], flush=True)
    if run.returncode != 0:
        raise SystemExit(f"embindex run failed with exit code {run.returncode}")

    report = json.loads(sorted((args.work / "runs").glob("*/report.json"))[-1].read_text())
    parts = sorted((args.work / "embeddings" / "images").glob("*.parquet"), key=os.path.getmtime)
    rows = ds.dataset(args.work / "embeddings" / "images").count_rows()
    # Throughput from the part files' own timestamps: rows committed after the first shard,
    # over the time between the first and the last commit.
    first_rows = ds.dataset(parts[0]).count_rows()
    span_s = os.path.getmtime(parts[-1]) - os.path.getmtime(parts[0])
    baseline_mb = samples[0][0] if samples else 0.0
    busy = [u for _, u in samples if u > 0]

    plain = plain_forward_peak_mb(args.model, args.batch_size)
    result = {
        "files": n_files,
        "rows_in_parquet": rows,
        "report": {k: report[k] for k in ("images_embedded", "wall_s", "model_load_s", "processing_s", "images_per_s",
                                          "encode_images_per_s", "peak_vram_allocated_mb", "peak_vram_reserved_mb",
                                          "peak_vram_nvml_mb", "peak_host_rss_mb", "stage_s", "decode_wait_s",
                                          "gpu_name", "batch_size", "decode_workers")},
        "outside_wall_s": outside_wall_s,
        "outside_images_per_s_whole_command": rows / outside_wall_s,
        "steady_images_per_s_from_part_mtimes": (rows - first_rows) / span_s if span_s > 0 else None,
        "nvidia_smi_peak_used_mb": max((m for m, _ in samples), default=None),
        "nvidia_smi_baseline_used_mb": baseline_mb,
        "nvidia_smi_mean_util_pct_while_busy": sum(busy) / len(busy) if busy else None,
        "nvidia_smi_samples": len(samples),
        "plain_hf_forward": plain,
        "command": " ".join(command),
    }
    (args.out / "check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
