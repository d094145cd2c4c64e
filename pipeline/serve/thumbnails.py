"""Thumbnails of indexed images for the search page: upright RGB JPEGs, rendered on threads, kept in an LRU cache."""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# The grid's cells and the detail view's preview. Only these sizes are rendered: any size in a URL would let a
# client fill the cache with renderings of one image.
THUMBNAIL_SIZES = (256, 1024)
# On the 400 sample photos a 256-px thumbnail is 14 KB on average and renders in 6 ms (a 24 MP JPEG, drafted, in
# 33 ms): 64 MiB keep ~4,800 of them, dozens of pages of results.
CACHE_BYTES = 64 << 20
JPEG_QUALITY = 85
BACKGROUND = (255, 255, 255)  # transparent pixels become white, as in the embeddings (decode/image.py)


class ThumbnailError(Exception):
    """The file cannot be shown: its message says why (it is no longer an image, too many pixels)."""


class CacheKey(NamedTuple):
    file: str
    size: int
    mtime_ns: int  # of the file now: a changed file gets a new thumbnail
    size_bytes: int


def _rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float data scaled, transparency composited onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        high = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / high), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def render_thumbnail(file: str, size: int, max_image_pixels: int) -> bytes:
    """The image in `file`, upright, its first frame, at most size x size pixels, as JPEG bytes."""
    try:
        with Image.open(file) as image:
            pixels = image.width * image.height
            if pixels > max_image_pixels:  # refused from the header, before any pixel is decoded
                raise ThumbnailError(f"too many pixels: {pixels} > {max_image_pixels}")
            if image.format == "JPEG":  # libjpeg decodes at 1/2..1/8 scale: a 24 MP photo in a fraction of the time
                image.draft(None, (size, size))
            upright = ImageOps.exif_transpose(image)
            rgb = _rgb(upright)
            rgb.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
            return buffer.getvalue()
    except ThumbnailError:
        raise
    except Exception as exc:  # PIL raises many types on a file that changed into something else
        raise ThumbnailError(f"cannot render {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from None


class ThumbnailCache:
    """Rendered thumbnails, least recently used out first past max_bytes (touched on the event loop only)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[CacheKey, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: CacheKey) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: CacheKey, data: bytes) -> None:
        if len(data) > self.max_bytes or key in self._items:
            return
        self._items[key] = data
        self.used += len(data)
        while self.used > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.used -= len(evicted)
