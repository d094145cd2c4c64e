"""`encoder.kind: qwen3_vl_embedding`: Qwen3-VL-Embedding's one vector per image or text query, by its recipe."""

# The recipe of QwenLM/Qwen3-VL-Embedding (src/models/qwen3_vl_embedding.py, `Qwen3VLEmbedder.process`):
# - every input is a chat: a system message holding an instruction, a user message holding the image (or the
#   text), rendered by the chat template with the generation prompt, so the prompt ends "<|im_start|>assistant\n";
# - images are resized by qwen_vl_utils before the processor (which then does not resize): aspect kept, sides
#   multiples of 32 (patch 16 x merge 2), 4 x 32^2 <= height * width <= 1800 x 32^2, PIL bicubic;
# - the batch is padded on the right; the embedding is the final hidden state (after the last norm) of each
#   row's last real token, L2-normalised. Matryoshka: its first `encoder.dim` values, normalised again.

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EncoderConfig
from pipeline.decode.spec import InputSpec
from pipeline.encode.models.multivector import (
    QwenPatchifier,
    VisionLanguageEncoder,
    image_prompt_hidden,
    load_tokenizer,
)
from pipeline.errors import ConfigError

KIND = "qwen3_vl_embedding"
# Qwen3VLEmbedder's defaults: its instruction for documents (and any input given none), its context.
DOCUMENT_INSTRUCTION = "Represent the user's input."
MAX_LENGTH = 8192
# The instruction of the repository's text-to-image retrieval example (examples/embedding.ipynb, COCO): a query
# is "a description", the indexed images are documents. (Query vectors are not stored: not in the identity.)
QUERY_INSTRUCTION = "Find images matching this description."
IMAGE_CONTENT = "<|vision_start|><|image_pad|><|vision_end|>"
# Qwen3-VL-Embedding checkpoints carry Sentence Transformers' pipeline (Transformer -> Pooling -> Normalize).
ST_MODULES = "modules.json"
# The language model's weights under Qwen3VLModel's names: checkpoints (Qwen3VLForConditionalGeneration's layout,
# also a LoRA adapter's) prefix them with `model.`; the language-model head (lm_head.*) is not loaded.
KEY_MAPPING = {r"^model\.": ""}


def chat_prompt(instruction: str, user: str) -> str:
    """What Qwen3-VL's chat template renders for [system: instruction, user: content] + the generation prompt."""
    return f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# --- Detection (config.json is a chat model's: model_type qwen3_vl, Qwen3VLForConditionalGeneration) ---------

def _read_json(source: str, filename: str, revision: str | None, offline: bool) -> Any:
    from pipeline.encode.models.hub import model_file

    try:
        path = model_file(source, filename, revision, offline)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except Exception:  # unreadable or unreachable: not detected (encoder.kind can still name the kind)
        return None


def _pools_last_token(pooling: Any) -> bool:
    """Sentence Transformers' Pooling config, in its older (`pooling_mode_lasttoken: true`) or newer
    (`pooling_mode: "lasttoken"`) form."""
    if not isinstance(pooling, dict):
        return False
    return pooling.get("pooling_mode_lasttoken") is True or pooling.get("pooling_mode") == "lasttoken"


def is_embedding_checkpoint(source: str, revision: str | None, offline: bool) -> bool:
    """Whether a qwen3_vl checkpoint is Qwen3-VL-Embedding: Qwen/Qwen3-VL-Embedding-2B and -8B have the chat
    model's config.json (architectures ["Qwen3VLForConditionalGeneration"]); what only the embedding models carry
    is the Sentence Transformers pipeline added to their repositories, modules.json with a Pooling module whose
    config pools the last token (1_Pooling/config.json). An older snapshot without it: set encoder.kind."""
    modules = _read_json(source, ST_MODULES, revision, offline)
    if not isinstance(modules, list):
        return False
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            folder = str(module.get("path") or "").strip("/")
            return _pools_last_token(_read_json(source, f"{folder}/config.json" if folder else "config.json",
                                                revision, offline))
    return False


