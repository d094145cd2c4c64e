"""The batched resize of the GPU decoder, run on CPU tensors: PIL's pixels for every size and EXIF orientation,
the same rows whatever the batch, canvases within their memory bounds, and each size planned once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.decode.resize_batch import GEOMETRIES, PAD_RATIO, canvas_buckets, resize_batch
from pipeline.decode.spec import InputSpec, resized_size
from tests.conftest import IMAGES

CLIP_224 = InputSpec("shortest_edge", (224, 224), (224, 224))
# (width, height) upright: landscape, portrait, 4:3, smaller than the crop (padded), 12 MP, an upscale, and a
# tall one that PIL resizes vertical-first.
SIZES = [(500, 375), (375, 500), (640, 480), (100, 80), (4000, 3000), (150, 150), (300, 1000)]


def photo(width: int, height: int) -> Image.Image:
    """Natural content at any size: one of the sample photos, resized."""
    return Image.open(sorted(IMAGES.iterdir())[5]).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Every pixel an edge: the bicubic overshoot that PIL clips between its passes shows at once."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def stored(upright: Image.Image, orientation: int) -> Image.Image:
    """The image a camera would store for `upright` with this EXIF orientation (exif_transpose undoes it)."""
    undo = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180], 4: [Image.Transpose.FLIP_TOP_BOTTOM],
            5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE],
            8: [Image.Transpose.ROTATE_270]}
    image = upright
    for step in undo.get(orientation, []):
        image = image.transpose(step)
    image.getexif()[0x0112] = orientation  # exif_transpose reads the cached EXIF back
    return image


def pil_reference(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """exif_transpose, resize (BICUBIC), center crop; zero padding when smaller than the crop."""
    upright = ImageOps.exif_transpose(image)
    new_w, new_h = resized_size(upright.width, upright.height, spec)
    resized = upright.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if spec.crop is None:
        return np.asarray(resized)
    crop_h, crop_w = spec.crop
    canvas = Image.new("RGB", (max(new_w, crop_w), max(new_h, crop_h)))
    canvas.paste(resized, ((canvas.width - new_w) // 2, (canvas.height - new_h) // 2))
    left, top = (canvas.width - crop_w) // 2, (canvas.height - crop_h) // 2
    return np.asarray(canvas.crop((left, top, left + crop_w, top + crop_h)))


def interpolate_reference(chw: torch.Tensor, spec: InputSpec) -> np.ndarray:
    """The per-size path this replaced (nvjpeg's resized_float up to a 3x downscale): torch's antialiased
    bicubic, then the crop."""
    new_w, new_h = resized_size(chw.shape[-1], chw.shape[-2], spec)
    out = F.interpolate(chw[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    crop_h, crop_w = spec.crop
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    out = out[0, :, top:top + crop_h, left:left + crop_w]
    return out.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def as_tensor(image: Image.Image) -> torch.Tensor:
    """The decoder's input: (3, H, W) uint8 as stored, before any orientation."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def resize_images(images: list[Image.Image], orientations: list[int], spec: InputSpec,
                  **options) -> list[np.ndarray]:
    """resize_batch's rows put back in input order."""
    pixels, order = resize_batch([as_tensor(i) for i in images], orientations, spec, **options)
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous() and sorted(order) == list(range(len(images)))
    rows: list[np.ndarray] = [np.empty(0)] * len(images)
    for row, index in enumerate(order):
        rows[index] = pixels[row].numpy()
    return rows


