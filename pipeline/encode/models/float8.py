"""encoder.dtype float8: the checks that refuse it early, and torchao's FP8 conversion of the vision tower."""

from __future__ import annotations

import importlib.util
import logging

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# Fixed-size single-vector kinds: one plain ViT forward per batch. The multi-vector and dynamic-resolution
# kinds (varlen attention, Qwen-VL) and http (a remote model) are not converted yet.
FLOAT8_KINDS = ("clip", "siglip", "siglip2", "dinov2")
# FP8 tensor cores (torch._scaled_mm): Ada is 8.9, Hopper 9.0; Ampere (8.0, 8.6) has none.
MIN_CAPABILITY = (8, 9)
# torch._scaled_mm needs both dimensions of a float8 weight to be multiples of 16; torchao leaves
# other layers in bfloat16 silently, so we pick the layers ourselves and log the ones kept.
FP8_MULTIPLE = 16
INSTALL_HINT = "pip install torchao"
# Model-only, batch 256 on an H200 (torch 2.11, torchao 0.18, random-weight CLIP, scripts/fp8_check.py):
# float8 pays off only compiled. Eager, the per-row activation quantisation runs as separate kernels:
# B/16 3,747 images/s vs bfloat16's 8,913, L/14 1,093 vs 2,326. Compiled: B/16 12,495 vs 11,675 (1.07x),
# L/14 3,498 vs 2,844 (1.23x). Cosine to bfloat16 vectors on 200 photos: at least 0.998.


def check_float8(device: torch.device, kind: str) -> None:
    """Refuse encoder.dtype float8 where it cannot run: cheap checks, made before any weights load."""
    if kind not in FLOAT8_KINDS:
        raise ConfigError(f"encoder.dtype: float8 is available for the fixed-size single-vector kinds "
                          f"({', '.join(FLOAT8_KINDS)}) only, not {kind!r}; use bfloat16 or auto")
    if device.type != "cuda" or not torch.cuda.is_available():
        found = "no CUDA GPU is available" if device.type == "cuda" else f"the device is {device}"
        raise ConfigError(f"encoder.dtype: float8 needs a CUDA GPU with FP8 tensor cores (Hopper/Ada or newer), "
                          f"but {found}; use bfloat16 or auto")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise ConfigError(f"encoder.dtype: float8 needs a GPU with FP8 tensor cores (Hopper/Ada or newer, compute "
                          f"capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+), but {device} is "
                          f"{torch.cuda.get_device_name(device)} with compute capability {major}.{minor}; "
                          "use bfloat16")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"encoder.dtype: float8 runs through torchao, which is not installed: {INSTALL_HINT}")


def _in_vision_tower(model: torch.nn.Module, name: str) -> bool:
    if not hasattr(model, "vision_model"):  # DINOv2: the whole model is the vision tower
        return True
    # CLIP and SigLIP: the text tower stays bfloat16 (text queries are few and small)
    return name.startswith("vision_model.") or name == "visual_projection"


def float8_linears(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The vision tower's Linear layers: (those float8 can take, those whose dimensions it cannot).

    Only plain nn.Linear: the patch embedding is a convolution, and nn.MultiheadAttention's out_proj
    (SigLIP's pooling head) is a subclass whose weight the attention function reads directly."""
    convert, keep = [], []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or not _in_vision_tower(model, name):
            continue
        fits = module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0
        (convert if fits else keep).append(name)
    return convert, keep


def to_float8(model: torch.nn.Module) -> list[str]:
    """Turn the vision tower's Linear layers (bfloat16, on the GPU) into float8 weights with dynamic
    per-row float8 activations, in place; returns the names of the layers converted."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ConfigError(f"encoder.dtype: float8 runs through torchao, which could not be imported ({exc}): "
                          f"{INSTALL_HINT} (a version made for torch {torch.__version__})") from None
    convert, keep = float8_linears(model)
    chosen = set(convert)
    # set_inductor_config=False: torchao would otherwise change torch._inductor's process-wide settings.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda _module, name: name in chosen)
    log.info("float8: %d Linear layers of the vision tower converted; %d kept in bfloat16 (dimensions not "
             "multiples of %d)%s", len(convert), len(keep), FP8_MULTIPLE, f": {', '.join(keep)}" if keep else "")
    return convert