def requested_kind(requested: str, model_config: Any, source: str, revision: str | None, offline: bool) -> str:
    """encoder.kind, or this kind for an `auto` that finds a Qwen3-VL-Embedding checkpoint."""
    if requested != "auto" or getattr(model_config, "model_type", None) != "qwen3_vl":
        return requested
    return KIND if is_embedding_checkpoint(source, revision, offline) else requested


# --- Configuration: the Matryoshka dimension (the pixel budget: multivector.RECIPE_PIXELS) --------------------

def check_dim_applies(config: EncoderConfig, kind: str) -> None:
    if config.dim is not None and kind != KIND:
        raise ConfigError(f"encoder.dim: applies only to Matryoshka models ({KIND}); {kind} vectors have one size")


def output_dim(requested: int | None, hidden_size: int) -> int:
    """encoder.dim, checked: any size up to the hidden size (the checkpoints list no allowed sizes)."""
    if requested is None:
        return hidden_size
    if not 1 <= requested <= hidden_size:
        raise ConfigError(f"encoder.dim: {requested} is not between 1 and the model's {hidden_size} dimensions")
    return requested


# --- The encoder -----------------------------------------------------------------------------------------------

class Qwen3EmbeddingEncoder(VisionLanguageEncoder):
    """Qwen3VLModel: images in token-sorted groups (one vector each), text queries with the query instruction."""

    multivector = False

    def __init__(self, model: torch.nn.Module, tokenizer: Any, identity: dict[str, Any], spec: InputSpec,
                 device: torch.device, dtype: torch.dtype, dim: int | None = None) -> None:
        super().__init__(model, tokenizer, identity, spec, device, dtype)
        config = self.model.config
        self.patchify = QwenPatchifier(self._spec, config.vision_config, self.device)
        self.merge_unit = config.vision_config.spatial_merge_size ** 2  # patches per language-model token
        self.image_token_id = config.image_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.dim = output_dim(dim, int(config.text_config.hidden_size))
        prompt = self.tokenizer(chat_prompt(DOCUMENT_INSTRUCTION, IMAGE_CONTENT), add_special_tokens=False).input_ids
        at = prompt.index(self.image_token_id)
        # The processor repeats the one <|image_pad|> once per image token: the same ids, without the text.
        self._before, self._after = prompt[:at], prompt[at + 1:]

    def tokens_for(self, height: int, width: int) -> int:
        """Language-model tokens one smart-resized image costs: its image tokens plus the prompt's."""
        _, grid_h, grid_w = self.patchify.grid(height, width)
        return grid_h * grid_w // self.merge_unit + len(self._before) + len(self._after)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right padding: each row's last real token; its first `dim` values, L2-normalised."""
        last = attention_mask.sum(dim=1) - 1
        vectors = hidden[torch.arange(len(hidden), device=hidden.device), last]
        return F.normalize(vectors[:, :self.dim].float(), dim=-1)

    @torch.inference_mode()
    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden, attention_mask = image_prompt_hidden(self, images, side="right")
        return list(self._pool(hidden, attention_mask)[:, None, :])

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Queries as the processor tokenizes them: right padding, cut at the recipe's 8,192 tokens (as there, a
        longer query loses its end; serve.max_text_chars keeps served ones far shorter)."""
        prompts = [chat_prompt(QUERY_INSTRUCTION, text) for text in texts]
        tokens = self.tokenizer(prompts, padding=True, padding_side="right", truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                            use_cache=False).last_hidden_state
        return self._pool(hidden, tokens["attention_mask"]).cpu().numpy()


def load(described: Any) -> VisionLanguageEncoder:
    """The model (a models.source.ModelSource, typed loosely: source.py imports this module to detect the kind)."""
    from transformers import Qwen3VLModel

    from pipeline.encode.models.peft_loading import load_pretrained
    from pipeline.encode.models.varlen import use_varlen_attention

    model = load_pretrained(Qwen3VLModel, described.source, described.adapter, KEY_MAPPING, dtype=described.dtype,
                            attn_implementation="sdpa", **described.weights_options)
    tokenizer = load_tokenizer(described)
    model.to(described.device)
    use_varlen_attention(model.visual, described.device, described.dtype)
    return Qwen3EmbeddingEncoder(model, tokenizer, described.identity(), described.spec, described.device,
                                 described.dtype, described.dim)
