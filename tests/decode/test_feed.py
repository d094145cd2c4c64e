"""The GPU feed's routing, run on the CPU: a stand-in for nvJPEG that decodes with torch from PIL's pixels.

Workers hand JPEGs the GPU can take back as bytes; a rejected file goes back to a worker; other
files and errors take the CPU path. The rows must be those of the plain CPU pool, file for file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import EncoderConfig
from pipeline.decode.feed import Feed
from pipeline.decode.nvjpeg import JpegFile, orient, resize_and_crop
from pipeline.decode.pool import DecodePool
from pipeline.encode.models.load import load_encoder
from pipeline.encode.stream import EncodeTimer, embed_stream
from pipeline.records import DecodeResult, Embedded
from tests.conftest import HOSTILE, IMAGES

REJECTED_BY_GPU = "n01530575_brambling.JPEG"  # the stand-in refuses it, as nvJPEG refuses odd files


class CpuStandInDecoder:
    """GpuJpegDecoder's contract on the CPU: decode the stored (unrotated) JPEG, orient, resize."""

    def __init__(self, spec) -> None:
        self.spec, self.batches = spec, []

    def decode(self, files: list[JpegFile]):
        self.batches.append(len(files))
        good = [f for f in files if f.key.path is None or not f.key.path.endswith(REJECTED_BY_GPU)]
        bad = [f for f in files if f not in good]
        if not good:
            return None, [], bad, None
        images = []
        for file in good:
            stored = np.asarray(Image.open(io.BytesIO(file.data)).convert("RGB")).copy()  # no EXIF transpose
            chw = orient(torch.from_numpy(stored).permute(2, 0, 1), file.orientation)
            images.append(resize_and_crop(chw, self.spec).permute(1, 2, 0))
        return torch.stack(images), good, bad, None


def items_for(folder: Path, names: list[str]) -> list[tuple]:
    return [({"path": name, "size_bytes": (folder / name).stat().st_size}, str(folder / name), None) for name in names]


def collect(events) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, tuple[int, int]]]:
    vectors, errors, sizes = {}, {}, {}
    for event in events:
        if isinstance(event, Embedded):
            for item, vector in zip(event.items, event.vectors):
                vectors[item.key["path"]] = vector
                sizes[item.key["path"]] = (item.width, item.height)
        else:
            assert isinstance(event, DecodeResult) and event.error
            errors[event.key["path"]] = event.error
    return vectors, errors, sizes


@pytest.mark.parametrize("folder, names", [
    (IMAGES, sorted(p.name for p in IMAGES.iterdir())[:60]),
    (HOSTILE, ["exif_orientation_6.jpg", "cmyk.jpg", "truncated_half.jpg", "png_with_jpg_extension.jpg",
               "not_an_image.jpg", "UPPERCASE_EXT.JPG", "large_24mp.jpg", "plain.bmp"]),
])
def test_the_feed_gives_the_rows_of_the_cpu_pool(tiny_models: Path, folder: Path, names: list[str]) -> None:
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "clip"), device="cpu"))
    spec = encoder.input_spec()
    with DecodePool(spec, 2, 10**8) as pool:
        reference = collect(embed_stream(pool.imap(items_for(folder, names)), encoder, 16, pool.release,
                                         EncodeTimer()))
    stand_in = CpuStandInDecoder(spec)
    timer = EncodeTimer()
    with DecodePool(spec, 2, 10**8, gpu_jpeg_bytes=8 << 20) as pool:
        feed = Feed(pool, stand_in, gpu_batch=8)
        fed = collect(embed_stream(feed.stream(iter(items_for(folder, names))), encoder, 16, pool.release, timer))
    assert fed[1] == reference[1]  # the same errors, with the same reasons
    assert fed[2] == reference[2]  # the same upright sizes
    assert sorted(fed[0]) == sorted(reference[0])
    worst = min(float(np.dot(fed[0][k], reference[0][k])) for k in reference[0])
    assert worst >= 0.99  # torch's resize against PIL's
    assert timer.gpu_decoded == feed.gpu_decoded > 0 and sum(stand_in.batches) >= feed.gpu_decoded
    if folder == IMAGES:
        assert REJECTED_BY_GPU in fed[0]  # refused by the GPU, decoded by a worker
        assert feed.gpu_decoded < len(names)


def test_a_backed_up_gpu_leaves_the_decoding_to_the_workers(tiny_models: Path) -> None:
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "clip"), device="cpu"))
    with DecodePool(encoder.input_spec(), 2, 10**8, gpu_jpeg_bytes=8 << 20) as pool:
        pool.gpu_room.value = 0
        names = sorted(p.name for p in IMAGES.iterdir())[:10]
        results = list(pool.imap(items_for(IMAGES, names)))
        assert all(r.jpeg is None and r.pixels is not None for r in results)
        for result in results:
            pool.release(result.slot)
        pool.gpu_room.value = 1
        results = list(pool.imap(items_for(IMAGES, names)))
        assert all(r.jpeg is not None and r.pixels is None for r in results)
        for result in results:
            upright = ImageOps.exif_transpose(Image.open(IMAGES / result.key["path"]))
            assert (result.width, result.height) == upright.size
            assert result.jpeg.tobytes() == (IMAGES / result.key["path"]).read_bytes()  # a view into shared memory
            pool.release(result.slot)  # held until the GPU has read the bytes
