"""Issue 17 in one invocation on a GPU machine: the model alone eager and compiled, embindex end to end, an increment.

    python scripts/bench_compile.py --images .carry/images --work /tmp/bc --out "$OUT" \
        --models clip-vit-b16,clip-vit-l14 --copies 100 --large-copies 30 --increment 1000 \
        --parts model,e2e,large,increment

Models are full-size architectures with random weights (make_full_size_models.py): speed and memory are
those of the trained ones. Parts (each prints its JSON line as it ends and is kept in bench_compile.json):
- model: our encoder (`load_encoder`, bf16) on uint8 batches already on the GPU, eager then compiled
  (`pipeline.encode.compiled`, the code a run uses), the same process and batches; cosine between them.
- e2e: `embindex run` (the CLI, Parquet sink) over `copies` x the photos (distinct files) per model, with
  encoder.compile true (its cache warm from the model part) and false; the report's figures.
- large: the first model over `large_copies` x the photos upscaled to 12 MP, compiled.
- increment: `increment` more distinct files into the first model's compiled index (compile cache warm):
  the report's wall_s - embed_s, startup_s, finish_s and the whole command's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import _upscale, cli_run  # noqa: E402 - sibling scripts
from gpu_report_check import _variant, build_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REPORT_KEYS = ("images_embedded", "images_encoded", "images_reused", "images_per_s", "embed_s", "wall_s",
               "startup_s", "imports_s", "describe_s", "compile_s", "finish_s", "model_load_s", "images_gpu_decoded",
               "gpu_busy_pct", "decode_wait_s", "first_decode_wait_s", "main_process_cpu_s", "stage_s",
               "peak_vram_nvml_mb", "decode_workers", "encode_images_per_s")
DEVICE, DTYPE = "cuda", "bfloat16"  # --smoke: cpu and float32, to try the script on a machine without a GPU


def _timed(encode, pixels: torch.Tensor, steps: int) -> float:  # noqa: ANN001
    for _ in range(3):
        encode(pixels)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        encode(pixels)
    torch.cuda.synchronize()
    return steps * len(pixels) / (time.perf_counter() - started)


def model_only(model_dir: str, batch_size: int, steps: int = 40) -> dict:
    """Eager and compiled images/s of our encoder on the same uint8 batch, and the cosine between them."""
    from pipeline.config import EncoderConfig
    from pipeline.encode import compiled
    from pipeline.encode.models.load import load_encoder

    encoder = load_encoder(EncoderConfig(model=model_dir, device=DEVICE, dtype=DTYPE, compile=False))
    height, width, _ = encoder.input_spec().output_shape
    pixels = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8, device=DEVICE)
    eager = _timed(encoder.encode_images, pixels, steps)
    eager_vectors = encoder.encode_images(pixels)
    choice = compiled.CompileChoice(True, "bench", str(compiled.cache_dir()))
    compiled.compile_encoder(encoder, choice, batch_size)
    fast = _timed(encoder.encode_images, pixels, steps)
    cosine = float((eager_vectors * encoder.encode_images(pixels)).sum(-1).min())
    odd = _timed(encoder.encode_images, pixels[:batch_size - 37], 10)  # another batch size: no recompile
    return {"eager_images_per_s": eager, "compiled_images_per_s": fast, "speedup": fast / eager,
            "compile_s_in_process": choice.compile_s, "min_cosine_to_eager": cosine,
            f"compiled_batch_{batch_size - 37}_images_per_s": odd}


def embindex(model_dir: str, corpus: Path, work: Path, name: str, batch_size: int, compile_setting: object,
             keep: bool = False) -> dict:
    """`embindex run` as a user runs it; a fresh index unless `keep` (an increment)."""
    encoder = {"model": model_dir, "device": DEVICE, "dtype": DTYPE, "batch_size": batch_size,
               "compile": compile_setting}
    report, command_s, stderr = cli_run(work, name, corpus, encoder, keep=keep)
    if report is None:
        return {"failed": True, "stderr": stderr[-3000:]}
    return {**{k: report.get(k) for k in REPORT_KEYS}, "compile": report.get("compile"),
            "gpu_feed": report.get("gpu_feed"), "command_s": command_s,
            "wall_minus_embed_s": report["wall_s"] - report["embed_s"]}


def _more_files(images: Path, first_copy: int, count: int, folder: Path) -> None:
    """`count` files with copy numbers past the corpus's: bytes no file in it has (no reuse by content hash)."""
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    jobs = []
    for index in range(count):
        copy = first_copy + index // len(sources)
        (folder / f"copy{copy:03d}").mkdir(parents=True, exist_ok=True)
        source = sources[index % len(sources)]
        jobs.append((str(source), str(folder / f"copy{copy:03d}" / source.name), copy))
    with Pool() as pool:
        pool.map(_variant, jobs, chunksize=16)


