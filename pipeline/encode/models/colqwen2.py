"""ColQwen2 as transformers implements it (ColQwen2ForRetrieval, e.g. vidore/colqwen2-v1.0-hf): a vector per token."""

# ColQwen2Processor's prompt, 1-D positions for image tokens, `embedding_proj_layer`, L2 per token.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoProcessor, ColQwen2ForRetrieval

from pipeline.encode.models.multivector import QwenPatchifier, VisionLanguageEncoder, pad_tokens, real_rows
from pipeline.encode.models.peft_loading import load_pretrained

if TYPE_CHECKING:
    from pipeline.encode.models.source import ModelSource


class ColQwen2Encoder(VisionLanguageEncoder):
    multivector = True

    def __init__(self, model: torch.nn.Module, processor: Any, *args: Any) -> None:
        super().__init__(model, processor.tokenizer, *args)
        self.processor = processor  # its text path is the family's query format ("Query: " ... + pads + "\n")
        self.dim = int(model.config.embedding_dim)
        vlm_config = model.config.vlm_config
        self.patchify = QwenPatchifier(self._spec, vlm_config.vision_config, self.device)
        self.merge_unit = vlm_config.vision_config.spatial_merge_size ** 2
        self.image_token_id = processor.image_token_id
        prompt = self.tokenizer(processor.visual_prompt_prefix, add_special_tokens=False).input_ids
        at = prompt.index(self.image_token_id)
        self._before, self._after = prompt[:at], prompt[at + 1:]

    def tokens_for(self, height: int, width: int) -> int:
        _, grid_h, grid_w = self.patchify.grid(height, width)
        return grid_h * grid_w // self.merge_unit + len(self._before) + len(self._after)

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        pixel_values, grid_thw = self.patchify(images)
        patches_per_image = (grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        counts = [n // self.merge_unit for n in patches_per_image]
        rows = [self._before + [self.image_token_id] * count + self._after for count in counts]
        # Right padding: transformers' ColQwen2 numbers positions 0..L-1 whatever the mask, so only with the
        # padding after the real tokens does an image get the vectors it gets alone.
        input_ids, attention_mask = pad_tokens(rows, self.tokenizer.pad_token_id, self.device, side="right")
        padded = pad_sequence(list(torch.split(pixel_values, patches_per_image)), batch_first=True)
        embeddings = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=padded,
                                image_grid_thw=grid_thw).embeddings
        return real_rows(F.normalize(embeddings.float(), dim=-1), attention_mask)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        vectors = []
        for text in texts:  # one at a time: no padding
            tokens = self.processor(text=[text], return_tensors="pt").to(self.device)
            embeddings = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).embeddings
            vectors.append(F.normalize(embeddings[0].float(), dim=-1).cpu().numpy())
        return vectors


def load(described: ModelSource) -> VisionLanguageEncoder:
    from pipeline.encode.models.varlen import use_varlen_attention

    model = load_pretrained(ColQwen2ForRetrieval, described.source, described.adapter, None, dtype=described.dtype,
                            attn_implementation="sdpa", **described.weights_options)
    processor = AutoProcessor.from_pretrained(described.tokenizer_source, revision=described.revision,
                                              local_files_only=described.offline)
    model.to(described.device)
    use_varlen_attention(model.vlm.visual, described.device, described.dtype)
    return ColQwen2Encoder(model, processor, described.identity(), described.spec, described.device,
                           described.dtype)
