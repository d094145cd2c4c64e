"""The Encoder protocol, device/dtype choice, and the shared Hugging Face single-vector encoder."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.decode.spec import InputSpec, input_spec_from_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Encoder(Protocol):
    name: str  # model id (+ revision)
    kind: str
    dim: int
    multivector: bool
    device: torch.device
    dtype: torch.dtype

    def input_spec(self) -> InputSpec: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> L2-normalised float32 (B, dim) on the model's device."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def fingerprint(self) -> dict[str, Any]: ...


def resolve_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype the model computes in. float8 computes in bfloat16: only the vision tower's Linear layers
    become float8 (models/float8.py), and the index's identity records "float8" (models/source.py)."""
    if requested == "float8":
        return torch.bfloat16
    if requested != "auto":
        return DTYPES[requested]
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)


class HFSingleVectorEncoder:
    """A Hugging Face vision(-text) model giving one vector per image; families override _image_features."""

    multivector = False
    smoke_test = False  # a tiny random model: runs work, vectors mean nothing

    def __init__(self, model: torch.nn.Module, processor: Any, tokenizer: Any, identity: dict[str, Any],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval()
        self.processor, self.tokenizer = processor, tokenizer
        self.identity = identity  # the fingerprint less the dimension (see models.source.ModelSource)
        self.name, self.kind, self.device, self.dtype = identity["model"], identity["kind"], device, dtype
        self._spec = input_spec_from_processor(processor)
        # Normalisation runs on the device: (x * rescale - mean) / std == x * scale + shift
        mean = torch.tensor(self._spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self._spec.std, device=device).view(1, 3, 1, 1)
        self._scale = self._spec.rescale_factor / std
        self._shift = -mean / std
        height, width, _ = self._spec.output_shape
        with torch.inference_mode():
            probe = torch.zeros((1, height, width, 3), dtype=torch.uint8)
            self.dim = int(self.encode_images(probe).shape[-1])

    def input_spec(self) -> InputSpec:
        return self._spec

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind} models have no text tower: query by image instead")

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixels.to(self.device, non_blocking=True))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device -> normalised vectors: the whole of what `encoder.compile` compiles,
        so the normalisation fuses into the first kernels."""
        x = pixels.permute(0, 3, 1, 2).float()
        x = (x * self._scale + self._shift).to(self.dtype)
        return F.normalize(self._image_features(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return F.normalize(self._text_features(texts).float(), dim=-1).cpu().numpy()

    def fingerprint(self) -> dict[str, Any]:
        return {**self.identity, "dim": self.dim}
