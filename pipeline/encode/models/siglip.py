"""SigLIP and fixed-resolution SigLIP2: as CLIP, but text is padded to the full length."""

from __future__ import annotations

from pipeline.encode.models.clip import ClipEncoder

SIGLIP_TEXT_LENGTH = 64  # real checkpoints were trained on 64 tokens, padded


class SiglipEncoder(ClipEncoder):
    # SigLIP pools the LAST position of the text, so every query must be padded the same way.
    # The tokenizer decides whether a mask is passed (SigLIP's returns input_ids only).
    text_padding = "max_length"

    def _text_max_length(self) -> int:
        return min(SIGLIP_TEXT_LENGTH, self.model.config.text_config.max_position_embeddings)
