"""One batched resize and center crop for decoded images of many sizes: PIL's antialiased bicubic as two matmuls."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pipeline.decode.spec import InputSpec, resized_size

BICUBIC_A = -0.5  # PIL's bicubic (and torch's antialiased one): a = -0.5, support 2
BICUBIC_SUPPORT = 2.0
# Images share a zero-padded canvas while it holds at most 3x their pixels: 500x375 and 375x500 (the common
# ImageNet sizes) pad to 500x500, 1.33x; a 12 MP photo among them gets its own canvas. Each canvas costs ~0.5 ms
# of host time on the H200 machine and padding almost nothing there (256 photos: 0.3 ms of GPU past the host's
# 6.7 ms); at 2x, 256 sample ImageNet photos took 3 to 6 canvases, at 3x they take 2.
PAD_RATIO = 3.0
# 128 MP a canvas: its fp16 copies (the packed images and the canvas, 6 bytes a pixel each) stay within 1.6 GB,
# under 2x a full decode chunk (DECODE_PIXELS, 1.2 GB of RGB). 256 ImageNet photos (53 MP) take one or two
# canvases, 12 MP photos go 10 to one.
MAX_CANVAS_PIXELS = 128_000_000
# Geometry per (height, width, orientation) and spec: the 400 sample ImageNet photos have 180 sizes.
GEOMETRY_ENTRIES = 4096


class Side(NamedTuple):
    """One side of one image as the canvas holds it: `size` pixels resized to `resized`, of which `kept`
    from `first` on come out at `pad` (zeros around them when smaller than the crop), `out` in all; read
    backwards when the EXIF orientation mirrors it; `taps`: PIL's kernel length (ksize)."""

    size: int
    resized: int
    first: int
    pad: int
    kept: int
    out: int
    flip: bool
    taps: int


class Geometry(NamedTuple):
    """How one stored image goes through a canvas: its rows and columns there, whether it goes in transposed,
    whether the canvas is the upright image transposed (PIL resizes it vertically first), the output size."""

    rows: Side
    cols: Side
    transpose: bool
    vertical_first: bool
    out: tuple[int, int]


class GeometryStats(NamedTuple):
    builds: int
    hits: int
    entries: int


def side(size: int, resized: int, crop: int | None, flip: bool) -> Side:
    """Center crop (or zero padding, centred as HF pads) of one side, as nvjpeg's old resized_float did."""
    if crop is None:
        out, first, pad = resized, 0, 0
    elif resized >= crop:
        out, first, pad = crop, (resized - crop) // 2, 0
    else:
        out, first, pad = crop, 0, (crop - resized) // 2
    support = BICUBIC_SUPPORT * max(size / resized, 1.0)
    return Side(size, resized, first, pad, min(out, resized), out, flip, int(math.ceil(support)) * 2 + 1)


def pil_vertical_first(height: int, width: int, new_h: int, new_w: int, crop: tuple[int, int] | None) -> bool:
    """Whether PIL resizes the rows first: Pillow 13 does when the height loses more than twice as many pixels
    as the width (ImagingResampleInner); Pillow 12 always goes horizontal first. Each pass rounds to 8 bits,
    so the order shows: up to 24 grey levels on noise. The sizes are those image.py asks PIL for: the crop's
    when it resizes only the kept box of a long image."""
    if crop is not None and new_h >= crop[0] and new_w >= crop[1] and new_h * new_w > 4 * crop[0] * crop[1]:
        new_h, new_w = crop
    return height - new_h > 0 and height - new_h > 2 * (width - new_w) and pillow_goes_vertical_first()


@functools.cache
def pillow_goes_vertical_first() -> bool:
    """Asks the CPU path's Pillow: a tall noise image resized directly and through its transpose come out
    the same only if both go vertical first (transposed, the horizontal pass is the vertical one)."""
    import numpy as np
    from PIL import Image

    tall = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 4), dtype=np.uint8))
    direct = tall.resize((3, 10), Image.Resampling.BICUBIC)
    transposed = tall.transpose(Image.Transpose.TRANSPOSE).resize((10, 3), Image.Resampling.BICUBIC)
    return direct.tobytes() == transposed.transpose(Image.Transpose.TRANSPOSE).tobytes()