def _emit(summary: dict, key: str, value: object, out: Path) -> None:
    summary[key] = value
    print(key, json.dumps(value), flush=True)
    (out / "bench_compile.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", default="clip-vit-b16,clip-vit-l14")
    parser.add_argument("--copies", type=int, default=100)
    parser.add_argument("--large-copies", type=int, default=30)
    parser.add_argument("--increment", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--parts", default="model,e2e,large,increment")
    parser.add_argument("--e2e-compile", default="true,false", help="encoder.compile values, e2e, first model")
    parser.add_argument("--e2e-compile-others", default="true", help="encoder.compile values, e2e, other models")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", type=Path, help="a folder of tiny models: run on the CPU with them")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, DTYPE
        DEVICE, DTYPE = "cpu", "float32"
        torch.cuda.synchronize = lambda *a: None  # noqa: E731 - nothing to wait for on the CPU
    parts, models = set(args.parts.split(",")), args.models.split(",")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.work / "compile-cache"))
    summary: dict = {"gpu": torch.cuda.get_device_name() if not args.smoke else "cpu", "torch": torch.__version__,
                     "batch_size": args.batch_size}
    started = time.perf_counter()
    models_dir = args.smoke or args.work / "models"
    if not args.smoke:
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_full_size_models.py"), str(models_dir), "--models",
                        ",".join(models)], check=True, capture_output=True)
    corpus = args.work / "corpus"
    if parts & {"e2e", "increment"}:
        summary["files"] = build_corpus(args.images, args.copies, corpus)
    print(f"set-up {time.perf_counter() - started:.0f} s", flush=True)
    for name in models:
        model_dir = str(models_dir / name)
        if "model" in parts:
            _emit(summary, f"{name} model-only", model_only(model_dir, args.batch_size), args.out)
        if "e2e" in parts:
            for setting in (args.e2e_compile if name == models[0] else args.e2e_compile_others).split(","):
                value = {"true": True, "false": False}.get(setting, setting)
                _emit(summary, f"{name} e2e compile={setting}",
                      embindex(model_dir, corpus, args.work, f"{name}-{setting}", args.batch_size, value), args.out)
    first = str(models_dir / models[0])
    if "increment" in parts:
        name = f"{models[0]}-true"  # the e2e part's compiled index, else a fresh one
        if not ("e2e" in parts and "true" in args.e2e_compile.split(",")):
            _emit(summary, f"{name} base", embindex(first, corpus, args.work, name, args.batch_size, True), args.out)
        _more_files(args.images, args.copies, args.increment, corpus / "more")
        _emit(summary, f"{name} +{args.increment}",
              embindex(first, corpus, args.work, name, args.batch_size, True, keep=True), args.out)
        _emit(summary, f"{name} nothing new",
              embindex(first, corpus, args.work, name, args.batch_size, True, keep=True), args.out)
    if "large" in parts and args.large_copies:
        large = args.work / "large"
        summary["large_files"] = build_corpus(args.images, args.large_copies, large, make=_upscale, chunksize=4)
        _emit(summary, f"{models[0]} 12mp compile=true",
              embindex(first, large, args.work, f"{models[0]}-12mp", args.batch_size, True), args.out)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
