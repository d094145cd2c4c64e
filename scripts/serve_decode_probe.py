"""Throughput of decoding request images (base64 data URI -> the encoder's pixels) in threads vs processes.

    python scripts/serve_decode_probe.py --images DIR [--workers 16] [--copies 48]

Why `embindex serve` decodes in processes: the decode is pipeline.decode.image's, PIL releases the GIL while it
decodes and resizes, yet the Python around it (base64, header, EXIF, conversions) holds it.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.decode.image import decode_bytes
from pipeline.decode.spec import InputSpec  # noqa: E402 - the repository's own decode

SPEC = InputSpec("shortest_edge", (224, 224), (224, 224))  # CLIP's


def decode(uri: str) -> tuple[int, ...]:
    return decode_bytes(base64.b64decode(uri.partition(",")[2]), SPEC, 100_000_000).pixels.shape


def measure(pool: Executor, uris: list[str]) -> float:
    list(pool.map(decode, uris[:200]))  # start the workers
    started = time.perf_counter()
    for future in [pool.submit(decode, uri) for uri in uris]:
        future.result()
    return len(uris) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--copies", type=int, default=48, help="each file is decoded this many times")
    args = parser.parse_args()
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    uris = [f"data:image/jpeg;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in files] * args.copies
    with ThreadPoolExecutor(args.workers) as threads:
        print(f"threads x{args.workers}: {measure(threads, uris):.0f} images/s", flush=True)
    with ProcessPoolExecutor(args.workers, mp.get_context("spawn")) as processes:
        print(f"processes x{args.workers}: {measure(processes, uris):.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
