"""GPU check of encoder.dtype float8 against bfloat16: model-only images/s (eager and compiled) and how close
the vectors of real photos stay (cosine, top-10 neighbours).

Run on an FP8 GPU (Hopper/Ada) from the repository root, with torchao installed:

    python scripts/make_full_size_models.py /tmp/models --models clip-vit-b16
    python scripts/fp8_check.py /tmp/models/clip-vit-b16 --images .carry/images --out "$OUT"

Model-only: random pixels, normalised and on the GPU before timing, batch 256, 30 timed steps after the
warm-up (the first call, which compiles, is timed apart), bracketed by cuda synchronize. Accuracy: each
photo is decoded with the pipeline's own decode (the encoder's input spec) and encoded by both encoders
(eager); the cosine of its float8 vector to its bfloat16 one, and for 100 query photos the overlap of
their 10 nearest other photos by bfloat16 vectors and by float8 vectors. Prints a JSON summary and
writes OUT/fp8_check.json; a failing variant records its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import DecodeConfig, EncoderConfig  # noqa: E402 - after the path above
from pipeline.decode.image import decode_file  # noqa: E402
from pipeline.encode.models.float8 import float8_linears  # noqa: E402
from pipeline.encode.models.load import load_encoder  # noqa: E402

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _versions() -> dict[str, Any]:
    import transformers

    versions: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                                "cuda": torch.version.cuda}
    try:
        import torchao

        versions["torchao"] = torchao.__version__
    except Exception as exc:  # reported, not fatal
        versions["torchao"] = _error(exc)
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return versions


def _random_pixel_values(encoder: Any, batch_size: int) -> torch.Tensor:
    """Random uint8 images, normalised as encode_images does, in the model's dtype on the GPU."""
    height, width, _ = encoder.input_spec().output_shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, device="cuda",
                           generator=generator)
    return (pixels.float() * encoder._scale + encoder._shift).to(encoder.dtype)


def measure(features: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor, warmup: int,
            steps: int) -> dict[str, float]:
    """images/s of `features` over `steps` calls after `warmup` (the first of which is timed alone)."""
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        torch.cuda.synchronize()
        started = time.perf_counter()
        features(pixel_values)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - started
        for _ in range(max(warmup - 1, 0)):
            features(pixel_values)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            features(pixel_values)
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    batch_size = pixel_values.shape[0]
    return {"images_per_s": round(batch_size * steps / wall_s, 1), "ms_per_batch": round(1000 * wall_s / steps, 3),
            "first_call_s": round(first_call_s, 2),
            "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def load_photos(folder: Path, spec: Any, limit: int | None) -> tuple[torch.Tensor, list[str]]:
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in EXTENSIONS)[:limit]
    max_pixels = DecodeConfig().max_image_pixels
    pixels, names = [], []
    for path in files:
        try:
            pixels.append(torch.from_numpy(decode_file(str(path), spec, max_pixels).pixels.copy()))
            names.append(path.name)
        except Exception as exc:  # a bad photo is skipped, as the pipeline would
            logging.warning("skipped %s: %s", path, _error(exc))
    if not pixels:
        raise SystemExit(f"no decodable images under {folder}")
    return torch.stack(pixels), names


def encode_all(encoder: Any, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([encoder.encode_images(pixels[start:start + batch_size]).float()
                      for start in range(0, len(pixels), batch_size)])


def neighbour_overlap(reference: torch.Tensor, other: torch.Tensor, queries: int, k: int) -> float:
    """Mean share of each query's k nearest other photos by `reference` vectors found by `other` vectors."""
    queries = min(queries, len(reference))
    k = min(k, len(reference) - 1)
    overlaps = []
    for vectors in (reference, other):
        similarity = vectors[:queries] @ vectors.T
        similarity[torch.arange(queries), torch.arange(queries)] = -float("inf")  # not itself
        overlaps.append(similarity.topk(k, dim=1).indices.cpu().tolist())
    shared = [len(set(a) & set(b)) / k for a, b in zip(*overlaps)]
    return round(sum(shared) / len(shared), 4)


def accuracy(bf16: Any, fp8: Any, folder: Path, batch_size: int, queries: int, k: int,
             limit: int | None) -> dict[str, Any]:
    pixels, names = load_photos(folder, bf16.input_spec(), limit)
    with torch.inference_mode():
        reference, ours = encode_all(bf16, pixels, batch_size), encode_all(fp8, pixels, batch_size)
    cosine = (reference * ours).sum(dim=-1).cpu()
    worst = int(cosine.argmin())
    return {
        "n_images": len(names),
        "cosine_mean": round(cosine.mean().item(), 5),
        "cosine_p01": round(cosine.quantile(0.01).item(), 5),
        "cosine_min": round(cosine.min().item(), 5),
        "worst_image": names[worst],
        "share_below_0_99": round((cosine < 0.99).float().mean().item(), 4),
        f"top{k}_overlap": neighbour_overlap(reference, ours, queries, k),
        "queries": min(queries, len(names)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (scripts/make_full_size_models.py) or hub id")
    parser.add_argument("--images", type=Path, required=True, help="a folder of real photos")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": args.model, **_versions(), "batch_size": args.batch_size,
                               "steps": args.steps, "warmup": args.warmup, "variants": {}}

    def save() -> None:
        (args.out / "fp8_check.json").write_text(json.dumps(summary, indent=2))

    encoders: dict[str, Any] = {}
    for dtype in ("bfloat16", "float8"):
        try:
            encoders[dtype] = load_encoder(EncoderConfig(model=args.model, device="cuda", dtype=dtype))
        except Exception as exc:  # the other dtype still runs
            traceback.print_exc()
            summary[f"load_error_{dtype}"] = _error(exc)
    if "float8" in encoders:
        convert, keep = float8_linears(encoders["float8"].model)
        summary["float8_layers"] = {"converted": len(convert), "kept_bfloat16": keep,
                                    "fingerprint_dtype": encoders["float8"].fingerprint()["dtype"]}

    for variant in ("bf16_eager", "bf16_compiled", "fp8_eager", "fp8_compiled"):
        dtype = "bfloat16" if variant.startswith("bf16") else "float8"
        if dtype not in encoders:
            summary["variants"][variant] = {"error": summary[f"load_error_{dtype}"]}
            continue
        encoder = encoders[dtype]
        try:
            features = encoder._image_features  # the model alone: pixels are normalised beforehand
            if variant.endswith("compiled"):
                torch._dynamo.reset()
                features = torch.compile(features, dynamic=False)
            result = measure(features, _random_pixel_values(encoder, args.batch_size), args.warmup, args.steps)
        except Exception as exc:  # the next variant still runs
            traceback.print_exc()
            result = {"error": _error(exc)}
        summary["variants"][variant] = result
        print(variant, json.dumps(result), flush=True)
        save()

    rates = {name: result.get("images_per_s") for name, result in summary["variants"].items()}
    for fp8, bf16 in (("fp8_eager", "bf16_eager"), ("fp8_compiled", "bf16_compiled")):
        if rates.get(fp8) and rates.get(bf16):
            summary[f"speedup_{fp8}_vs_{bf16}"] = round(rates[fp8] / rates[bf16], 3)

    if len(encoders) == 2:
        try:
            summary["accuracy"] = accuracy(encoders["bfloat16"], encoders["float8"], args.images,
                                           args.batch_size, args.queries, args.k, args.max_images)
        except Exception as exc:  # the timings above still count
            traceback.print_exc()
            summary["accuracy"] = {"error": _error(exc)}
    save()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
