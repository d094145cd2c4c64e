"""Which JPEGs the GPU decoder may take, read off the header alone (cheap enough for the decode workers)."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.decode.image import ORIENTATION_TAG

GPU_MODES = ("RGB", "L")  # CMYK/YCCK and anything odd go to the CPU pool
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def probe_jpeg(data: bytes, max_image_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, orientation) of a JPEG the GPU can take, from its header; None sends it to the CPU."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    if not data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        return None  # no end-of-image marker: nvJPEG would fill the gap silently; the CPU path reports it
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in GPU_MODES:
            return None
        width, height = image.size
        if width * height > max_image_pixels:
            return None  # the CPU path records the refusal with its reason
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # any header trouble: the CPU path decides and explains
        return None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, orientation if orientation in range(1, 9) else 1
