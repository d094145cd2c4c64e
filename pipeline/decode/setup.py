"""How a run decodes: which files go to nvJPEG, how many worker processes, how far ahead; the pool it opens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.decode.pool import TASKS_PER_WORKER, DecodePool
from pipeline.decode.regions import region_bytes, slot_bytes
from pipeline.decode.spec import InputSpec
from pipeline.errors import ConfigError

PREFETCH_BYTES = 512 << 20  # decoded pixels waiting for the encoder (two 256-image batches of 224 px: 77 MB)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class DecodeSetup:
    spec: InputSpec
    use_gpu: bool  # JPEGs the GPU takes go to nvJPEG (feed.Feed); the rest to the workers
    n_workers: int
    depth: int  # decoded images prefetched ahead of the encoder (CPU decode only)


def gpu_decode_wanted(config: Config, device: Any, grouped: bool) -> bool:
    from pipeline.decode.nvjpeg import gpu_jpeg_available

    wanted = config.decode.device
    if wanted == "cpu" or grouped:  # nvJPEG feeds fixed-size batches only
        return False
    available = gpu_jpeg_available(device)
    if wanted == "cuda" and not available:
        raise ConfigError("decode.device: 'cuda' needs the encoder on a CUDA device and torchvision's nvJPEG "
                          "(pip install torchvision); use 'auto' or 'cpu'")
    return available


def gpu_workers(cores: int) -> int:
    """Decode processes beside the GPU path: a fifth of the cores stay for nvJPEG's host work, the feed and
    the encode thread (H100, 16 cores, ViT-B/16: 13 workers ran 4,865 images/s, 11 4,535; 15 ran slower)."""
    return max(1, cores - max(1, cores // 5))


def prefetch_depth(spec: InputSpec, batch_size: int, n_workers: int) -> int:
    """Decoded images held ahead of the encoder: two batches, within PREFETCH_BYTES of shared memory."""
    fits = PREFETCH_BYTES // slot_bytes(spec)
    return max(n_workers * TASKS_PER_WORKER, min(2 * batch_size, fits))


def decode_regions(spec: InputSpec, n_workers: int, depth: int) -> int:
    """Shared-memory regions: the tasks in flight, and the prefetched images (a few per region)."""
    per_region = max(1, min(4, region_bytes(spec) // slot_bytes(spec)))
    return n_workers * TASKS_PER_WORKER * 2 + depth // per_region


def worker_count(config: Config, use_gpu: bool, n_files: int) -> int:
    """decode.workers, or for auto the usable cores (fewer beside nvJPEG); never more than the files."""
    if config.decode.workers == "auto":
        n_workers = gpu_workers(usable_cores()) if use_gpu else usable_cores()
    else:
        n_workers = config.decode.workers
    return max(1, min(n_workers, n_files))


def decode_setup(config: Config, spec: InputSpec, device: Any, grouped: bool, n_files: int) -> DecodeSetup:
    use_gpu = gpu_decode_wanted(config, device, grouped)
    n_workers = worker_count(config, use_gpu, n_files)
    # Without the GPU feed, decoded images queue ahead of the encoder (prefetch): their memory too.
    depth = 0 if use_gpu else prefetch_depth(spec, config.encoder.batch_size, n_workers)
    return DecodeSetup(spec, use_gpu, n_workers, depth)


def open_pool(config: Config, setup: DecodeSetup) -> DecodePool:
    return DecodePool(setup.spec, setup.n_workers, config.decode.max_image_pixels, config.decode.timeout_s,
                      config.decode.jpeg_draft,
                      n_regions=decode_regions(setup.spec, setup.n_workers, setup.depth) if setup.depth else None,
                      gpu_jpeg_bytes=config.decode.gpu_max_file_mb << 20 if setup.use_gpu else 0,
                      max_worker_mb=config.decode.max_worker_mb)


def early_pool(config: Config, described: Any, n_files: int) -> tuple[DecodeSetup, DecodePool] | None:
    """Decode workers started before the weights load (their start-up took 1.7 s of a 6 s run on an H100),
    where the input policy is known without the model: fixed-size single-vector models, no pyramid.
    The caller checks the setup against the loaded encoder's and starts over if they differ."""
    if described is None or config.encoder.kind == "http" or described.spec is not None or config.encoder.pyramid:
        return None
    from pipeline.decode.spec import input_spec_from_processor

    try:
        spec = input_spec_from_processor(described.processor)
    except ValueError:  # an unusual processor: the encoder says so when it loads
        return None
    setup = decode_setup(config, spec, described.device, False, n_files)
    return setup, open_pool(config, setup)
