"""CLIP: projected pooled image and text features."""

from __future__ import annotations

import torch

from pipeline.encode.models.base import HFSingleVectorEncoder

CLIP_CONTEXT = 77  # CLIP's text position embeddings


class ClipEncoder(HFSingleVectorEncoder):
    text_padding: str | bool = True

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def _text_max_length(self) -> int:
        return min(CLIP_CONTEXT, self.model.config.text_config.max_position_embeddings)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=self.text_padding, truncation=True, max_length=self._text_max_length(),
            return_tensors="pt",
        ).to(self.device)
        return self.model.get_text_features(**tokens).pooler_output
