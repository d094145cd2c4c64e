"""decode_bytes/decode_file: hostile inputs, orientation, colour modes, pixel limits, JPEG draft, HF parity."""

from __future__ import annotations

import io
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decode.image import decode_bytes, decode_file
from pipeline.decode.spec import InputSpec
from pipeline.errors import DecodeError
from tests.conftest import HOSTILE, HOSTILE_EMBEDDED, HOSTILE_ERRORS, IMAGES, REPO

MAX_PIXELS = 100_000_000
CLIP_SPEC = InputSpec("shortest_edge", (224, 224), (224, 224), resample=Image.Resampling.BICUBIC)
EXACT_SPEC = InputSpec("exact", (16, 24), None)  # (height, width), no crop
EXPECTED_REASONS = {
    "zero_bytes.png": "empty file",
    "truncated_half.jpg": "truncated file",
    "truncated.png": "truncated file",
    "not_an_image.jpg": "not an image",
    "decompression_bomb_400mpx.png": "too many pixels: 400000000 > 100000000",
}


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode_hostile(name: str, spec: InputSpec = CLIP_SPEC, **options):
    return decode_file(str(HOSTILE / name), spec, MAX_PIXELS, **options)


def hf_clip_pixels(image: Image.Image) -> np.ndarray:
    """transformers' own PIL CLIP processor, without rescale/normalize: uint8-valued (H, W, 3)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers without the split PIL backend
        from transformers import CLIPImageProcessor as Processor
    processor = Processor(do_normalize=False, do_rescale=False, size={"shortest_edge": 224},
                          crop_size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(processor(image, return_tensors="np")["pixel_values"][0])
    return pixels.transpose(1, 2, 0).round().astype(np.int16)


def real_images(n: int) -> list[Path]:
    names = sorted(IMAGES.iterdir())
    return names[:: len(names) // n][:n]


# -- hostile folder ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_EMBEDDED)
def test_hostile_valid_file_decodes_to_the_spec_shape(name: str) -> None:
    decoded = decode_hostile(name)
    assert decoded.pixels.shape == CLIP_SPEC.output_shape
    assert decoded.pixels.dtype == np.uint8
    assert decoded.width > 0 and decoded.height > 0
    assert len(decoded.content_hash) == 32


@pytest.mark.parametrize("name", HOSTILE_ERRORS)
def test_hostile_broken_file_raises_a_readable_decode_error(name: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_hostile(name)
    reason = str(caught.value)
    assert reason and "\n" not in reason and len(reason) < 300
    if name in EXPECTED_REASONS:
        assert reason == EXPECTED_REASONS[name]


def test_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="file vanished"):
        decode_file(str(tmp_path / "nope.jpg"), CLIP_SPEC, MAX_PIXELS)


def test_content_decides_not_the_extension() -> None:
    assert decode_hostile("png_with_jpg_extension.jpg").pixels.shape == CLIP_SPEC.output_shape


def test_content_hash_depends_on_the_bytes_only() -> None:
    data = (HOSTILE / "plain.bmp").read_bytes()
    digest = decode_bytes(data, CLIP_SPEC, MAX_PIXELS).content_hash
    assert digest == decode_bytes(data, EXACT_SPEC, MAX_PIXELS).content_hash
    assert digest != decode_hostile("Mixed.Png").content_hash


# -- orientation -------------------------------------------------------------------------------


def test_exif_orientation_6_reports_upright_size() -> None:
    decoded = decode_hostile("exif_orientation_6.jpg")
    assert (decoded.width, decoded.height) == (200, 400)


def test_exif_orientation_6_rotates_the_pixels() -> None:
    with Image.open(HOSTILE / "exif_orientation_6.jpg") as raw:
        assert raw.size == (400, 200)
        upright = raw.transpose(Image.Transpose.ROTATE_270)  # orientation 6: rotate 90 degrees clockwise
        unrotated = np.asarray(raw.convert("RGB").resize((24, 16), Image.Resampling.BICUBIC), dtype=np.int16)
    expected = np.asarray(upright.convert("RGB").resize((24, 16), Image.Resampling.BICUBIC), dtype=np.int16)
    ours = decode_hostile("exif_orientation_6.jpg", EXACT_SPEC).pixels.astype(np.int16)
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(ours - unrotated).mean() > 10 * max(np.abs(ours - expected).mean(), 0.1)


# -- colour modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)),
    Image.new("LA", (20, 10), (0, 0)),
    Image.new("RGBA", (20, 10), (10, 200, 30, 0)),
], ids=["rgba_black", "la_black", "rgba_green"])
def test_fully_transparent_image_becomes_white(image: Image.Image) -> None:
    pixels = decode_bytes(encode(image), EXACT_SPEC, MAX_PIXELS).pixels
    assert pixels.shape == EXACT_SPEC.output_shape
    assert (pixels == 255).all()


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    pixels = decode_bytes(encode(image, transparency=0), EXACT_SPEC, MAX_PIXELS).pixels
    assert (pixels == 255).all()


def test_half_alpha_is_blended_with_white() -> None:
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 128))
    pixels = decode_bytes(encode(image), EXACT_SPEC, MAX_PIXELS).pixels.astype(int)
    assert np.abs(pixels - 127).max() <= 1


def gray16_pixels(value: int) -> np.ndarray:
    image = Image.fromarray(np.full((10, 20), value, dtype=np.uint16))
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return decode_bytes(data, EXACT_SPEC, MAX_PIXELS).pixels


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32768, 128), (257, 1), (0, 0)])
def test_gray16_is_scaled_not_clipped(value: int, expected: int) -> None:
    pixels = gray16_pixels(value).astype(int)
    assert np.abs(pixels - expected).max() <= 1


def test_hostile_gray16_uses_the_full_range() -> None:
    with Image.open(HOSTILE / "gray16.png") as raw:
        source = np.asarray(raw)
    assert source.max() > 255  # really 16-bit data
    pixels = decode_hostile("gray16.png").pixels
    assert pixels.max() > 200 and not (pixels[pixels > 0] == 255).all()


def test_cmyk_becomes_rgb() -> None:
    with Image.open(HOSTILE / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
        expected = np.asarray(raw.convert("RGB").resize((24, 16), Image.Resampling.BICUBIC), dtype=np.int16)
    ours = decode_hostile("cmyk.jpg", EXACT_SPEC).pixels.astype(np.int16)
    assert np.abs(ours - expected).max() <= 1


# -- pixel limit -------------------------------------------------------------------------------


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(DecodeError, match=r"^too many pixels: 10000 > 9999$"):
        decode_bytes(data, EXACT_SPEC, 9_999)
    assert decode_bytes(data, EXACT_SPEC, 10_000).pixels.shape == EXACT_SPEC.output_shape


def test_decompression_bomb_is_refused_before_python_allocates() -> None:
    data = (HOSTILE / "decompression_bomb_400mpx.png").read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="too many pixels"):
            decode_bytes(data, CLIP_SPEC, MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


BOMB_PROBE = """
import sys
from pipeline.errors import DecodeError
from pipeline.decode.spec import InputSpec
from pipeline.decode.image import decode_file
try:
    decode_file(sys.argv[1], InputSpec("exact", (16, 16), None), int(sys.argv[2]))
