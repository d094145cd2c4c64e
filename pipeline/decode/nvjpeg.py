"""JPEG decoding on the GPU: batched nvJPEG (torchvision), EXIF orientation, resize and crop on the device."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.decode.resize_batch import resize_batch
from pipeline.decode.spec import InputSpec

log = logging.getLogger(__name__)

# Source pixels decoded at once (~1.2 GB of RGB): ~2,000 ImageNet photos (gpu_batch bounds those first), 33 of
# 12 MP. Larger chunks keep the hardware decoders busier: 12 MP end to end on an H100 went from 878 to 1,033
# images/s with 400 MP instead of 200 (800 MP: no better; docs/benchmarks.md).
DECODE_PIXELS = 400_000_000


def pixel_chunks(files: list[JpegFile], budget: int) -> list[list[JpegFile]]:
    """Consecutive chunks of files whose pixel counts sum to at most `budget` (a lone larger file is alone)."""
    chunks: list[list[JpegFile]] = []
    total = budget + 1
    for file in files:
        pixels = file.width * file.height
        if total + pixels > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(file)
        total += pixels
    return chunks


def gpu_jpeg_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 - optional: the GPU extra
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@dataclass
class JpegFile:
    key: Any
    path: str
    data: bytes | bytearray
    content_hash: str
    width: int = 0  # after EXIF orientation, as stored in the table
    height: int = 0
    orientation: int = 1


@dataclass
class GpuBatch:
    """Decoded, resized pixels on the device (B, H, W, 3) uint8, ready for encode_images."""

    items: list[Any]  # DecodeResult-like records (key, width, height, content_hash)
    pixels: torch.Tensor
    ready: torch.cuda.Event | None = None
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def orient(chw: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's exif_transpose does."""
    if orientation == 2:
        return chw.flip(-1)
    if orientation == 3:
        return chw.flip(-1).flip(-2)
    if orientation == 4:
        return chw.flip(-2)
    if orientation == 5:
        return chw.transpose(-1, -2)
    if orientation == 6:
        return chw.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return chw.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return chw.transpose(-1, -2).flip(-2)
    return chw


def resize_and_crop(chw: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (3, H, W) or (N, 3, H, W) upright images of one size -> uint8 (..., 3, h, w) with the processor's
    resize and center crop, by the decoder's own arithmetic (resize_batch: PIL's, within a grey level)."""
    batch = chw[None] if chw.dim() == 3 else chw
    pixels, _ = resize_batch(list(batch), [1] * len(batch), spec)  # one size: one canvas, rows in input order
    out = pixels.permute(0, 3, 1, 2)
    return out[0] if chw.dim() == 3 else out


def _host_tensor(data: bytes | bytearray | np.ndarray) -> torch.Tensor:
    """JPEG bytes as a uint8 tensor: the feed's views into shared memory and bytearrays are wrapped as they are;
    bytes are read-only to torch, so they are copied."""
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)


class GpuJpegDecoder:
    """Decodes batches of JPEG bytes with nvJPEG on its own CUDA stream."""

    def __init__(self, spec: InputSpec, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.spec, self.device = spec, device
        # High priority: its resize kernels go ahead of a forward pass already queued, not after it.
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self._warm_up()

    def _warm_up(self) -> None:
        """nvJPEG creates its decoder (hardware engines, buffers) on the first call: make it now."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "JPEG")
        self.decode([JpegFile(None, "", buffer.getvalue(), "", 64, 48)])

    def _decode(self, files: list[JpegFile]) -> tuple[list[torch.Tensor], list[JpegFile], list[JpegFile]]:
        tensors = [_host_tensor(f.data) for f in files]
        try:
            return self._decode_jpeg(tensors, mode=self._rgb, device=self.device), files, []
        except RuntimeError:
            # One bad file fails the whole batch: find it, keep the rest.
            decoded, good, bad = [], [], []
            for tensor, file in zip(tensors, files):
                try:
                    decoded.append(self._decode_jpeg(tensor, mode=self._rgb, device=self.device))
                    good.append(file)
                except RuntimeError:
                    bad.append(file)
            return decoded, good, bad

    def decode(self, files: list[JpegFile]) -> tuple[torch.Tensor | None, list[JpegFile], list[JpegFile], Any]:
        """-> (pixels (B, H, W, 3) on the device, decoded files, files for the CPU, ready event).

        Files are decoded in chunks of at most DECODE_PIXELS source pixels: 256 decoded 12 MP photos
        held 43.8 GB at once; the resized outputs of all chunks share one batch."""
        with torch.cuda.stream(self.stream):
            outputs, good, bad = [], [], []
            for chunk in pixel_chunks(files, DECODE_PIXELS):
                images, decoded, rejected = self._decode(chunk)
                bad.extend(rejected)
                if not decoded:
                    continue
                # One resize for the whole chunk, whatever its sizes (resize_batch): the per-size loop it
                # replaces made 510 torch calls (264 kernels on the H200) for 256 ImageNet photos of ~100
                # sizes, from a thread that shares the GIL with the feed and the main thread; resize_batch
                # makes ~80 a batch and ~45 a canvas (1-2 canvases). Rows come in canvas order.
                pixels, order = resize_batch(images, [file.orientation for file in decoded], self.spec)
                outputs.append(pixels)
                good.extend(decoded[i] for i in order)
                del images
            if not good:
                return None, [], bad, None
            pixels = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return pixels, good, bad, ready
