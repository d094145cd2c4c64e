"""ColPali as transformers implements it (ColPaliForRetrieval, e.g. vidore/colpali-v1.3-hf): a vector per token."""

# PaliGemma at one fixed resolution, ColPaliProcessor's prompt, `embedding_proj_layer`, L2 per token.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, ColPaliForRetrieval

from pipeline.decode.spec import input_spec_from_processor
from pipeline.encode.models.multivector import VisionLanguageEncoder, real_rows
from pipeline.encode.models.peft_loading import load_pretrained

if TYPE_CHECKING:
    from pipeline.encode.models.source import ModelSource


class ColPaliEncoder(VisionLanguageEncoder):
    multivector = True

    def __init__(self, model: torch.nn.Module, processor: Any, identity: dict[str, Any], device: torch.device,
                 dtype: torch.dtype) -> None:
        spec = input_spec_from_processor(processor.image_processor)
        super().__init__(model, processor.tokenizer, identity, spec, device, dtype)
        self.processor = processor
        self.dim = int(model.config.embedding_dim)
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self._scale, self._shift = spec.rescale_factor / std, -mean / std
        # Every image gets the same prompt (image tokens, <bos>, "Describe the image.\n"): the processor's
        # own token ids for one blank image, reused for every batch.
        height, width, _ = spec.output_shape
        template = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        self._prompt = {key: template[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids")
                        if key in template}

    def tokens_for(self, height: int, width: int) -> int:
        return int(self._prompt["input_ids"].shape[1])

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        pixels = torch.stack(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        pixel_values = (pixels * self._scale + self._shift).to(self.dtype)
        prompt = {key: value.expand(len(images), -1) for key, value in self._prompt.items()}
        embeddings = self.model(pixel_values=pixel_values, **prompt).embeddings
        return real_rows(F.normalize(embeddings.float(), dim=-1), prompt["attention_mask"])

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        vectors = []
        for text in texts:  # one at a time: no padding
            tokens = self.processor(text=[text], return_tensors="pt").to(self.device)
            embeddings = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                    token_type_ids=tokens.get("token_type_ids")).embeddings
            vectors.append(F.normalize(embeddings[0].float(), dim=-1).cpu().numpy())
        return vectors


def load(described: ModelSource) -> VisionLanguageEncoder:
    model = load_pretrained(ColPaliForRetrieval, described.source, described.adapter, None, dtype=described.dtype,
                            attn_implementation="sdpa", **described.weights_options)
    processor = AutoProcessor.from_pretrained(described.tokenizer_source, revision=described.revision,
                                              local_files_only=described.offline)
    model.to(described.device)
    return ColPaliEncoder(model, processor, described.identity(), described.device, described.dtype)
