"""`encoder.compile`: torch.compile of a fixed-size encoder's forward pass, its disk cache, and when auto repays it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# torch.compile made the CLIP vision towers 22-29 % faster than eager on an H200 (B/16 8,954 -> 11,539
# images/s, L/14 2,339 -> 2,857; DESIGN.md): auto counts on a fifth of the eager time saved per image.
EXPECTED_GAIN = 0.2
# A first compile with an empty cache, when this machine has not compiled the model before (a guess on
# the high side: ViT-B/16 and L/14 took COLD_COMPILE_S or less on an H200; docs/benchmarks.md).
COLD_COMPILE_S = 60.0
RECORDS = "embindex-compiles.json"  # in the cache folder: compile seconds per model, this machine


@dataclass
class CompileChoice:
    """What a run decided about compiling, and what the compile took (report field `compile`)."""

    enabled: bool
    reason: str
    cache_dir: str | None = None
    compile_s: float = 0.0
    eager_ms_per_image: float | None = None

    def report(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "reason": self.reason, "cache_dir": self.cache_dir,
                "compile_s": self.compile_s, "eager_ms_per_image": self.eager_ms_per_image}


def cache_dir() -> Path:
    """torch's compile caches (Inductor's FX graphs, AOTAutograd, Triton kernels) live here across runs:
    TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/embindex/torch-compile (torch's default is under /tmp,
    which a reboot or a cleaner empties, and the next night would compile from scratch)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embindex" / "torch-compile"


def compilable(encoder: Any) -> Any | None:
    """The module-level encoder whose `forward` takes a uint8 batch (a pyramid's base), or None."""
    base = getattr(encoder, "base", encoder)
    if getattr(base, "remote", False) or getattr(base, "multivector", False) or not hasattr(base, "forward"):
        return None
    return base if not base.input_spec().dynamic else None


def _record_key(base: Any) -> str:
    """The model, torch and the GPU: one compiled graph serves every batch size (the batch is dynamic)."""
    identity = json.dumps({**base.fingerprint(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(base.device) if base.device.type == "cuda"
                           else base.device.type}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _records(folder: Path) -> dict[str, float]:
    try:
        return json.loads((folder / RECORDS).read_text())
    except (OSError, ValueError):
        return {}


def _remember(folder: Path, key: str, compile_s: float) -> None:
    records = {**_records(folder), key: round(compile_s, 2)}
    temporary = folder / f"{RECORDS}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(records, indent=1))
    temporary.replace(folder / RECORDS)


def _eager_ms_per_image(base: Any, batch_size: int) -> float:
    """One timed forward pass at the run's batch size (after the warm-up): the eager cost per image."""
    height, width, _ = base.input_spec().output_shape
    pixels = torch.zeros((batch_size, height, width, 3), dtype=torch.uint8, device=base.device)
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)
    started = time.perf_counter()
    base.encode_images(pixels)
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)
    return (time.perf_counter() - started) * 1000 / batch_size


def choose(setting: str | bool, encoder: Any, n_images: int, batch_size: int) -> CompileChoice:
    """Whether this run compiles. auto: on CUDA, when the expected saving (EXPECTED_GAIN of the measured
    eager time, over the images to encode) exceeds the compile it would pay: the last one recorded on
    this machine for this model (a warm cache), else COLD_COMPILE_S."""
    base = compilable(encoder)
    if setting is False:
        if base is not None and base.fingerprint().get("dtype") == "float8":
            raise ConfigError("encoder.compile: false with encoder.dtype float8: uncompiled, FP8 ran 2.1-2.4x slower "
                              "than bfloat16 on an H200 (models/float8.py); set encoder.compile to auto or true")
        return CompileChoice(False, "encoder.compile: false")
    if base is None:
        if setting is True:
            raise ConfigError(f"encoder.compile: true needs a fixed-size single-vector encoder; {encoder.kind} "
                              "is multi-vector, dynamic-resolution or remote (set encoder.compile to auto or false)")
        return CompileChoice(False, f"{encoder.kind}: not a fixed-size single-vector encoder")
    folder = cache_dir()
    if setting is True:
        return CompileChoice(True, "encoder.compile: true", str(folder))
    if base.fingerprint().get("dtype") == "float8":  # uncompiled, FP8 ran 2.1-2.4x slower than bfloat16
        return CompileChoice(True, "auto: encoder.dtype float8 runs compiled (its activation scaling fuses)",
                             str(folder))
    if base.device.type != "cuda":
        return CompileChoice(False, f"auto: the encoder runs on {base.device.type}, not CUDA")
    eager_ms = _eager_ms_per_image(base, batch_size)
    enabled, reason = repays(eager_ms, n_images, _records(folder).get(_record_key(base)))
    return CompileChoice(enabled, reason, str(folder), eager_ms_per_image=eager_ms)


def repays(eager_ms_per_image: float, n_images: int, recorded_s: float | None) -> tuple[bool, str]:
    """auto's rule: (compile?, why) from the eager cost per image and the last compile recorded here, if any."""
    cost_s = recorded_s if recorded_s is not None else COLD_COMPILE_S
    saving_s = EXPECTED_GAIN * eager_ms_per_image / 1000 * n_images
    cache = "warm cache" if recorded_s is not None else "cold cache"
    why = f"auto: saves ~{saving_s:.1f} s over {n_images} images, compiling costs ~{cost_s:.1f} s ({cache})"
    return saving_s > cost_s, why


def compile_encoder(encoder: Any, choice: CompileChoice, batch_size: int) -> None:
    """Replace the encoder's forward with a compiled one and compile it now, on a batch of zeros, so the
    compile counts in the start-up (compile_s), not in the first batch."""
    base = compilable(encoder)
    folder = Path(choice.cache_dir or cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read when Inductor first writes or looks up
    compiled = torch.compile(base.forward)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        count = pixels.shape[0]
        if not pixels.is_inference():  # a batch made outside inference mode (nvJPEG's) would need a second
            pixels = pixels.clone()  # graph (dynamo guards on the dispatch keys); a copy costs ~20 us on a GPU
        if count < 2:  # dynamo specialises sizes 0 and 1: pad, rather than compile a second graph
            pixels = torch.cat([pixels, pixels.new_zeros((2 - count, *pixels.shape[1:]))])
        torch._dynamo.maybe_mark_dynamic(pixels, 0)  # one graph for every batch size
        return compiled(pixels)[:count]

    height, width, _ = base.input_spec().output_shape
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            forward(torch.zeros((batch_size, height, width, 3), dtype=torch.uint8, device=base.device))
        if base.device.type == "cuda":
            torch.cuda.synchronize(base.device)
    except Exception as exc:  # no compiler toolchain, an op Inductor cannot lower: the eager model still runs
        choice.compile_s = time.perf_counter() - started
        if choice.reason.startswith("encoder.compile: true"):
            raise ConfigError(f"encoder.compile: true, but compiling the encoder failed ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); set encoder.compile to false or auto") from exc
        choice.enabled, choice.reason = False, f"{choice.reason}; the compile failed, running eager: {exc}"[:500]
        log.warning("encoder.compile: the compile failed after %.1f s, running eager: %s", choice.compile_s, exc)
        return
    choice.compile_s = time.perf_counter() - started
    base.forward = forward
    try:
        _remember(folder, _record_key(base), choice.compile_s)
    except OSError as exc:  # a read-only cache folder: the next run assumes a cold compile
        log.warning("could not record the compile time in %s: %s", folder, exc)
    log.info("compiled the encoder in %.1f s (cache %s)", choice.compile_s, folder)
