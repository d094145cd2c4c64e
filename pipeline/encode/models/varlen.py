"""Per-image (varlen) attention for Qwen-VL vision towers on CUDA, through torch's own varlen flash kernel."""

# Under sdpa the vision tower runs one attention call per window per image in a Python loop; with this
# interface it makes one call per layer over all images of a batch, each attending only to itself
# (2.5x the images/s on an H100, see docs/benchmarks.md). transformers passes cu_seqlens only to
# implementations whose name contains "flash", hence the name. The language model keeps sdpa.

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTENTION_NAME = "embindex_flash_varlen"  # "flash" makes transformers pass cu_seqlens (packed sequences)
_registered = False


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (1, heads, tokens, head_dim) packed sequences -> (1, tokens, heads,
    head_dim). CUDA runs torch's varlen kernel; elsewhere each sequence goes through sdpa (for tests)."""
    if cu_seq_lens_q is None:
        raise ValueError(f"{ATTENTION_NAME} needs cu_seqlens: it serves only the Qwen-VL vision tower")
    cu_q = cu_seq_lens_q.to(torch.int32)
    cu_k = (cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q).to(torch.int32)
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (tokens, heads, head_dim)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        max_q = int(max_length_q if max_length_q is not None else (cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_length_k if max_length_k is not None else (cu_k[1:] - cu_k[:-1]).max())
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling)
    else:
        bounds = cu_q.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           scale=scaling).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ])
    return out.unsqueeze(0), None


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, varlen_attention)
        _registered = True
    return ATTENTION_NAME


def set_vision_attention(vision_tower: torch.nn.Module, implementation: str) -> None:
    """Switch only the vision tower: its blocks read its own (sub-)config, the language model another."""
    vision_tower.config._attn_implementation = implementation


def use_varlen_attention(vision_tower: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """On CUDA in half precision (the kernel's dtypes), give the vision tower varlen attention; else keep sdpa."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.9)
    except ImportError:
        log.info("torch %s has no varlen attention: the vision tower keeps sdpa", torch.__version__)
        return False
    set_vision_attention(vision_tower, register())
    log.info("vision tower: varlen attention (one call per layer for the whole batch)")
    return True