def differences(ours: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    assert ours.shape == reference.shape
    diff = np.abs(ours.astype(int) - reference.astype(int))
    return int(diff.max()), float(diff.mean())


@pytest.mark.parametrize("content", [photo, noise])
def test_a_mixed_batch_matches_pil_for_every_size_and_orientation(content) -> None:
    images, orientations = [], []
    for width, height in SIZES:
        for orientation in range(1, 9) if width * height < 10**6 else (1, 6):  # 12 MP: 144 MB a canvas here
            images.append(stored(content(width, height), orientation))
            orientations.append(orientation)
    # A cap below two 12 MP canvases: they take one each, the small ones share.
    rows = resize_images(images, orientations, CLIP_224, max_canvas_pixels=20_000_000)
    for image, orientation, ours in zip(images, orientations, rows):
        worst, mean = differences(ours, pil_reference(image, CLIP_224))
        assert ours.shape == (224, 224, 3)
        # Measured: max 1 (photo) and 2 (noise), mean <= 0.0015: PIL's 22-bit fixed-point weights and
        # half-up rounding against float weights and half-to-even.
        assert worst <= 2 and mean < 0.05, (image.size, orientation, worst, mean)


def test_half_precision_stays_within_two_grey_levels() -> None:
    """fp16 canvas and weights, as on CUDA (fp32 accumulation): measured max 2, mean 0.06-0.09 against PIL."""
    images = [stored(photo(500, 375), 1), stored(noise(375, 500), 6), stored(photo(100, 80), 3)]
    rows = resize_images(images, [1, 6, 3], CLIP_224, dtype=torch.float16)
    for image, ours in zip(images, rows):
        worst, mean = differences(ours, pil_reference(image, CLIP_224))
        assert worst <= 2 and mean < 0.2


def test_close_to_the_per_size_interpolate_path_it_replaced() -> None:
    sizes = [(500, 375), (375, 500), (640, 480), (500, 333)]  # within 3x: the old path's plain bicubic
    images = [photo(width, height) for width, height in sizes]
    rows = resize_images(images, [1] * len(images), CLIP_224)
    for image, ours in zip(images, rows):
        worst, mean = differences(ours, interpolate_reference(as_tensor(image), CLIP_224))
        # Measured: max 1, mean 0.13-0.16, as far as that path was from PIL itself (torch rounds nothing
        # between its passes).
        assert worst <= 2 and mean < 0.3


def test_batching_changes_nothing() -> None:
    rng = np.random.default_rng(7)
    sizes = [(int(w), int(h)) for w, h in rng.integers(60, 700, (40, 2))] + [(2000, 1500), (1500, 2000)]
    images = [photo(width, height) for width, height in sizes]
    orientations = [int(o) for o in rng.integers(1, 9, len(images))]
    together = resize_images(images, orientations, CLIP_224)
    changed = 0
    for image, orientation, row in zip(images, orientations, together):
        alone, = resize_images([image], [orientation], CLIP_224)
        assert np.abs(row.astype(int) - alone.astype(int)).max() <= 1, (image.size, orientation)
        changed += int((row != alone).sum())
    # Zero padding adds exact zeros, but the BLAS sums a longer row in another order: a value a hair from
    # x.5 can round the other way (measured: 9 of 6.3 million).
    assert changed <= 100


def test_one_canvas_keeps_the_input_order() -> None:
    pixels, order = resize_batch([as_tensor(photo(w, h)) for w, h in [(500, 375), (375, 500), (500, 333)]],
                                 [1, 1, 1], CLIP_224)
    assert order == [0, 1, 2] and pixels.shape == (3, 224, 224, 3)


def test_canvases_bound_their_padding_and_memory() -> None:
    rng = np.random.default_rng(3)
    adversarial = [(int(h), int(w)) for h, w in rng.integers(50, 600, (250, 2))] + [(3000, 4000), (4000, 3000)]
    photos = [Image.open(path).size[::-1] for path in sorted(IMAGES.iterdir())[:256]]  # header reads only
    # A handful of canvases whatever the number of sizes (measured: 8 and 2); a 5 MP cap takes more.
    assert len(canvas_buckets(adversarial, 400_000_000)) <= 10 and len(canvas_buckets(photos, 400_000_000)) <= 3
    for sizes in (adversarial, photos):
        for cap in (400_000_000, 5_000_000):
            buckets = canvas_buckets(sizes, cap)
            assert sorted(i for bucket in buckets for i in bucket) == list(range(len(sizes)))
            for bucket in buckets:
                canvas = len(bucket) * max(sizes[i][0] for i in bucket) * max(sizes[i][1] for i in bucket)
                area = sum(sizes[i][0] * sizes[i][1] for i in bucket)
                assert len(bucket) == 1 or (canvas <= PAD_RATIO * area and canvas <= cap)
    # Landscape and portrait of the usual sizes share one canvas, 500x500 (1.4x their pixels).
    assert len(canvas_buckets([(375, 500), (500, 375), (333, 500), (500, 333)] * 64, 400_000_000)) == 1


def test_sizes_are_planned_once() -> None:
    GEOMETRIES.clear()
    images = [as_tensor(photo(w, h)) for w, h in [(500, 375), (375, 500), (480, 640), (500, 375)]]
    before = GEOMETRIES.info()
    resize_batch(images, [1, 1, 6, 2], CLIP_224)
    first = GEOMETRIES.info()
    assert first.builds - before.builds == 4 and first.entries == 4  # (500, 375) twice, in two orientations
    resize_batch(images, [1, 1, 6, 2], CLIP_224)
    second = GEOMETRIES.info()
    assert second.builds == first.builds and second.hits == first.hits + len(images)


def test_a_fixed_size_resize_needs_no_crop() -> None:
    spec = InputSpec("exact", (224, 224), None)
    images = [stored(photo(w, h), o) for (w, h), o in [((500, 375), 1), ((333, 500), 6), ((100, 80), 1)]]
    for image, ours in zip(images, resize_images(images, [1, 6, 1], spec)):
        worst, mean = differences(ours, pil_reference(image, spec))
        assert worst <= 2 and mean < 0.05


def test_sizes_that_differ_without_a_crop_are_refused() -> None:
    spec = InputSpec("shortest_edge", (224, 224), None)
    with pytest.raises(ValueError, match="different sizes"):
        resize_batch([as_tensor(photo(500, 375)), as_tensor(photo(375, 500))], [1, 1], spec)
