"""The GPU JPEG path: its orientation and resize math (run on CPU tensors here), and on a GPU, its
embeddings against the CPU path's for the same files (cosine >= 0.99: the resize kernels differ)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import EncoderConfig, load_config
from pipeline.decode.image import decode_file, read_file
from pipeline.decode.jpeg_probe import probe_jpeg
from pipeline.decode.nvjpeg import orient, resize_and_crop
from pipeline.decode.spec import InputSpec
from pipeline.encode.models.load import load_encoder
from tests.conftest import HOSTILE, IMAGES, write_config

CLIP_224 = InputSpec("shortest_edge", (224, 224), (224, 224))


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, int]:
    """The comparison used on the GPU: the worst per-file cosine over the files both hold."""
    shared = sorted(set(a) & set(b))
    cosines = [float(np.dot(a[k], b[k]) / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in shared]
    return min(cosines), len(shared)


def test_min_cosine_compares_file_by_file() -> None:
    a = {"x": np.array([1.0, 0.0]), "y": np.array([0.0, 1.0]), "only_a": np.array([1.0, 1.0])}
    b = {"x": np.array([2.0, 0.0]), "y": np.array([1.0, 1.0])}
    worst, n = min_cosine(a, b)
    assert n == 2 and worst == pytest.approx(np.sqrt(0.5))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation  # PIL reads the cached EXIF back in exif_transpose
    expected = np.asarray(ImageOps.exif_transpose(image))
    ours = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, expected)


def test_probe_sends_cmyk_and_non_jpeg_to_the_cpu() -> None:
    assert probe_jpeg(read_file(str(HOSTILE / "cmyk.jpg")), 10**8) is None
    assert probe_jpeg(read_file(str(HOSTILE / "png_with_jpg_extension.jpg")), 10**8) is None
    assert probe_jpeg(read_file(str(HOSTILE / "truncated_half.jpg")), 10**8) is None  # nvJPEG would not complain
    assert probe_jpeg(read_file(str(HOSTILE / "exif_orientation_6.jpg")), 10**8) == (200, 400, 6)


def test_device_resize_embeds_like_the_pil_path(tiny_models: Path) -> None:
    """The GPU path's resize (torch antialiased bicubic), run on the CPU, against the PIL path."""
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "clip"), device="cpu"))
    spec = encoder.input_spec()
    worst = 1.0
    for path in sorted(IMAGES.iterdir())[::25]:
        pil = decode_file(str(path), spec, 10**8).pixels
        decoded = torch.from_numpy(np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).copy())
        ours = resize_and_crop(decoded.permute(2, 0, 1), spec).permute(1, 2, 0).contiguous()
        a = encoder.encode_images(torch.from_numpy(pil.copy())[None]).numpy()[0]
        b = encoder.encode_images(ours[None]).numpy()[0]
        worst = min(worst, float(np.dot(a, b)))
    assert worst >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_decoding_give_the_same_rows_and_vectors(tmp_path: Path, tiny_models: Path) -> None:
    import pyarrow.dataset as ds  # Parquet only: the GPU machines have no lancedb

    from pipeline.runners.local import run_index

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(IMAGES.iterdir())[:200]:
        shutil.copy(path, photos / path.name)
    for path in HOSTILE.iterdir():
        shutil.copy(path, photos / path.name)
    vectors = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        folder.mkdir()
        config = load_config(write_config(folder, str(photos), str(tiny_models / "clip"), output={"lancedb": None},
                                          decode={"device": device}, run={"max_error_rate": 0.5}))
        report = run_index(config, progress=False).report
        # Both paths pull from one queue: on a GPU machine the CPU pool takes its share too.
        assert (report["images_gpu_decoded"] > 0) == (device == "cuda")
        table = ds.dataset(folder / "embeddings" / "images").to_table()
        vectors[device] = dict(zip(table["path"].to_pylist(), np.stack(table["embedding"].to_numpy(False))))
        errors = ds.dataset(folder / "embeddings" / "images_errors").to_table()
        vectors[device + "_errors"] = sorted(errors["path"].to_pylist())
    assert sorted(vectors["cpu"]) == sorted(vectors["cuda"])
    assert vectors["cpu_errors"] == vectors["cuda_errors"]
    worst, n = min_cosine(vectors["cpu"], vectors["cuda"])
    assert n == len(vectors["cpu"]) and worst >= 0.99


def test_large_downscale_matches_pil() -> None:
    """12 MP to 224 in one antialiased pass, as PIL does it (the per-size path averaged down first: mean < 3)."""
    spec = InputSpec("shortest_edge", (224, 224), (224, 224))
    source = Image.open(sorted(IMAGES.iterdir())[5]).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    pil = np.asarray(source.resize((298, 224), Image.Resampling.BICUBIC).crop((37, 0, 261, 224)))
    ours = resize_and_crop(torch.from_numpy(np.asarray(source).copy()).permute(2, 0, 1), spec).permute(1, 2, 0)
    assert ours.shape == (224, 224, 3)
    diff = np.abs(ours.numpy().astype(int) - pil.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_decode_chunks_follow_a_pixel_budget() -> None:
    from pipeline.decode.nvjpeg import JpegFile, pixel_chunks

    large = [JpegFile(i, "", b"", "", 4000, 3000) for i in range(40)]
    assert [len(c) for c in pixel_chunks(large, 200_000_000)] == [16, 16, 8]
    small = [JpegFile(i, "", b"", "", 500, 375) for i in range(256)]
    assert [len(c) for c in pixel_chunks(small, 200_000_000)] == [256]
    assert [len(c) for c in pixel_chunks([JpegFile(0, "", b"", "", 20000, 20000)], 10)] == [1]
