"""Synthetic benchmark corpora: photo-like images (smooth colour fields, shapes, grain) of chosen sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MIN_SIDE = 8
FILES_PER_FOLDER = 1000  # keeps folders listable with plain tools at millions of files


@dataclass(frozen=True)
class SynthSpec:
    count: int
    width_mean: float
    width_stddev: float
    height_mean: float
    height_stddev: float
    format: str  # png | jpeg | random
    seed: int = 0


def image_sizes(spec: SynthSpec) -> np.ndarray:
    """(count, 2) widths and heights drawn from two normal distributions, at least MIN_SIDE."""
    rng = np.random.default_rng(spec.seed)
    widths = rng.normal(spec.width_mean, spec.width_stddev, spec.count)
    heights = rng.normal(spec.height_mean, spec.height_stddev, spec.count)
    return np.maximum(np.rint(np.stack([widths, heights], axis=1)), MIN_SIDE).astype(int)


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth colour field (upscaled coarse noise), a few soft shapes and sensor grain: codecs meet
    gradients, edges and texture as in photos, not the flat colour they would compress to nothing."""
    coarse = rng.integers(0, 256, (rng.integers(2, 7), rng.integers(2, 7), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 200)))
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int, str, int]) -> None:
    folder, index, width, height, fmt, seed = job
    rng = np.random.default_rng((seed, index))
    if fmt == "random":
        fmt = "png" if rng.random() < 0.5 else "jpeg"
    image = photo_like(width, height, rng)
    path = Path(folder) / f"synth_{index:08d}.{'jpg' if fmt == 'jpeg' else 'png'}"
    if fmt == "jpeg":
        image.save(path, "JPEG", quality=int(rng.integers(80, 96)))
    else:
        image.save(path, "PNG", compress_level=1)  # level 1: writing fast matters more than size here


def write_corpus(out_dir: str | os.PathLike[str], spec: SynthSpec, workers: int | None = None) -> int:
    """Write spec.count images under out_dir (1,000 per folder) in parallel; returns the count."""
    root = Path(out_dir)
    sizes = image_sizes(spec)
    jobs = []
    for index, (width, height) in enumerate(sizes):
        folder = root / f"{index // FILES_PER_FOLDER:05d}"
        if index % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder), index, int(width), int(height), spec.format, spec.seed))
    with get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_write, jobs, chunksize=16):
            pass
    return len(jobs)