def plan(height: int, width: int, orientation: int, spec: InputSpec) -> Geometry:
    """The geometry of a stored height x width image with an EXIF orientation (1-8, as orient() in nvjpeg.py)."""
    mirrored = orientation in (5, 6, 7, 8)
    if mirrored:  # the transpose; the flips are left to the weights, which read a side backwards
        height, width = width, height
    new_w, new_h = resized_size(width, height, spec)
    crop_h, crop_w = spec.crop if spec.crop is not None else (None, None)
    # After the transpose, orientations 3, 4, 7, 8 mirror the rows and 2, 3, 6, 7 the columns.
    rows = side(height, new_h, crop_h, orientation in (3, 4, 7, 8))
    cols = side(width, new_w, crop_w, orientation in (2, 3, 6, 7))
    out = (rows.out, cols.out)
    if pil_vertical_first(height, width, new_h, new_w, spec.crop):
        # Transposed, the canvas's first (horizontal) pass is PIL's vertical one.
        return Geometry(cols, rows, not mirrored, True, out)
    return Geometry(rows, cols, mirrored, False, out)


class GeometryCache:
    """Geometry per spec and (height, width, orientation), cleared when full: photo folders repeat a few
    camera sizes, so a batch looks up a dict per image and plans none (a plan is ~10 us of Python)."""

    def __init__(self, max_entries: int = GEOMETRY_ENTRIES) -> None:
        self.max_entries = max_entries
        self._tables: dict[InputSpec, dict[tuple[int, int, int], Geometry]] = {}
        self.builds = self.hits = 0

    def info(self) -> GeometryStats:
        return GeometryStats(self.builds, self.hits, sum(len(table) for table in self._tables.values()))

    def clear(self) -> None:
        self._tables.clear()

    def lookup(self, images: Sequence[torch.Tensor], orientations: Sequence[int], spec: InputSpec) -> list[Geometry]:
        table = self._tables.setdefault(spec, {})
        found, built = [], 0
        for image, orientation in zip(images, orientations):
            key = (image.shape[-2], image.shape[-1], orientation)
            geometry = table.get(key)
            if geometry is None:
                if len(table) >= self.max_entries:
                    table.clear()
                geometry = table[key] = plan(*key, spec)
                built += 1
            found.append(geometry)
        self.builds += built
        self.hits += len(found) - built
        return found


GEOMETRIES = GeometryCache()


def canvas_buckets(sizes: Sequence[tuple[int, int]], max_canvas_pixels: int) -> list[list[int]]:
    """Indices of images that share one canvas. Largest first, each into the first canvas that still holds at
    most PAD_RATIO times its images' pixels and at most max_canvas_pixels (a lone larger image is alone).
    256 of the sample ImageNet photos (123 sizes, 1600x1200 the largest) take 2 canvases; 250 random sizes
    of 50-600 pixels a side and two 12 MP photos, 8: the launches follow the canvases, not the sizes."""
    heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    area = sum(h * w for h, w in sizes)
    canvas = len(sizes) * max(heights) * max(widths)
    if canvas <= PAD_RATIO * area and canvas <= max_canvas_pixels:
        return [list(range(len(sizes)))]  # the usual batch: one canvas, rows in input order
    buckets: list[tuple[list[int], list[int]]] = []  # (indices, [height, width, pixels])
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1], reverse=True):
        h, w = sizes[index]
        for indices, shape in buckets:
            height, width = max(shape[0], h), max(shape[1], w)
            canvas = (len(indices) + 1) * height * width
            if canvas <= PAD_RATIO * (shape[2] + h * w) and canvas <= max_canvas_pixels:
                indices.append(index)
                shape[:] = [height, width, shape[2] + h * w]
                break
        else:
            buckets.append(([index], [h, w, h * w]))
    return [sorted(indices) for indices, _ in buckets]


