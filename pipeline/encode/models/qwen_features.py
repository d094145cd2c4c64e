"""`encoder.kind: qwen_vl_features`: per image, what a Qwen2.5-VL vision tower hands its language model."""

# Stored with `image_grid_thw`, so the VLM can answer prompts without re-encoding the image.
#
# Only the vision tower's weights are loaded. The rows are features, not search vectors: they are not
# normalised, and there is no text query. README.md ("VLM feature cache") shows how to feed them back.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from pipeline.encode.models.multivector import QwenPatchifier, VisionLanguageEncoder
from pipeline.encode.models.peft_loading import load_pretrained

if TYPE_CHECKING:
    from pipeline.encode.models.source import ModelSource

# The vision tower's keys in Qwen2.5-VL checkpoints (visual.*, or model.visual.* as transformers 5 saves them).
VISION_KEY_MAPPING = {r"^model\.visual\.": "", r"^visual\.": ""}


class QwenFeatureEncoder(VisionLanguageEncoder):
    multivector = True  # one row of features per image token
    normalized = False  # the language model needs them exactly as the tower gives them

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        config = self.model.config
        self.patchify = QwenPatchifier(self._spec, config, self.device)
        self.merge_unit = config.spatial_merge_size ** 2
        self.dim = int(config.out_hidden_size)

    def tokens_for(self, height: int, width: int) -> int:
        """Image tokens (the language model's sequence length for this image); the tower sees 4x as many patches."""
        _, grid_h, grid_w = self.patchify.grid(height, width)
        return grid_h * grid_w // self.merge_unit

    def extra_columns(self) -> dict[str, pa.DataType]:
        return {"image_grid_thw": pa.list_(pa.int32(), 3)}

    def extras_for(self, height: int, width: int) -> dict[str, Any]:
        """From the smart-resized size: (t, h, w) in 14-pixel patches, as the processor's image_grid_thw."""
        return {"image_grid_thw": list(self.patchify.grid(height, width))}

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        pixel_values, grid_thw = self.patchify(images)
        features = self.model(pixel_values.to(self.dtype), grid_thw=grid_thw).pooler_output
        return list(torch.split(features.float(), (grid_thw.prod(-1) // self.merge_unit).tolist()))

    def encode_texts(self, texts: list[str]) -> Any:
        raise NotImplementedError("qwen_vl_features stores a VLM's image features, not search vectors: "
                                  "there is no text query (use a retrieval model such as ColQwen2.5 to search)")


def load(described: ModelSource) -> VisionLanguageEncoder:
    from transformers import AutoConfig

    from pipeline.encode.models.varlen import use_varlen_attention

    vision_config = AutoConfig.from_pretrained(described.source, revision=described.revision,
                                               local_files_only=described.offline).vision_config
    model = load_pretrained(Qwen2_5_VisionTransformerPretrainedModel, described.source, described.adapter,
                            VISION_KEY_MAPPING, config=vision_config, dtype=described.dtype,
                            attn_implementation="sdpa", **described.weights_options)
    model.to(described.device)
    use_varlen_attention(model, described.device, described.dtype)
    return QwenFeatureEncoder(model, None, described.identity(), described.spec, described.device, described.dtype)
