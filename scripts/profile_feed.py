"""Main-process CPU per file on the GPU-decode path, without a GPU: stand-in nvJPEG and encoder.

    python scripts/profile_feed.py --images DIR --model tiny-models/clip [--workers 1] [--yappi]

The decode workers do their real work (read, hash, probe); the stand-ins cost nothing, so what the
main process spends per file is the feed's own Python: at 5,000 files/s the whole budget of one
core (the GIL) is 200 us per file, and every thread of the main process shares it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline.decode.setup as decode_setup  # noqa: E402
import pipeline.runners.local as run  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.encode.models.load import load_encoder  # noqa: E402


class StandInDecoder:
    def __init__(self, spec, device) -> None:  # noqa: ANN001
        self.shape = spec.output_shape

    def decode(self, files):  # noqa: ANN001, ANN201
        return torch.zeros((len(files), *self.shape), dtype=torch.uint8), files, [], None


class StandInEncoder:
    def __init__(self, real) -> None:  # noqa: ANN001
        self.real = real
        self.device = torch.device("cpu")

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.real, name)

    def encode_images(self, pixels):  # noqa: ANN001, ANN201
        return torch.zeros((len(pixels), self.real.dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--yappi", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    config_path = work / "c.yaml"
    config_path.write_text(yaml.safe_dump({
        "input": {"root": str(Path(args.images).resolve())}, "decode": {"workers": args.workers, "device": "cuda"},
        "encoder": {"model": str(Path(args.model).resolve()), "device": "cpu", "batch_size": 256},
        "output": {"lancedb": None, "parquet": {"dir": str(work / "emb")}},
        "run": {"report_dir": str(work / "runs"), "shard_size": 8192}}))
    config = load_config(config_path)
    encoder = StandInEncoder(load_encoder(config.encoder))
    decode_setup.gpu_decode_wanted = lambda config, device, grouped: True
    run.GpuJpegDecoder = StandInDecoder
    if args.yappi:
        import yappi
        yappi.set_clock_type("cpu")
        yappi.start()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = run.run_index(config, encoder=encoder, progress=False)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    n = result.report["images_embedded"]
    print(f"{n} files, {wall:.2f} s wall ({n / wall:.0f} files/s), main process {cpu:.2f} CPU-s "
          f"= {cpu / n * 1e6:.0f} us per file; gpu-decoded {result.report['images_gpu_decoded']}")
    if args.yappi:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        stats.print_all(columns={0: ("name", 60), 1: ("ncall", 9), 2: ("tsub", 8), 3: ("ttot", 8)}, out=sys.stdout)
        for thread in yappi.get_thread_stats():
            print(thread.name, thread.ttot)


if __name__ == "__main__":
    main()