except DecodeError as exc:
    print(exc)
# VmHWM belongs to this process's own address space; ru_maxrss would carry over the parent's
# peak from before exec (pytest with torch loaded).
peak_kb = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(peak_kb) // 1024)
"""


def test_decompression_bomb_is_refused_before_pil_allocates() -> None:
    """tracemalloc does not see PIL's C allocations; the peak RSS of a fresh process does."""
    bomb = str(HOSTILE / "decompression_bomb_400mpx.png")
    done = subprocess.run([sys.executable, "-c", BOMB_PROBE, bomb, str(MAX_PIXELS)], capture_output=True,
                          text=True, cwd=REPO, check=True)
    reason, peak_mb = done.stdout.splitlines()
    assert reason == "too many pixels: 400000000 > 100000000"
    assert int(peak_mb) < 200  # decoding the bomb would take 400 MB for its pixels alone


# -- JPEG draft --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 3000x2000 JPEG with smooth gradients and shapes, written to and read back from disk."""
    height, width = 2000, 3000
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (np.sin(x / 150) * np.cos(y / 110) + 1) * 127], axis=-1)
    rgb[600:1400, 1000:2000] = (30, 160, 220)
    path = tmp_path_factory.mktemp("draft") / "large.jpg"
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
    return path.read_bytes()