def resize_batch(images: Sequence[torch.Tensor], orientations: Sequence[int], spec: InputSpec,
                 max_canvas_pixels: int = MAX_CANVAS_PIXELS,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[int]]:
    """uint8 (3, H, W) images as stored, any sizes, and their EXIF orientations -> (uint8 (B, h, w, 3)
    contiguous, oriented, resized and center-cropped as PIL would, and the input index of each row).

    Rows come in canvas order (input order when all images share one canvas). dtype: of the canvas and
    weights; fp16 on CUDA (holds 0-255 exactly; fp32 accumulation), fp32 on the CPU (its fp16 matmul is slow).
    No torch call is made per image (but a copy of each rotated one): ~80 calls a batch and ~45 a canvas;
    165 for 256 sample photos of 123 sizes, where the per-size loop this replaces made 510."""
    geometries = GEOMETRIES.lookup(images, orientations, spec)
    out_sizes = {geometry.out for geometry in geometries}
    if len(out_sizes) != 1:
        raise ValueError(f"images of one batch resize to different sizes: {sorted(out_sizes)[:4]}")
    (out_h, out_w), = out_sizes
    device = images[0].device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    canvases = plan_canvases(geometries, max_canvas_pixels)
    order = [i for members in canvases for i in members]
    # Everything the device needs to know, in one copy: each canvas's sides (its columns, then its rows),
    # then where each image's columns start among its canvas's packed rows, and how many there are.
    sides = [getattr(geometries[i], part) for members in canvases for part in ("cols", "rows") for i in members]
    widths = [geometries[i].cols.size for i in order]
    starts = [start for members in canvases for start in
              itertools.accumulate((geometries[i].cols.size for i in members[:-1]), initial=0)]
    sent = to_device(torch.tensor([*itertools.chain.from_iterable(sides), *starts, *widths], dtype=torch.float64),
                     device)
    params = sent[:8 * len(sides)].view(len(sides), 8)
    slots = sent[8 * len(sides):].view(2, len(order)).long()
    taps, weights = side_taps(params, max(s.taps for s in sides), max(out_h, out_w), dtype)
    pixels = torch.empty((len(images), out_h, out_w, 3), dtype=torch.uint8, device=device)
    start = 0
    for members in canvases:
        n = len(members)
        # torch._chunk_cat reads its inputs as laid out in memory: rotated images (EXIF 5-8, or the
        # vertical-first transpose) and any other strided ones are copied as they go in.
        views = [images[i].transpose(-1, -2) if geometries[i].transpose else images[i] for i in members]
        views = [view if view.is_contiguous() else view.contiguous() for view in views]
        canvas = pack_canvas(views, slots[:, start:start + n], dtype)
        height, width = canvas.shape[-2:]
        cols, rows = canvas_weights(taps[2 * start:2 * (start + n)], weights[2 * start:2 * (start + n)],
                                    max(height, width))
        out = pixels[start:start + n]
        resize_canvas(canvas, cols[:, :width, :out_w], rows[:, :height, :out_h],
                      out.transpose(1, 2) if geometries[members[0]].vertical_first else out)
        start += n
    return pixels, order


def plan_canvases(geometries: list[Geometry], max_canvas_pixels: int) -> list[list[int]]:
    """Indices of the images of each canvas: the vertical-first ones (transposed) never share one with the rest."""
    canvases = []
    for vertical_first in (False, True):
        indices = [i for i, geometry in enumerate(geometries) if geometry.vertical_first == vertical_first]
        if indices:
            sizes = [(geometries[i].rows.size, geometries[i].cols.size) for i in indices]
            canvases += [[indices[k] for k in bucket] for bucket in canvas_buckets(sizes, max_canvas_pixels)]
    return canvases


