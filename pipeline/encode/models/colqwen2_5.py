"""ColQwen2.5 / ColNomic (a vector per token) and BiQwen2.5 / Nomic (one vector), as colpali-engine does."""

# Both on Qwen2.5-VL: multimodal (2-D) positions for image tokens, left padding, custom_text_proj, L2 per vector.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2_5_VLModel

from pipeline.encode.models.multivector import (
    QwenPatchifier,
    VisionLanguageEncoder,
    image_prompt_hidden,
    load_tokenizer,
    real_rows,
)
from pipeline.encode.models.peft_loading import load_pretrained

if TYPE_CHECKING:
    from pipeline.encode.models.source import ModelSource

# colpali-engine's ColQwen2_5_Processor / BiQwen2_5_Processor prompts.
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
QUERY_SUFFIX = "<|endoftext|>" * 10  # query augmentation tokens; no query prefix
COL_DIM = 128

# Checkpoint keys -> these classes' module names. colpali-engine and Qwen2.5-VL-*-Instruct checkpoints (and
# their adapters) name the language model `model.*` beside `visual.*`; transformers 5 wraps both in `model.`.
KEY_MAPPING = {
    r"^model\.language_model\.": "language_model.",
    r"^model\.visual\.": "visual.",
    r"^model\.(?!language_model\.|visual\.)": "language_model.",
}


class ColQwen2_5Model(Qwen2_5_VLModel):
    """Qwen2.5-VL plus colpali-engine's `custom_text_proj` (hidden size -> 128)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.custom_text_proj = nn.Linear(config.text_config.hidden_size, COL_DIM)
        self.post_init()


class BiQwen2_5Model(Qwen2_5_VLModel):
    """Qwen2.5-VL as BiQwen2.5 uses it (its own class, so that only KEY_MAPPING renames checkpoint keys)."""


class _QwenRetrievalEncoder(VisionLanguageEncoder):
    """The shared forward: smart-resized images -> the colpali image prompt -> last hidden states."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        config = self.model.config
        self.patchify = QwenPatchifier(self._spec, config.vision_config, self.device)
        self.merge_unit = config.vision_config.spatial_merge_size ** 2  # patches per language-model token
        self.image_token_id = config.image_token_id
        self.pad_id = self.tokenizer.pad_token_id
        prompt = self.tokenizer(IMAGE_PROMPT, add_special_tokens=False).input_ids
        at = prompt.index(self.image_token_id)
        # The processor repeats the one <|image_pad|> once per image token: the same ids, without the text.
        self._before, self._after = prompt[:at], prompt[at + 1:]

    def tokens_for(self, height: int, width: int) -> int:
        """Language-model tokens one smart-resized image costs: its image tokens plus the prompt's."""
        _, grid_h, grid_w = self.patchify.grid(height, width)
        return grid_h * grid_w // self.merge_unit + len(self._before) + len(self._after)

    def _image_hidden(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return image_prompt_hidden(self, images, side="left")

    def _text_hidden(self, text: str) -> torch.Tensor:
        """One query at a time: no padding, so a query's vectors never depend on the others."""
        input_ids = self.tokenizer(text + QUERY_SUFFIX, return_tensors="pt").input_ids.to(self.device)
        output = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        return output.last_hidden_state[0]


class ColQwen2_5Encoder(_QwenRetrievalEncoder):
    multivector = True
    dim = COL_DIM

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden, attention_mask = self._image_hidden(images)
        vectors = F.normalize(self.model.custom_text_proj(hidden).float(), dim=-1)
        return real_rows(vectors, attention_mask)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return [F.normalize(self.model.custom_text_proj(self._text_hidden(text)).float(), dim=-1).cpu().numpy()
                for text in texts]


class BiQwen2_5Encoder(_QwenRetrievalEncoder):
    multivector = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dim = int(self.model.config.text_config.hidden_size)

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden, _ = self._image_hidden(images)
        vectors = F.normalize(hidden[:, -1].float(), dim=-1)  # left padding: the last position is every row's end
        return list(vectors[:, None, :])

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([F.normalize(self._text_hidden(text)[-1].float(), dim=-1).cpu().numpy() for text in texts])


def load(described: ModelSource) -> VisionLanguageEncoder:
    from pipeline.encode.models.varlen import use_varlen_attention

    col = described.kind == "colqwen2_5"
    model = load_pretrained(ColQwen2_5Model if col else BiQwen2_5Model, described.source, described.adapter,
                            KEY_MAPPING, dtype=described.dtype, attn_implementation="sdpa",
                            **described.weights_options)
    tokenizer = load_tokenizer(described)
    model.to(described.device)
    use_varlen_attention(model.visual, described.device, described.dtype)
    encoder_class = ColQwen2_5Encoder if col else BiQwen2_5Encoder
    return encoder_class(model, tokenizer, described.identity(), described.spec, described.device, described.dtype)
