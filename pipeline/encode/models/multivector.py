"""Shared parts of the vision-language encoders: pixel budget, Qwen-VL patchify on device, left padding, real rows."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.config import QUALITY_PIXELS, EncoderConfig
from pipeline.decode.spec import InputSpec
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# Kinds whose images keep their own (smart-resized) size: one language-model token per (patch * merge)^2 pixels,
# 28x28 for Qwen2/2.5-VL, 32x32 for Qwen3-VL.
DYNAMIC_KINDS = ("colqwen2", "colqwen2_5", "biqwen2_5", "qwen_vl_features", "qwen3_vl_embedding")
# Kinds whose published recipe sets the pixel bounds, not the processor's file: Qwen3VLEmbedder resizes each
# image to 4..1800 tokens of 32x32 pixels itself (qwen_vl_utils) and calls its processor with do_resize=False.
RECIPE_PIXELS = {"qwen3_vl_embedding": (4 * 32 * 32, 1800 * 32 * 32)}
VLM_KINDS = (*DYNAMIC_KINDS, "colpali")


def pixel_budget(config: EncoderConfig, image_processor: Any,
                 defaults: tuple[int, int] | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels): encoder.min/max_pixels, else encoder.quality, else `defaults` (a recipe's own),
    else the model processor's own."""
    size = image_processor.size  # Qwen2VLImageProcessor keeps them as shortest_edge / longest_edge
    low, high = defaults or (size["shortest_edge"], size["longest_edge"])
    if config.quality is not None:  # presets count tokens: 28x28 pixels each in QUALITY_PIXELS, 32x32 for Qwen3-VL
        token_pixels = int(image_processor.patch_size * image_processor.merge_size) ** 2
        low, high = (bound // (28 * 28) * token_pixels for bound in QUALITY_PIXELS[config.quality])
    low = config.min_pixels if config.min_pixels is not None else low
    high = config.max_pixels if config.max_pixels is not None else high
    if low > high:
        key = "encoder.min_pixels" if config.min_pixels is not None else "encoder.max_pixels"
        raise ConfigError(f"{key}: min_pixels {low} is more than max_pixels {high} (the other bound is the "
                          "model's own); set both")
    return int(low), int(high)


def check_no_pixel_bounds(config: EncoderConfig, kind: str) -> None:
    """Fixed-resolution models: a pixel budget would be silently ignored, so it is an error."""
    for key in ("min_pixels", "max_pixels", "quality"):
        if getattr(config, key) is not None:
            raise ConfigError(f"encoder.{key}: applies only to dynamic-resolution models "
                              f"({', '.join(DYNAMIC_KINDS)}); {kind} takes images of one fixed size")


def qwen_input_spec(image_processor: Any, min_pixels: int, max_pixels: int) -> InputSpec:
    """The decode workers' smart resize for a Qwen-VL image processor (sides multiples of patch * merge)."""
    resample = getattr(image_processor, "resample", 3)
    return InputSpec(
        resize="smart",
        size=(0, 0),
        crop=None,
        resample=int(getattr(resample, "value", resample)),
        mean=tuple(float(m) for m in image_processor.image_mean),
        std=tuple(float(s) for s in image_processor.image_std),
        rescale_factor=float(image_processor.rescale_factor),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        factor=int(image_processor.patch_size * image_processor.merge_size),
    )


def vlm_input_spec(kind: str, image_processor: Any, config: EncoderConfig) -> InputSpec | None:
    """The dynamic-resolution spec of a Qwen-VL kind; None (the processor's fixed spec) for the others, where
    a pixel budget in the config is an error."""
    if kind in DYNAMIC_KINDS:
        return qwen_input_spec(image_processor, *pixel_budget(config, image_processor, RECIPE_PIXELS.get(kind)))
    check_no_pixel_bounds(config, kind)
    return None


def spec_identity(spec: InputSpec) -> dict[str, Any]:
    """The preprocessing part of a fingerprint for a dynamic-resolution spec."""
    return {"resize": spec.resize, "factor": spec.factor, "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels, "resample": spec.resample, "mean": list(spec.mean), "std": list(spec.std)}


class QwenPatchifier:
    """uint8 (H, W, 3) images -> Qwen-VL `pixel_values` (sum of t*h*w, 3*T*P*P) and `image_grid_thw` (B, 3),
    computed on the model's device, in the layout of transformers' Qwen2VLImageProcessor."""

    def __init__(self, spec: InputSpec, vision_config: Any, device: torch.device) -> None:
        self.patch = int(vision_config.patch_size)
        self.merge = int(vision_config.spatial_merge_size)
        self.temporal = int(vision_config.temporal_patch_size)  # a still image is its own frame repeated
        self.device = device
        mean = torch.tensor(spec.mean, device=device).view(3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(3, 1, 1)
        # (x * rescale - mean) / std == x * scale + shift
        self.scale, self.shift = spec.rescale_factor / std, -mean / std

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.patch * self.merge
        if height % factor or width % factor:
            raise ValueError(f"a {width}x{height} image: sides must be multiples of {factor} (smart-resized)")
        return 1, height // self.patch, width // self.patch

    def __call__(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        patch, merge, temporal = self.patch, self.merge, self.temporal
        patches, grids = [], []
        for image in images:
            height, width, channels = image.shape
            _, grid_h, grid_w = self.grid(height, width)
            x = image.to(self.device, non_blocking=True).permute(2, 0, 1).float() * self.scale + self.shift
            x = x.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
            x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, P, P): merge windows stay contiguous
            x = x.unsqueeze(5).expand(*x.shape[:5], temporal, patch, patch)
            patches.append(x.reshape(grid_h * grid_w, channels * temporal * patch * patch))
            grids.append((1, grid_h, grid_w))
        return torch.cat(patches), torch.tensor(grids, dtype=torch.long, device=self.device)


def image_prompt_hidden(encoder: Any, images: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states, attention mask) of a Qwen-VL model over one prompt per image, `encoder._before` +
    the image's tokens + `encoder._after`, padded on `side` (ColQwen2.5: left, as colpali-engine; Qwen3-VL-Embedding:
    right, as its processor)."""
    pixel_values, grid_thw = encoder.patchify(images)
    counts = (grid_thw.prod(-1) // encoder.merge_unit).tolist()
    rows = [encoder._before + [encoder.image_token_id] * count + encoder._after for count in counts]
    input_ids, attention_mask = pad_tokens(rows, encoder.pad_id, encoder.device, side=side)
    output = encoder.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        # Marks the image tokens (the processor's mm_token_type_ids), so they get Qwen's 2-D/3-D positions over
        # real tokens only, as the recipes do; without it transformers 5 gives every token a 1-D position.
        mm_token_type_ids=(input_ids == encoder.image_token_id).int(),
        use_cache=False,
    )
    return output.last_hidden_state, attention_mask


def pad_tokens(sequences: list[list[int]], pad_id: int, device: torch.device,
               side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one length; left (the colpali recipe: the last position is every row's last
    token) or right (real tokens keep positions 0..n-1 without position ids)."""
    length = max(len(row) for row in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, row in enumerate(sequences):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, span] = 1
    return input_ids.to(device), attention_mask.to(device)


def load_tokenizer(described: Any) -> Any:
    """The tokenizer of encoder.model, or of an adapter's base when the adapter ships none."""
    from transformers import AutoTokenizer

    own = described.tokenizer_source == described.source
    return AutoTokenizer.from_pretrained(
        described.tokenizer_source, revision=described.revision if own else None,
        local_files_only=described.offline if own else described.weights_options.get("local_files_only", False))


def real_rows(embeddings: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per item, only the rows of real tokens (padded rows are zeros, or NaN under sdpa)."""
    return [rows[mask.bool()] for rows, mask in zip(embeddings, attention_mask)]


class VisionLanguageEncoder:
    """State shared by the encoders built on a vision-language model; families add the forward passes."""

    multivector = True
    normalized = True  # every stored row is L2-normalised (the feature cache is not)
    smoke_test = False  # a tiny random model: runs work, vectors mean nothing
    dim: int

    def __init__(self, model: torch.nn.Module, tokenizer: Any, identity: dict[str, Any], spec: InputSpec,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.identity = identity  # the fingerprint less the dimension (see models.source.ModelSource)
        self.name, self.kind, self.device, self.dtype = identity["model"], identity["kind"], device, dtype
        self._spec = spec

    def input_spec(self) -> InputSpec:
        return self._spec

    def fingerprint(self) -> dict[str, Any]:
        return {**self.identity, "dim": self.dim}
