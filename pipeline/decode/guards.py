"""Header guards for ICO/CUR, ICNS and tiled TIFF: what would allocate far beyond the stated image is refused first."""

from __future__ import annotations

import io
import struct

from PIL import IcnsImagePlugin, Image

from pipeline.decode.reasons import INCONSISTENT, too_many_pixels
from pipeline.errors import DecodeError

# An icon's embedded image may differ from its directory entry (PIL warns and loads it anyway: a 512x512 PNG under a
# 256 entry is common); up to this many pixels (1024x1024, 4 MB as RGBA, the largest icon size in use) it is let
# through. A 16x16 entry holding a 10000x10000 PNG cost 3.6 s and 540 MB; a 256x256 ICNS holding 45000x45000, 8.1 GB.
ICON_PIXELS_FREE = 1024 * 1024
# A TIFF's tile buffer is allocated from TileWidth x TileLength, whatever the image's size: a 900-byte TIFF of 16x16
# px claiming 26000x26000 tiles made libtiff allocate 2 GB. Writers tile at 256-1024 px; 4096x4096 (50 MB as RGB)
# is let through for any image, larger only within the image's own pixel count.
TILE_PIXELS_FREE = 4096 * 4096
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JP2_MAGICS = (b"\xff\x4f\xff\x51", b"\x0d\x0a\x87\x0a", b"\x00\x00\x00\x0cjP  \x0d\x0a\x87\x0a")
# ICNS element types whose data is a PNG or JPEG 2000, and the size (width, height, scale) each one states.
ICNS_SIZES = {code: size for size, readers in IcnsImagePlugin.IcnsFile.SIZES.items()
              for code, reader in readers if reader is IcnsImagePlugin.read_png_or_jpeg2000}


def check_bytes(data: bytes, max_image_pixels: int) -> None:
    """Before Image.open (PIL's ICO plugin decodes its largest entry inside open): icon containers."""
    magic = data[:4]
    if magic in (b"\0\0\1\0", b"\0\0\2\0"):
        _check_ico(data, max_image_pixels)
    elif magic == b"icns":
        _check_icns(data, max_image_pixels)


def check_opened(image: Image.Image) -> None:
    """After Image.open, before load: the tile size of a tiled TIFF (a dict lookup for other TIFFs)."""
    if image.format != "TIFF":
        return
    tags = getattr(image, "tag_v2", {})
    tile_w, tile_h = tags.get(322), tags.get(323)  # TileWidth, TileLength
    if isinstance(tile_w, int) and isinstance(tile_h, int) and tile_w * tile_h > max(image.width * image.height,
                                                                                     TILE_PIXELS_FREE):
        raise DecodeError(f"{INCONSISTENT}: TIFF tiles of {tile_w}x{tile_h} for a {image.width}x{image.height} image")


def _check_part(kind: str, stated: tuple[int, int], inner: tuple[int, int] | None, max_image_pixels: int) -> None:
    if inner is None:
        return  # unreadable: the decoder says so itself
    pixels = inner[0] * inner[1]
    if pixels > max_image_pixels:
        raise DecodeError(too_many_pixels(pixels, max_image_pixels))
    if pixels > max(stated[0] * stated[1], ICON_PIXELS_FREE):
        raise DecodeError(f"{INCONSISTENT}: {kind} entry of {stated[0]}x{stated[1]} "
                          f"holds a {inner[0]}x{inner[1]} image")


def _png_size(data: bytes, offset: int) -> tuple[int, int] | None:
    if data[offset:offset + 8] != PNG_MAGIC or len(data) < offset + 24:
        return None
    return struct.unpack_from(">II", data, offset + 16)  # IHDR: width, height


def _dib_size(data: bytes, offset: int) -> tuple[int, int] | None:
    """A BMP info header's size; an icon's DIB is twice as tall as its image (the AND mask follows)."""
    if len(data) < offset + 12:
        return None
    header = struct.unpack_from("<I", data, offset)[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack_from("<HH", data, offset + 4)
    elif header >= 40:
        width, height = struct.unpack_from("<ii", data, offset + 4)
    else:
        return None
    return abs(width), abs(height) // 2


def _check_ico(data: bytes, max_image_pixels: int) -> None:
    count = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else 0
    for index in range(min(count, (len(data) - 6) // 16)):
        entry = 6 + 16 * index
        stated = (data[entry] or 256, data[entry + 1] or 256)  # 0 stands for 256
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        inner = _png_size(data, offset) or _dib_size(data, offset)
        _check_part("ICO", stated, inner, max_image_pixels)


def _jp2_size(blob: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(blob), formats=["JPEG2000"]) as inner:  # reads the header boxes only
            return inner.size
    except Exception:  # an unreadable part is the decoder's to report
        return None


def _check_icns(data: bytes, max_image_pixels: int) -> None:
    end = min(len(data), struct.unpack_from(">I", data, 4)[0] if len(data) >= 8 else 0)
    at = 8
    while at + 8 <= end:
        code, length = data[at:at + 4], struct.unpack_from(">I", data, at + 4)[0]
        if length < 8:
            return
        size = ICNS_SIZES.get(code)
        if size is not None:
            blob_at = at + 8
            inner = _png_size(data, blob_at)
            if inner is None and data[blob_at:blob_at + 12].startswith(JP2_MAGICS):
                inner = _jp2_size(data[blob_at:at + length])
            _check_part("ICNS", (size[0] * size[2], size[1] * size[2]), inner, max_image_pixels)
        at += length
