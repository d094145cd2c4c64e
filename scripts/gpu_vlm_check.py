"""GPU check of the vision-language encoders: images/s and peak VRAM of a full-size ColNomic-3B (random weights,
bfloat16) on mixed-size images at max_pixels 768x28x28, with the vision tower on varlen attention and on sdpa.

Encoder only (no decode, no storage): it isolates the model side; `embindex bench` measures whole runs.
Run on the GPU machine, from the repository root:

    python scripts/gpu_vlm_check.py OUT_DIR [--model DIR] [--images 64] [--batch-sizes 8,32]

Without --model it writes the random ColNomic-3B to /tmp first (scripts/make_full_size_models.py).
Writes OUT_DIR/gpu_vlm_check.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from pipeline.config import EncoderConfig
from pipeline.decode.spec import smart_resize
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.varlen import ATTENTION_NAME, set_vision_attention

# Page and photo shapes (width, height) whose smart-resized sizes all differ.
SHAPES = [(2480, 3508), (3508, 2480), (4000, 3000), (3000, 4000), (1920, 1080), (1080, 1920), (1000, 1000),
          (1700, 2200)]
MAX_PIXELS = 768 * 28 * 28


def make_images(count: int) -> list[torch.Tensor]:
    """Random uint8 images at the smart-resized sizes of SHAPES, as the decode workers would hand them over."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for index in range(count):
        width, height = SHAPES[index % len(SHAPES)]
        new_h, new_w = smart_resize(height, width, 28, 4 * 28 * 28, MAX_PIXELS)
        images.append(torch.randint(0, 256, (new_h, new_w, 3), dtype=torch.uint8, generator=generator))
    return images


def measure(encoder: object, images: list[torch.Tensor], batch_size: int) -> dict[str, float]:
    """Sorted by token count like the pipeline's groups; one warm-up batch, then every image once."""
    images = sorted(images, key=lambda image: image.shape[0] * image.shape[1])
    encoder.encode_image_list(images[:batch_size])  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    vectors = 0
    for start in range(0, len(images), batch_size):
        outputs = encoder.encode_image_list(images[start:start + batch_size])  # type: ignore[attr-defined]
        vectors += sum(len(out) for out in outputs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "seconds": seconds, "images_per_s": len(images) / seconds,
            "vectors_per_image": vectors / len(images),
            "peak_vram_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_vram_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", type=Path, help="a ColQwen2.5 / ColNomic folder (default: write a random one)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from make_full_size_models import write_retrieval_model

        model_dir = Path("/tmp/embindex-models/colnomic-3b")
        if not (model_dir / "config.json").exists():
            started = time.perf_counter()
            model_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            write_retrieval_model("colnomic-3b", model_dir, "cuda")
            torch.cuda.empty_cache()
            logging.info("wrote %s in %.0f s", model_dir, time.perf_counter() - started)
    started = time.perf_counter()
    encoder = load_encoder(EncoderConfig(model=str(model_dir), device="cuda", max_pixels=MAX_PIXELS))
    load_s = time.perf_counter() - started
    images = make_images(args.images)
    rows = []
    for attention in (ATTENTION_NAME, "sdpa"):
        set_vision_attention(encoder.model.visual, attention)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            row = {"vision_attention": attention, **measure(encoder, images, batch_size)}
            logging.info("%s", row)
            rows.append(row)
    result = {"model": str(model_dir), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "images": args.images, "max_pixels": MAX_PIXELS, "load_s": load_s, "rows": rows}
    (args.out_dir / "gpu_vlm_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"# {model_dir.name} on {result['device']} (torch {torch.__version__}), {args.images} mixed-size images, "
             "max_pixels 768x28x28, encoder only", "",
             "| Vision attention | Batch Size | Images/s | Vectors/image | Peak VRAM (allocated) "
             "| Peak VRAM (reserved) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['vision_attention']} | {r['batch_size']} | {r['images_per_s']:.1f} | {r['vectors_per_image']:.0f} "
              f"| {r['peak_vram_allocated_mb'] / 1024:.2f} GB | {r['peak_vram_reserved_mb'] / 1024:.2f} GB |"
              for r in rows]
    (args.out_dir / "gpu_vlm_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
