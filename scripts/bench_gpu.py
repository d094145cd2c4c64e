"""One invocation on a GPU machine: the naive baseline, the model-only bound and embindex end to end.

    python scripts/bench_gpu.py --images .carry/images --models clip-vit-b16,clip-vit-l14 \
        --copies 200 --large-copies 20 --work /tmp/bench-gpu --out "$OUT"

For each model, over the same files:
- naive: torch DataLoader (16 workers), PIL decode, torchvision transforms per image, fp16 model;
- model-only: random pixel tensors already on the GPU, bf16, the same batch size;
- embindex: `python -m pipeline.cli run` (Parquet sink), with decode.device cpu and cuda: its report's images/s.
Then embindex on 12-megapixel JPEGs (upscaled copies) with the first model. Prints a JSON summary
with the ratios. Models are full-size architectures with random weights (make_full_size_models.py).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report_check import build_corpus, distinct  # noqa: E402 - a sibling script

REPO = Path(__file__).resolve().parents[1]


def _upscale(job: tuple[str, str, int]) -> None:
    source, target, copy = job
    image = Image.open(source).convert("RGB").resize((4000, 3000), Image.Resampling.BILINEAR)
    image, quality = distinct(image, copy)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    Path(target).write_bytes(buffer.getvalue())


class NaiveDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose([
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.files[index]).convert("RGB"))


def naive_baseline(model_dir: str, files: list[Path], batch_size: int) -> float:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    loader = torch.utils.data.DataLoader(NaiveDataset(files), batch_size=batch_size, num_workers=16,
                                         pin_memory=True)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            model.get_image_features(pixel_values=batch.cuda(non_blocking=True).half())
    torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - started)


def model_only(model_dir: str, batch_size: int, steps: int = 30) -> float:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    pixels = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            model.get_image_features(pixel_values=pixels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            model.get_image_features(pixel_values=pixels)
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def cli_run(work: Path, name: str, corpus: Path, encoder: dict, decode: dict | None = None,
            keep: bool = False) -> tuple[dict | None, float, str]:
    """`embindex run` as a user runs it (Parquet sink, shards of 8,192) into work/NAME-*: (its report or None if
    it failed, the whole command's seconds, its stderr). A fresh index unless `keep` (an increment)."""
    if not keep:  # a rerun would reuse every vector
        for leftover in (work / f"{name}-embeddings", work / f"{name}-runs"):
            shutil.rmtree(leftover, ignore_errors=True)
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"root": str(corpus)}, "decode": decode or {}, "encoder": encoder,
        "output": {"lancedb": None, "parquet": {"dir": str(work / f"{name}-embeddings")}},
        "run": {"report_dir": str(work / f"{name}-runs"), "shard_size": 8192},
    }))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    command_s = time.perf_counter() - started
    if done.returncode != 0:
        return None, command_s, done.stderr
    return json.loads(sorted((work / f"{name}-runs").glob("*/report.json"))[-1].read_text()), command_s, done.stderr


def embindex(model_dir: str, corpus: Path, work: Path, batch_size: int, name: str, decode_device: str) -> dict:
    encoder = {"model": model_dir, "device": "cuda", "dtype": "bfloat16", "batch_size": batch_size}
    report, outside_s, stderr = cli_run(work, f"{name}-{decode_device}-decode", corpus, encoder,
                                        {"device": decode_device})
    if report is None:
        raise SystemExit(f"embindex failed: {stderr[-3000:]}")
    keys = ("images_embedded", "images_encoded", "images_reused", "images_per_s", "embed_s", "processing_s",
            "model_load_s", "images_gpu_decoded", "gpu_busy_pct", "decode_wait_s", "first_decode_wait_s",
            "main_process_cpu_s", "stage_s", "peak_vram_nvml_mb", "decode_workers")
    return {**{k: report[k] for k in keys}, "gpu_feed": report.get("gpu_feed"), "outside_s": outside_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", default="clip-vit-b16,clip-vit-l14")
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--large-copies", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--decode-devices", default="cpu,cuda", help="embindex runs with decode.device set to each")
    args = parser.parse_args()

    models_dir = args.work / "models"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_full_size_models.py"), str(models_dir), "--models",
                    args.models], check=True, capture_output=True)
    corpus = args.work / "corpus"
    n_files = build_corpus(args.images, args.copies, corpus)
    files = sorted(corpus.rglob("*.JPEG")) + sorted(corpus.rglob("*.jpg"))
    summary: dict = {"files": n_files, "batch_size": args.batch_size, "gpu": torch.cuda.get_device_name(),
                     "models": {}}
    print(f"corpus: {n_files} files", flush=True)
    for name in args.models.split(","):
        model_dir = str(models_dir / name)
        result = {"model_only_images_per_s": model_only(model_dir, args.batch_size)}
        if not args.skip_naive:
            result["naive_images_per_s"] = naive_baseline(model_dir, files, args.batch_size)
        for decode_device in args.decode_devices.split(","):
            run = embindex(model_dir, corpus, args.work, args.batch_size, name, decode_device)
            run["over_model_only"] = run["images_per_s"] / result["model_only_images_per_s"]
            if "naive_images_per_s" in result:
                run["over_naive"] = run["images_per_s"] / result["naive_images_per_s"]
            result[f"embindex_{decode_device}_decode"] = run
        summary["models"][name] = result
        print(name, json.dumps(result), flush=True)
    if args.large_copies:
        large = args.work / "large"
        summary["large_files"] = build_corpus(args.images, args.large_copies, large, make=_upscale, chunksize=4)
        first = args.models.split(",")[0]
        summary["large_12mp"] = {device: embindex(str(models_dir / first), large, args.work, args.batch_size,
                                                  f"{first}-12mp", device)
                                 for device in args.decode_devices.split(",")}
        print("12mp", json.dumps(summary["large_12mp"]), flush=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
