"""What the encoder wants from the decoder (InputSpec), read off an image processor, and the resize arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from pipeline.errors import DecodeError


@dataclass(frozen=True)
class InputSpec:
    """What the encoder wants from the decoder, read off the model's own image processor."""

    resize: Literal["shortest_edge", "exact", "smart"]
    size: tuple[int, int]  # (shortest_edge, shortest_edge) or (height, width); unused by "smart"
    crop: tuple[int, int] | None  # (height, width) center crop after resizing
    resample: int = Image.Resampling.BICUBIC
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    # "smart" (Qwen-VL dynamic resolution): keep the aspect ratio, sides multiples of `factor`,
    # height * width within [min_pixels, max_pixels]; every image keeps its own size.
    min_pixels: int = 0
    max_pixels: int = 0
    factor: int = 28
    # Pyramid tiles ((rows, cols) grids): each file gives the whole image and every grid cell, each
    # prepared as above, stacked as (n_tiles, H, W, 3).
    tiles: tuple[tuple[int, int], ...] | None = None

    @property
    def dynamic(self) -> bool:
        return self.resize == "smart"

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape of every output (fixed policies only: a smart resize gives each image its own)."""
        if self.dynamic:
            raise ValueError("a smart-resize spec has no fixed output shape; see max_output_pixels")
        height, width = self.crop if self.crop is not None else self.size
        return height, width, 3

    @property
    def max_output_pixels(self) -> int:
        """An upper bound on height * width of any output (sizes buffers for dynamic resolution)."""
        if not self.dynamic:
            height, width, _ = self.output_shape
            return height * width
        # smart_resize stays within max_pixels except when a side is clamped up to one factor
        return max(self.max_pixels, self.min_pixels) + 200 * self.factor * self.factor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as Qwen2-VL's image processor resizes them: multiples of `factor`, aspect kept,
    area within [min_pixels, max_pixels] (the same arithmetic, so token counts match the model's)."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise DecodeError(f"aspect ratio over 200: {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """(width, height) after resizing, with the same rounding as transformers' resize helpers."""
    if spec.resize == "smart":
        new_h, new_w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
        return new_w, new_h
    if spec.resize == "exact":
        return spec.size[1], spec.size[0]
    short_target = spec.size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_target * long / short)
    return (short_target, new_long) if width <= height else (new_long, short_target)


def input_spec_from_processor(processor: Any) -> InputSpec:
    """Read the resize/crop/normalise policy off a Hugging Face image processor."""
    size = dict(processor.size)
    if "shortest_edge" in size:
        resize, target = "shortest_edge", (size["shortest_edge"], size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize, target = "exact", (size["height"], size["width"])
    else:
        raise ValueError(f"unsupported image processor size policy: {size}")
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = dict(processor.crop_size)
        crop = (crop_size["height"], crop_size["width"])
    elif resize == "shortest_edge":
        raise ValueError("a shortest-edge resize without a center crop gives images of many sizes")
    resample = getattr(processor, "resample", 3)
    return InputSpec(
        resize=resize,
        size=target,
        crop=crop,
        resample=int(getattr(resample, "value", resample)),
        mean=tuple(float(m) for m in processor.image_mean),
        std=tuple(float(s) for s in processor.image_std),
        rescale_factor=float(getattr(processor, "rescale_factor", 1 / 255)),
    )
