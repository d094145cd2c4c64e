"""Turn one image file into the encoder's uint8 pixels, or a readable reason why not (runs in workers)."""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.decode import capture, guards, reasons
from pipeline.decode.spec import InputSpec, resized_size
from pipeline.decode.tiles import Tile, pyramid_tiles
from pipeline.errors import DecodeError

# We check the pixel count ourselves (with a readable reason); PIL's own guard would raise first.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ORIENTATION_TAG = 0x0112
BACKGROUND = (255, 255, 255)  # transparent pixels become white, as Hugging Face's convert_rgb does
# Draft (DCT-domain) downscaling is asked only down to a margin over the target size, so the final
# bicubic resize still sees enough pixels to antialias: 12 MP -> 0.2-1 MP instead of 12. Fixed-size
# models: 1.5x (a 12 MP photo decodes at 1/8 scale, 24 ms instead of 35 at 1/4; the pixels differ from
# a full decode by 0.3-0.7 grey levels on average, 0.2 at 2x). Dynamic resolution (documents, fine
# text): 2x the image's own final size.
DRAFT_OVERSAMPLE = 2
DRAFT_OVERSAMPLE_FIXED = 1.5
# Only large JPEGs are draft-decoded: below ~2 MP a full decode costs a few ms, and matching the
# model's own processor exactly (no DCT-domain scaling) is worth more than that.
DRAFT_MIN_PIXELS = 2_000_000