def test_jpeg_draft_is_close_to_the_full_decode(large_jpeg: bytes) -> None:
    drafted = decode_bytes(large_jpeg, CLIP_SPEC, MAX_PIXELS, jpeg_draft=True)
    full = decode_bytes(large_jpeg, CLIP_SPEC, MAX_PIXELS, jpeg_draft=False)
    assert drafted.pixels.shape == full.pixels.shape == CLIP_SPEC.output_shape
    assert (drafted.width, drafted.height) == (full.width, full.height) == (3000, 2000)
    assert np.abs(drafted.pixels.astype(int) - full.pixels.astype(int)).mean() < 8


def test_jpeg_draft_leaves_small_jpegs_exact() -> None:
    data = real_images(1)[0].read_bytes()
    drafted = decode_bytes(data, CLIP_SPEC, MAX_PIXELS, jpeg_draft=True)
    full = decode_bytes(data, CLIP_SPEC, MAX_PIXELS, jpeg_draft=False)
    assert np.array_equal(drafted.pixels, full.pixels)


def test_large_hostile_jpeg_draft_keeps_the_original_size() -> None:
    decoded = decode_hostile("large_24mp.jpg", jpeg_draft=True)
    assert (decoded.width, decoded.height) == (6000, 4000)
    full = decode_hostile("large_24mp.jpg", jpeg_draft=False)
    assert np.abs(decoded.pixels.astype(int) - full.pixels.astype(int)).mean() < 8


# -- resize and crop ---------------------------------------------------------------------------


def test_extreme_aspect_decodes() -> None:
    decoded = decode_hostile("extreme_aspect_4000x8.png")
    assert decoded.pixels.shape == CLIP_SPEC.output_shape
    assert (decoded.width, decoded.height) == (4000, 8)


def test_exact_resize_has_height_and_width_from_the_spec() -> None:
    decoded = decode_bytes(encode(Image.new("RGB", (300, 100), (1, 2, 3))), EXACT_SPEC, MAX_PIXELS)
    assert decoded.pixels.shape == (16, 24, 3)
    assert (decoded.pixels == (1, 2, 3)).all()


def test_crop_larger_than_the_image_is_padded() -> None:
    spec = InputSpec("shortest_edge", (8, 8), (8, 16))  # 8x8 resized stays 8x8; crop is wider
    pixels = decode_bytes(encode(Image.new("RGB", (8, 8), (200, 200, 200))), spec, MAX_PIXELS).pixels
    assert pixels.shape == (8, 16, 3)
    assert (pixels[:, 4:12] == 200).all() and (pixels[:, :4] == 0).all() and (pixels[:, 12:] == 0).all()


@pytest.mark.parametrize("path", real_images(5), ids=lambda p: p.name)
def test_clip_preprocessing_matches_transformers(path: Path) -> None:
    data = path.read_bytes()
    ours = decode_bytes(data, CLIP_SPEC, MAX_PIXELS).pixels.astype(np.int16)
    expected = hf_clip_pixels(Image.open(io.BytesIO(data)))
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1


@pytest.mark.parametrize("name", [
    "cmyk.jpg", "gray_alpha.png", "palette_transparent.png", "rgba_half_alpha.png", "extreme_aspect_4000x8.png",
    "exif_orientation_6.jpg", "bilevel_1x1.png", "odd_size.webp",
])
def test_unusual_modes_match_transformers(name: str) -> None:
    ours = decode_hostile(name).pixels.astype(np.int16)
    with Image.open(HOSTILE / name) as raw:
        expected = hf_clip_pixels(ImageOps.exif_transpose(raw))
    assert np.abs(ours - expected).max() <= 1