def canvas_weights(taps: torch.Tensor, weights: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A canvas's (n, length, out) column and row weight matrices from its 2n sides' taps (side_taps)."""
    sides, out, _ = taps.shape
    dense = torch.zeros((sides, length * out), dtype=weights.dtype, device=weights.device)
    dense.scatter_add_(1, taps.flatten(1), weights.flatten(1))  # a real tap once per output; dropped ones add 0
    dense = dense.view(sides, length, out)
    return dense[:sides // 2], dense[sides // 2:]


def pack_canvas(views: list[torch.Tensor], slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous uint8 (3, H, W) images, and (2, n) where their columns start side by side and how many
    -> (n, 3, Hmax, Wmax) zero-padded, a strided view. torch._chunk_cat (FSDP's fused copy: one kernel on
    CUDA) puts them side by side with their rows padded to Hmax; one gather spreads the columns into
    Wmax-wide slots. A copy per image, from Python, cost more than the per-size loop this replaces (5,045
    torch calls for 256 photos against 1,008; nested tensors 2,091)."""
    n, device = len(views), views[0].device
    height, width = max(v.shape[-2] for v in views), max(v.shape[-1] for v in views)
    zero = torch.zeros((3, 1, 1), dtype=torch.uint8, device=device)  # one column of zeros: the padding
    packed = torch._chunk_cat([*views, zero], dim=1, num_chunks=height).to(dtype)  # (3, Hmax, sum(widths) + 1)
    column = torch.arange(width, device=device)
    source = torch.where(column < slots[1, :, None], slots[0, :, None] + column, packed.shape[-1] - 1)
    spread = packed.index_select(2, source.flatten())  # (3, Hmax, n * Wmax)
    return spread.view(3, height, n, width).permute(2, 0, 1, 3)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without waiting: pinned first (a pageable copy can block the thread)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def resize_canvas(canvas: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 3, H, W) canvas, column weights (n, W, w), row weights (n, H, h) -> `out` (n, h, w, 3) uint8."""
    n, _, height, width = canvas.shape
    out_h, out_w = rows.shape[-1], cols.shape[-1]
    # The canvas's horizontal pass first, rounded and clipped to 8 bits, then the vertical one: PIL's 8-bit
    # intermediate (bicubic overshoots by up to ~8 % of the range at a hard edge; PIL clips it in between).
    across = torch.bmm(canvas.reshape(n, 3 * height, width), cols).view(n, 3, height, out_w)
    # Written as (n, H, 3, w): the vertical pass is then one plain bmm over all three channels.
    staged = torch.empty((n, height, 3, out_w), dtype=canvas.dtype, device=canvas.device)
    torch.clamp(across, 0, 255, out=staged.permute(0, 2, 1, 3)).round_()
    del across
    down = torch.bmm(rows.transpose(1, 2), staged.view(n, height, 3 * out_w))  # (n, h, 3 * w)
    out.copy_(down.view(n, out_h, 3, out_w).transpose(2, 3).clamp_(0, 255).round_())


def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic_filter (Resample.c)."""
    x = x.abs()
    near = ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    return torch.where(x < 1, near, torch.where(x < BICUBIC_SUPPORT, far, 0.0))


def side_taps(params: torch.Tensor, taps: int, out: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sides (m, 8: the fields of Side, float64, on the device), their longest kernel and the output length ->
    (where, weight), each (m, out, taps): the source taps of every output pixel of every side, as flat
    indices (source * out + output) into a (size, out) matrix. PIL's coefficients (precompute_coeffs: its
    window, rounded as its C casts do, renormalised where an edge drops taps), in float64 like PIL, for a
    whole batch at once: ~35 kernels, none per image or size."""
    device = params.device
    size, resized, first, pad, kept, _, flip, _ = params[:, :, None].unbind(1)  # each (m, 1)
    scale = size / resized
    filter_scale = scale.clamp(min=1.0)  # a downscale widens the kernel by its factor: that is the antialiasing
    support = BICUBIC_SUPPORT * filter_scale
    position = torch.arange(out, device=device, dtype=torch.float64)  # output pixel
    resized_index = position - pad  # among the kept resized pixels
    center = (first + resized_index + 0.5) * scale
    low = (center - support + 0.5).floor_().clamp_(min=0)
    high = torch.minimum((center + support + 0.5).floor_(), size)
    source = low[..., None] + torch.arange(taps, device=device, dtype=torch.float64)
    weights = bicubic((source - center[..., None] + 0.5) / filter_scale[..., None])
    keep = (source < high[..., None]) & ((resized_index >= 0) & (resized_index < kept))[..., None]
    weights = torch.where(keep, weights, 0.0)
    total = weights.sum(-1, keepdim=True)
    weights /= torch.where(total == 0, 1.0, total)
    # A mirrored side reads its source backwards; dropped taps (weight 0) point anywhere within the side.
    source = torch.where(flip[..., None] > 0, size[..., None] - 1 - source, source)
    source = torch.minimum(source.clamp_(min=0), size[..., None] - 1)
    return (source * out + position[:, None]).long(), weights.to(dtype)
