"""guards.py: icons and tiled TIFFs whose headers lie are refused from the header, before a decoder allocates."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.decode.image import decode_bytes
from pipeline.decode.spec import InputSpec
from pipeline.errors import DecodeError
from tests.conftest import REPO
from tests.decode import crafted

SPEC = InputSpec("exact", (16, 16), None)
MAX_PIXELS = 100_000_000


def probe(tmp_path: Path, data: bytes) -> tuple[str, int]:
    """Decode `data` in a fresh process: its reason, and how much address space the attempt reserved (MB)."""
    path = tmp_path / "crafted.bin"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", crafted.PROBE, str(path), str(MAX_PIXELS)], capture_output=True,
                          text=True, cwd=REPO, check=True)
    reason, grown_mb = done.stdout.splitlines()
    return reason, int(grown_mb)


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_bytes(data, SPEC, MAX_PIXELS)
    return str(caught.value)


def test_icns_whose_png_claims_two_gigapixels_is_refused_before_allocating(tmp_path: Path) -> None:
    """The issue's file: a 256x256 ICNS slot holding a PNG of 45000x45000 (8.1 GB as RGBA) in ~600 bytes."""
    data = crafted.icns(b"ic08", crafted.png_claiming(45000, 45000))
    assert len(data) < 1000
    reason, grown_mb = probe(tmp_path, data)
    assert reason == "too many pixels: 2025000000 > 100000000"
    assert grown_mb < 100  # PIL reserved 8,100 MB for it before


def test_icns_whose_png_outgrows_its_slot_is_an_inconsistent_header() -> None:
    data = crafted.icns(b"ic08", crafted.png_claiming(2000, 2000))
    assert reason_of(data) == "inconsistent header: ICNS entry of 256x256 holds a 2000x2000 image"


@pytest.mark.parametrize(("inner", "claimed"), [
    (crafted.png_claiming(4000, 4000), "4000x4000"),
    (crafted.dib_claiming(5000, 5000), "5000x5000"),
])
def test_ico_whose_image_outgrows_its_entry_is_an_inconsistent_header(inner: bytes, claimed: str) -> None:
    """PIL decodes an ICO's largest entry inside Image.open and takes the embedded image's size (a 16x16 icon
    decoded as 4000x4000 before): the guard runs on the bytes, before open."""
    assert reason_of(crafted.ico((16, 16), inner)) == f"inconsistent header: ICO entry of 16x16 holds a {claimed} image"


def test_tiff_whose_tiles_dwarf_the_image_is_refused_before_allocating(tmp_path: Path) -> None:
    """A 16x16 TIFF claiming 26000x26000 tiles: libtiff allocated a 2 GB tile buffer for 768 bytes of pixels."""
    reason, grown_mb = probe(tmp_path, crafted.tiff(16, 16, tile=26000))
    assert reason == "inconsistent header: TIFF tiles of 26000x26000 for a 16x16 image"
    assert grown_mb < 100


def test_an_icon_over_the_pixel_limit_says_too_many_pixels() -> None:
    data = crafted.ico((256, 256), crafted.png_claiming(20000, 20000))
    assert reason_of(data) == "too many pixels: 400000000 > 100000000"


def saved(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    saved(Image.new("RGBA", (256, 256), (200, 10, 10, 255)), "ICO", sizes=[(16, 16), (48, 48), (256, 256)]),
    saved(Image.new("RGBA", (512, 512), (200, 10, 10, 255)), "ICNS"),
    crafted.ico((256, 256), crafted.zero_png(512, 512)),  # a 512 px PNG under a 256 entry: common, let through
    crafted.tiff(16, 16, tile=16),
    crafted.tiff(200, 100, tile=256),  # a tile larger than the image, as writers pad: fine
], ids=["ico", "icns", "ico-512-under-256", "tiled-tiff", "tiff-tile-over-image"])
def test_honest_icons_and_tiled_tiffs_decode(data: bytes) -> None:
    assert decode_bytes(data, SPEC, MAX_PIXELS).pixels.shape == SPEC.output_shape
