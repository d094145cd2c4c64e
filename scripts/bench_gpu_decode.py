"""Decode-only throughput of the candidate data paths on this machine, side by side on the same JPEGs.

    python scripts/bench_gpu_decode.py --images DIR [--upscale 4000x3000] [--copies 20] [--workers 16]

Prints images/s for decoding (to RGB on the GPU) plus resizing to 224x224, per backend and batch size:
torchvision's nvJPEG and nvImageCodec (a per-image resize), the pipeline's own GPU decoder
(`GpuJpegDecoder`: nvJPEG plus its batched resize and center crop), and the CPU pool (`DecodePool`:
read, hash, decode and resize in worker processes, files written to a temporary folder first).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pipeline package


def load_bytes(images: Path, copies: int, upscale: tuple[int, int] | None) -> list[bytes]:
    blobs = []
    for path in sorted(images.iterdir())[:100]:
        if upscale:
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").resize(upscale, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            blobs.append(buffer.getvalue())
        else:
            blobs.append(path.read_bytes())
    return blobs * copies


def resize_224(images: list[torch.Tensor]) -> torch.Tensor:
    out = [F.interpolate(x.permute(2, 0, 1)[None].float() if x.shape[-1] == 3 else x[None].float(), size=(224, 224),
                         mode="bilinear", antialias=True) for x in images]
    return torch.cat(out)


def bench(name: str, decode, blobs: list[bytes], batch: int) -> None:
    decode(blobs[:batch])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(blobs), batch):
        resize_224(decode(blobs[start:start + batch]))
    torch.cuda.synchronize()
    rate = len(blobs) / (time.perf_counter() - started)
    print(f"{name:28s} batch {batch:4d}: {rate:8.0f} images/s", flush=True)


def _clip_spec():  # noqa: ANN202 - CLIP's processor: shortest edge 224, center crop 224
    from pipeline.decode.spec import InputSpec

    return InputSpec("shortest_edge", (224, 224), (224, 224))


def pipeline_decoder(blobs: list[bytes]) -> None:
    """The pipeline's GPU decoder: nvJPEG, then one resize and crop per batch, as a run uses it."""
    from pipeline.decode.jpeg_probe import probe_jpeg
    from pipeline.decode.nvjpeg import GpuJpegDecoder, JpegFile

    decoder = GpuJpegDecoder(_clip_spec(), torch.device("cuda"))
    files = []
    for blob in blobs:
        width, height, orientation = probe_jpeg(blob, 10**9) or (0, 0, 1)
        files.append(JpegFile(None, "", bytearray(blob), "", width, height, orientation))
    for batch in (64, 256):
        decoder.decode(files[:batch])
        torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(files), batch):
            decoder.decode(files[start:start + batch])
        torch.cuda.synchronize()
        rate = len(files) / (time.perf_counter() - started)
        print(f"{'pipeline GpuJpegDecoder':28s} batch {batch:4d}: {rate:8.0f} images/s", flush=True)


def cpu_pool(blobs: list[bytes], workers: int) -> None:
    """The CPU pool on the same JPEGs as files: read, hash, decode (draft mode) and resize in processes."""
    import tempfile

    from pipeline.decode.pool import DecodePool

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, blob in enumerate(blobs):
            paths.append(Path(folder) / f"{index:06d}.jpg")
            paths[-1].write_bytes(blob)
        with DecodePool(_clip_spec(), workers, 100_000_000) as pool:
            started, count = time.perf_counter(), 0
            for result in pool.imap((index, str(path), ()) for index, path in enumerate(paths)):
                pool.release(result.slot)
                count += result.error is None
            rate = count / (time.perf_counter() - started)
    print(f"{f'CPU pool, {workers} processes':28s}           : {rate:8.0f} images/s (pool start included)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--upscale", default=None)
    parser.add_argument("--workers", type=int, default=16, help="CPU pool processes (0: skip the pool)")
    args = parser.parse_args()
    upscale = tuple(int(v) for v in args.upscale.split("x")) if args.upscale else None
    blobs = load_bytes(args.images, args.copies, upscale)
    print(f"{len(blobs)} JPEGs, mean {sum(map(len, blobs)) / len(blobs) / 1e3:.0f} KB", flush=True)

    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    def tv(batch):
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in batch]
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device="cuda")

    print("torchvision", torchvision.__version__)
    for batch in (64, 256):
        bench("torchvision nvjpeg", tv, blobs, batch)
    pipeline_decoder(blobs)
    if args.workers:
        cpu_pool(blobs, args.workers)
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        print("nvimgcodec unavailable:", exc)
        return
    for kind in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"):
        try:
            decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))])
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(kind, "unavailable:", exc)
            continue

        def nv(batch, decoder=decoder):
            return [torch.as_tensor(image, device="cuda") for image in decoder.decode(batch)]

        for batch in (64, 256):
            try:
                bench(f"nvimgcodec {kind}", nv, blobs, batch)
            except Exception as exc:  # noqa: BLE001
                print(kind, "failed:", exc)
                break


if __name__ == "__main__":
    main()
