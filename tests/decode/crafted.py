"""Hostile image bytes written by the tests themselves: headers that lie, TIFFs that make libtiff talk, big PNGs."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

PROBE = """
import sys
from pipeline.errors import DecodeError
from pipeline.decode.spec import InputSpec
from pipeline.decode.image import decode_file
from PIL import Image
Image.init()

def vm(key):
    return [int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(key)][0]

before = vm("VmSize")
try:
    decode_file(sys.argv[1], InputSpec("exact", (16, 16), None), int(sys.argv[2]))
    print("decoded")
except DecodeError as exc:
    print(exc)
# VmPeak: the address space ever reserved, touched or not (PIL's calloc of 8 GB leaves the RSS small).
print(vm("VmPeak") - before)
"""


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, rows: int = 2) -> bytes:
    """A PNG whose header says width x height RGBA, holding only `rows` rows of zeros (a few hundred bytes)."""
    raw = (b"\0" + b"\0" * 4 * min(width, 4096)) * rows
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def zero_png(width: int, height: int, exif: bytes = b"") -> bytes:
    """A complete RGBA PNG of zeros, compressed row by row (a 10000x10000 one is ~390 KB, made without 400 MB)."""
    compressor = zlib.compressobj(1)
    row = b"\0" * (1 + 4 * width)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    extra = chunk(b"eXIf", exif) if exif else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def exif_orientation(value: int) -> bytes:
    """A PNG eXIf chunk's body: a TIFF header and one Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = value
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\0\0") else data


def icns(code: bytes, inner: bytes) -> bytes:
    """An Apple icon file with one element (e.g. b"ic08", the 256x256 PNG slot)."""
    element = code + struct.pack(">I", 8 + len(inner)) + inner
    return b"icns" + struct.pack(">I", 8 + len(element)) + element


def ico(stated: tuple[int, int], inner: bytes) -> bytes:
    """A Windows icon with one directory entry stating `stated` (at most 256x256) over `inner`."""
    width, height = (side % 256 for side in stated)  # 256 is written as 0
    entry = struct.pack("<BBBBHHII", width, height, 0, 0, 1, 32, len(inner), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + inner


def dib_claiming(width: int, height: int) -> bytes:
    """A BMP info header (an icon's bitmap) claiming width x height, twice as tall for the mask, and 64 bytes."""
    return struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0) + bytes(64)


def tiff(width: int = 16, height: int = 8, extra: tuple = (), tile: int | None = None) -> bytes:
    """A little-endian RGB TIFF, deflate-compressed (so libtiff decodes it), from raw tags: (tag, type, count,
    4-byte value) in `extra` are added as given; `tile` makes it tiled with that TileWidth and TileLength."""
    # One tile covers the image (tile >= its sides); a lying tile size gets the image's own bytes.
    data = zlib.compress(bytes((tile * tile if tile and tile <= 4096 else width * height) * 3))
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, "bps"), (259, 3, 1, 8), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1)]
    if tile:
        entries += [(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, "data"), (325, 4, 1, len(data))]
    else:
        entries += [(273, 4, 1, "data"), (278, 4, 1, height), (279, 4, 1, len(data))]
    entries = sorted(entries + list(extra), key=lambda entry: entry[0])
    blobs_at = 8 + 2 + 12 * len(entries) + 4
    where = {"bps": blobs_at, "data": blobs_at + 8}
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        value = where.get(value, value) if isinstance(value, str) else value
        packed = value if isinstance(value, bytes) else (struct.pack("<HH", value, 0) if kind == 3
                                                          else struct.pack("<I", value))
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + b"\0\0" + data


def tiff_with_unknown_tags_cut_short() -> bytes:
    """Private tags libtiff does not know, and a strip that ends early: libtiff writes to fd 2 while decoding it."""
    unknown = tuple((65000 + n, 2, 4, b"abc\0") for n in range(5))
    return tiff(64, 64, extra=unknown)[:-30]


def tiff_garbled() -> bytes:
    """A deflate strip with bytes overwritten: libtiff's ZIPDecode reports the error on fd 2."""
    data = bytearray(tiff(64, 64))
    data[-20:-10] = b"\xff" * 10
    return bytes(data)


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def eps() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(buffer, "EPS")
    return buffer.getvalue()
