"""`encoder.kind: qwen_vl_features`: per image, what a Qwen2.5-VL or Qwen3-VL vision tower hands its language model."""

# Stored with `image_grid_thw` (and, for Qwen3-VL, the DeepStack layers' features), so the VLM can answer prompts
# without re-encoding the image.
#
# Only the vision tower's weights are loaded. The rows are features, not search vectors: they are not
# normalised, and there is no text query. README.md ("VLM feature cache") shows how to feed them back.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from pipeline.encode.models.multivector import QwenPatchifier, VisionLanguageEncoder
from pipeline.encode.models.peft_loading import load_pretrained
from pipeline.errors import ModelLoadError
from pipeline.index.schema import DEEPSTACK, deepstack_type

if TYPE_CHECKING:
    from pipeline.encode.models.source import ModelSource

# The vision tower's keys in Qwen2.5-VL / Qwen3-VL checkpoints (visual.*, or model.visual.* as transformers 5
# saves them).
VISION_KEY_MAPPING = {r"^model\.visual\.": "", r"^visual\.": ""}
# config.json model_type -> transformers' vision tower (module under transformers.models, class). The Qwen3-VL
# MoE checkpoints have the dense models' vision tower (only their language model has experts).
VISION_TOWERS = {
    "qwen2_5_vl": ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
    "qwen3_vl_moe": ("qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionModel"),
}


class QwenFeatureEncoder(VisionLanguageEncoder):
    multivector = True  # one row of features per image token
    normalized = False  # the language model needs them exactly as the tower gives them

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        config = self.model.config
        self.patchify = QwenPatchifier(self._spec, config, self.device)
        self.merge_unit = config.spatial_merge_size ** 2
        self.dim = int(config.out_hidden_size)
        # Qwen3-VL: the features of these vision layers are added to the first language-model layers' hidden
        # states at the image tokens (DeepStack); 0 for Qwen2.5-VL.
        self.deepstack_layers = len(getattr(config, "deepstack_visual_indexes", None) or ())

    def tokens_for(self, height: int, width: int) -> int:
        """Image tokens (the language model's sequence length for this image); the tower sees 4x as many patches."""
        _, grid_h, grid_w = self.patchify.grid(height, width)
        return grid_h * grid_w // self.merge_unit

    def extra_columns(self) -> dict[str, pa.DataType]:
        columns = {"image_grid_thw": pa.list_(pa.int32(), 3)}
        if self.deepstack_layers:
            columns[DEEPSTACK] = deepstack_type(self.dim)
        return columns

    def extras_for(self, height: int, width: int) -> dict[str, Any]:
        """From the smart-resized size: (t, h, w) in patches (14 or 16 pixels), as the processor's image_grid_thw."""
        return {"image_grid_thw": list(self.patchify.grid(height, width))}

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image (n, dim) features; with DeepStack (n, (1 + layers) * dim), the layers packed after the
        embedding as index.schema.DEEPSTACK says (the commit splits them into their column)."""
        pixel_values, grid_thw = self.patchify(images)
        output = self.model(pixel_values.to(self.dtype), grid_thw=grid_thw)
        features = output.pooler_output
        if self.deepstack_layers:
            features = torch.cat([features, *output.deepstack_features], dim=-1)
        return list(torch.split(features.float(), (grid_thw.prod(-1) // self.merge_unit).tolist()))

    def encode_texts(self, texts: list[str]) -> Any:
        raise NotImplementedError("qwen_vl_features stores a VLM's image features, not search vectors: "
                                  "there is no text query (use a retrieval model such as ColQwen2.5 to search)")


def vision_tower_class(model_type: str) -> Any:
    """transformers' vision tower class for this model_type; an error naming what is missing where there is none."""
    if model_type not in VISION_TOWERS:
        raise ModelLoadError(f"encoder.kind: qwen_vl_features has no vision tower for model_type {model_type!r} "
                             f"(supported: {', '.join(VISION_TOWERS)})")
    module, name = VISION_TOWERS[model_type]
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}"), name)
    except (ImportError, AttributeError):
        import transformers

        raise ModelLoadError(f"encoder.kind: qwen_vl_features needs transformers' {name} for a {model_type} model; "
                             f"transformers {transformers.__version__} has none: upgrade it") from None


def check_patch_geometry(processor: Any, vision_config: Any, source: str) -> None:
    """The decode workers resize to the image processor's patch * merge, the tower is built for its config's: a
    model whose two disagree would get features the model never computes from its own processor."""
    wanted = {"patch_size": vision_config.patch_size, "merge_size": vision_config.spatial_merge_size,
              "temporal_patch_size": vision_config.temporal_patch_size}
    found = {key: getattr(processor, key, None) for key in wanted}
    if found != wanted:
        differ = ", ".join(f"{key} {found[key]} (the vision tower's: {wanted[key]})" for key in wanted
                           if found[key] != wanted[key])
        raise ModelLoadError(f"encoder.model: the image processor of {source} does not fit its vision tower: "
                             f"{differ}; its preprocessor_config.json needs the tower's values")


def load(described: ModelSource) -> VisionLanguageEncoder:
    from transformers import AutoConfig

    from pipeline.encode.models.varlen import use_varlen_attention

    config = AutoConfig.from_pretrained(described.source, revision=described.revision,
                                        local_files_only=described.offline)
    tower = vision_tower_class(config.model_type)
    check_patch_geometry(described.processor, config.vision_config, described.source)
    model = load_pretrained(tower, described.source, described.adapter, VISION_KEY_MAPPING,
                            config=config.vision_config, dtype=described.dtype, attn_implementation="sdpa",
                            **described.weights_options)
    model.to(described.device)
    use_varlen_attention(model, described.device, described.dtype)
    return QwenFeatureEncoder(model, None, described.identity(), described.spec, described.device, described.dtype)