@dataclass
class DecodedImage:
    pixels: np.ndarray  # uint8, (H, W, 3)
    width: int  # of the original image, after EXIF orientation
    height: int
    content_hash: str
    decode_s: float = 0.0
    info: dict[str, str] = field(default_factory=dict)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _open(data: bytes, max_image_pixels: int) -> Image.Image:
    """PIL's lazy open, after the checks that need only the header; PIL's own exceptions go to reason_for."""
    if not data:
        raise DecodeError(reasons.EMPTY)
    guards.check_bytes(data, max_image_pixels)
    image = Image.open(io.BytesIO(data))
    pixels = image.width * image.height
    if pixels > max_image_pixels:
        raise DecodeError(reasons.too_many_pixels(pixels, max_image_pixels))
    guards.check_opened(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited onto BACKGROUND."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        # 16-bit data (I;16*, or I holding 0..65535) is scaled, not clipped, to 8 bits.
        if mode.startswith("I;16") or (mode == "I" and array.max(initial=0) > 255):
            array = array.astype(np.float32)
            array /= 257.0  # in place, as the clip below: one float copy of a 100 Mpx image (400 MB), not three
        image = Image.fromarray(np.clip(array, 0, 255, out=array if array.flags.writeable else None)
                                .astype(np.uint8), "L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        # No copy of an RGBA image (convert to its own mode copies): 400 MB less at 100 Mpx, whose decode
        # peaked at 2.06 GB of address space (limits.py bounds that per process).
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _resize_and_crop(image: Image.Image, spec: InputSpec, original: tuple[int, int] | None = None) -> Image.Image:
    if spec.dynamic:  # sized off the original (pre-draft) dimensions, so the token count is the header's
        return image.resize(resized_size(*(original or image.size), spec), spec.resample)
    new_w, new_h = resized_size(image.width, image.height, spec)
    if spec.crop is None:
        return image.resize((new_w, new_h), spec.resample)
    crop_h, crop_w = spec.crop
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    if top < 0 or left < 0:  # a crop larger than the resized image: pad as HF does (zeros, centered)
        resized = image.resize((new_w, new_h), spec.resample)
        canvas = Image.new("RGB", (max(new_w, crop_w), max(new_h, crop_h)))
        canvas.paste(resized, ((canvas.width - new_w) // 2, (canvas.height - new_h) // 2))
        image, new_w, new_h = canvas, canvas.width, canvas.height
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        return image.crop((left, top, left + crop_w, top + crop_h))
    if new_w * new_h > 4 * crop_w * crop_h:
        # Extreme aspect ratios (4000x8 -> 112000x224) would allocate a huge intermediate:
        # resize only the source region that the crop keeps.
        sx, sy = image.width / new_w, image.height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), spec.resample, box=box)
    return image.resize((new_w, new_h), spec.resample).crop((left, top, left + crop_w, top + crop_h))


def decode_bytes(data: bytes, spec: InputSpec, max_image_pixels: int, jpeg_draft: bool = True,
                 digest: str | None = None) -> DecodedImage:
    """Decode, orient, convert and resize one image held in memory; every failure is a DecodeError whose
    message is the one reason reasons.reason_for gives it, whichever step raised."""
    started = time.perf_counter()
    digest = digest or content_hash(data)
    try:
        return _decode(data, spec, max_image_pixels, jpeg_draft, digest, started)
    except Exception as exc:  # PIL raises many types on hostile input; none may stop the run
        raise DecodeError(reasons.reason_for(exc, capture.peek())) from None


def _decode(data: bytes, spec: InputSpec, max_image_pixels: int, jpeg_draft: bool, digest: str,
            started: float) -> DecodedImage:
    image = _open(data, max_image_pixels)
    orientation = image.getexif().get(ORIENTATION_TAG, 1) if image.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if jpeg_draft and image.format == "JPEG" and image.width * image.height >= DRAFT_MIN_PIXELS:
        if spec.dynamic:  # the draft must keep twice the final size of this very image
            new_w, new_h = resized_size(width, height, spec)
            image.draft(None, (DRAFT_OVERSAMPLE * new_w, DRAFT_OVERSAMPLE * new_h) if orientation in (1, 2, 3, 4)
                        else (DRAFT_OVERSAMPLE * new_h, DRAFT_OVERSAMPLE * new_w))
        else:  # a pyramid's finest cells must still get twice the model's size each
            finest = max((max(grid) for grid in spec.tiles), default=1) if spec.tiles else 1
            want = math.ceil(DRAFT_OVERSAMPLE_FIXED * max(spec.size) * finest)
            image.draft(None, (want, want))
    image.load()
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    if spec.tiles:
        pixels = tile_pixels(_to_rgb(image), pyramid_tiles(width, height, list(spec.tiles)), spec, width)
    else:
        pixels = prepare_image(image, spec, (width, height))
    return DecodedImage(pixels, width, height, digest, time.perf_counter() - started)


def prepare_image(image: Image.Image, spec: InputSpec, original: tuple[int, int] | None = None) -> np.ndarray:
    """A loaded, upright PIL image -> the encoder's uint8 (H, W, 3) pixels; `original` is its (width,
    height) before any draft downscale."""
    return np.asarray(_resize_and_crop(_to_rgb(image), spec, original), dtype=np.uint8)


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DecodeError("file vanished before it was read") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
    except MemoryError:  # a file larger than a bounded decode process may hold
        raise DecodeError(reasons.out_of_memory()) from None


def decode_file(path: str, spec: InputSpec, max_image_pixels: int, jpeg_draft: bool = True,
                data: bytes | None = None, digest: str | None = None) -> DecodedImage:
    """Read (unless `data` is given) and decode one file; every failure is a DecodeError."""
    if data is None:
        data = read_file(path)
    return decode_bytes(data, spec, max_image_pixels, jpeg_draft, digest)


def tile_pixels(image: Image.Image, tiles: list[Tile], spec: InputSpec,
                original_width: int | None = None) -> np.ndarray:
    """A loaded, upright PIL image -> (len(tiles), H, W, 3) uint8, each tile prepared as a whole image.
    Boxes are in the original's pixels: a draft-decoded (smaller) image has them scaled to its size."""
    scale = image.width / original_width if original_width else 1.0
    crops = [image.crop(tuple(round(edge * scale) for edge in tile.box)) if scale != 1.0 else image.crop(tile.box)
             for tile in tiles]
    return np.stack([prepare_image(crop, spec) for crop in crops])
