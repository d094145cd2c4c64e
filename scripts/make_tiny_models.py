"""Write tiny random-initialised models for offline tests and smoke runs."""

from __future__ import annotations

import argparse
import io
import json
import re
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ColPaliConfig,
    ColPaliForRetrieval,
    ColPaliProcessor,
    ColQwen2Config,
    ColQwen2ForRetrieval,
    ColQwen2Processor,
    Dinov2Config,
    Dinov2Model,
    GemmaTokenizer,
    PaliGemmaConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
)
from transformers.utils import logging as hf_logging

SEED = 0
IMAGE_SIZE = 32
PATCH_SIZE = 8
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as stored in the hub preprocessor configs

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# One size for every tower: a real multi-layer, multi-head transformer, yet each
# folder stays well under 1.5 MB.
TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
VISION = {**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}

# Lower-case text without punctuation: SiglipTokenizer lower-cases and drops punctuation
# before SentencePiece sees the text, so that is all the pieces need to cover.
SPM_CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "a picture of two cats sleeping on a sofa",
    "an image of a red car parked on the street",
    "a blurry photo of a bird in the sky",
    "the quick brown fox jumps over the lazy dog",
    "a close up photo of a green apple",
    "a black and white picture of a horse",
    "people walking in a park with trees",
    "a plate of food with vegetables and rice",
    "a small boat on a lake at sunset",
    "a zebra and a giraffe in the wild",
    "view of mountains covered in snow",
    "a kitchen with white cabinets and a window",
    "jumping quickly over boxes and yellow wax",
    "numbers one two three four five six seven eight nine zero",
]


def save_model(model: torch.nn.Module, out_dir: Path) -> None:
    """Save float32 weights (transformers 5 always writes model.safetensors)."""
    model.to(torch.float32).eval()
    # embindex reads this marker to label every run with such a model a smoke test.
    model.config.embindex_smoke_test = True
    model.save_pretrained(out_dir)


def siglip_image_processor() -> SiglipImageProcessorPil:
    """Fixed-resolution SigLIP preprocessing: squash to a square, map to [-1, 1]."""
    # The *Pil classes need no torchvision and still save as "SiglipImageProcessor".
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every word is spelt out one byte at a time."""
    alphabet = sorted(ByteLevel.alphabet())
    # Layout of openai/clip-*: 256 bytes, the same bytes as word ends, specials last.
    tokens = (
        alphabet
        + [f"{char}</w>" for char in alphabet]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def write_clip(out_dir: Path) -> None:
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            **TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            # CLIP pools the text at the first eos id: these must match the tokenizer.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            # Read by CLIPTextModelWithProjection; CLIPModel reads the top-level value.
            "projection_dim": 32,
        },
        vision_config={**VISION, "projection_dim": 32},
        projection_dim=32,
    )
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    save_model(CLIPModel(config), out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        out_dir
    )


def train_sentencepiece() -> bytes:
    """Train a 64-piece unigram model in memory with the SigLIP special-token ids."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=64,
        # google/siglip-*: <pad>=0, </s>=1, <unk>=2 and no BOS.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # one thread keeps the trained pieces identical run to run
        minloglevel=2,  # silence the trainer's progress log
    )
    return buffer.getvalue()


def write_siglip(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # SiglipTokenizer takes only a path; save_pretrained copies the file to out_dir.
        spm_path = Path(tmp) / "spiece.model"
        spm_path.write_bytes(train_sentencepiece())
        tokenizer = SiglipTokenizer(vocab_file=str(spm_path), model_max_length=64)
        config = SiglipConfig(
            text_config={
                **TOWER,
                "vocab_size": tokenizer.vocab_size,
                "max_position_embeddings": 64,
                # The class defaults (CLIP's 49406/49407) are outside this vocabulary.
                "bos_token_id": None,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config=VISION,
        )
        save_model(SiglipModel(config), out_dir)
        SiglipProcessor(
            image_processor=siglip_image_processor(), tokenizer=tokenizer
        ).save_pretrained(out_dir)


def gemma_tokenizer() -> GemmaTokenizer:
    """Character-level Gemma tokenizer: specials, byte pieces, printable ASCII."""
    # Ids 0-4 as in the Gemma vocabulary.
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    # Byte-fallback pieces: a character not in the vocabulary becomes its UTF-8 bytes.
    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    # "▁" is the space (the normalizer rewrites " " to it), then visible ASCII.
    chars = ["▁", *(char for char in string.printable if not char.isspace())]
    vocab = {token: index for index, token in enumerate(specials + byte_pieces + chars)}
    # As the google/siglip2-*-patch16-224 tokenizer: EOS appended, no BOS, and padding
    # on the right like big_vision's (the text tower pools the last position).
    return GemmaTokenizer(
        vocab=vocab,
        merges=[],
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_max_length=64,
    )


def write_siglip2(out_dir: Path) -> None:
    """Fixed-resolution SigLIP2: the SigLIP architecture with a Gemma tokenizer."""
    tokenizer = gemma_tokenizer()
    config = SiglipConfig(
        text_config={
            **TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=VISION,
    )
    save_model(SiglipModel(config), out_dir)
    SiglipProcessor(
        image_processor=siglip_image_processor(), tokenizer=tokenizer
    ).save_pretrained(out_dir)


def write_dinov2(out_dir: Path) -> None:
    """Vision only; facebook/dinov2-* preprocessing (resize 256, crop 224) at 36/32."""
    config = Dinov2Config(**VISION)
    image_processor = BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 36},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    save_model(Dinov2Model(config), out_dir)
    image_processor.save_pretrained(out_dir)


# --- Vision-language families (Qwen2-VL / Qwen2.5-VL backbones, PaliGemma) ---------------------------------

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # mrope_section (temporal, height, width) must sum to head_dim / 2 = 8.
    # A low rope_theta (real: 1e6) makes positions matter in so small a model: tests see a 1-D vs 2-D mix-up.
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 3, 3]},
}
# The smart-resize budget of the tiny processors, in 28x28-pixel tokens: small enough that a CPU test
# embeds 400 photos in seconds, large enough that real photos get grids of many shapes.
QWEN_MIN_TOKENS, QWEN_MAX_TOKENS = 4, 64
CLIP_MEAN_STD = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}  # Qwen-VL normalises with CLIP's statistics
COL_DIM = 128
# The colpali-engine / nomic adapters' LoRA targets: every language-model projection.
LORA_TARGETS = r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$)"
LORA_RANK, LORA_ALPHA = 4, 8


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE without merges plus Qwen's chat and vision markers, each one token."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(alphabet + QWEN_SPECIALS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIALS])
    return tokenizer


def qwen_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_TOKENS * 28 * 28, max_pixels=QWEN_MAX_TOKENS * 28 * 28,
                                    patch_size=14, temporal_patch_size=2, merge_size=2, resample=BICUBIC,
                                    **CLIP_MEAN_STD)


def qwen_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def qwen2_5_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's architecture at toy size: windowed vision blocks with one full-attention block."""
    return Qwen2_5_VLConfig(
        text_config={**QWEN_TEXT, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [1], "out_hidden_size": QWEN_TEXT["hidden_size"]},
        **qwen_token_ids(tokenizer),
    )


def save_qwen_inputs(out_dir: Path, tokenizer: Any) -> None:
    """The image processor and tokenizer files (Qwen2_5_VLProcessor itself needs torchvision for videos)."""
    qwen_image_processor().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def write_qwen_vl(out_dir: Path) -> None:
    """A Qwen2.5-VL chat model (for `kind: qwen_vl_features`, and the base of the adapters below)."""
    tokenizer = qwen_tokenizer()
    save_model(Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer)), out_dir)
    save_qwen_inputs(out_dir, tokenizer)


def colpali_engine_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names (model.language_model.*, model.visual.*) -> the names in colpali-engine and
    Qwen2.5-VL-Instruct checkpoints (model.*, visual.*), which the loader must map back."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue  # the retrieval models have no language-model head
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        renamed[key] = value.contiguous()
    return renamed


def write_colqwen2_5(out_dir: Path) -> None:
    """A merged ColQwen2.5 checkpoint as colpali-engine saves one (architectures ["ColQwen2_5"])."""
    tokenizer = qwen_tokenizer()
    config = qwen2_5_vl_config(tokenizer)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    state = colpali_engine_layout(model.state_dict())
    state["custom_text_proj.weight"] = torch.randn(COL_DIM, QWEN_TEXT["hidden_size"]) * 0.02
    state["custom_text_proj.bias"] = torch.randn(COL_DIM) * 0.02
    config.architectures = ["ColQwen2_5"]
    config.embindex_smoke_test = True
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    save_qwen_inputs(out_dir, tokenizer)


def write_lora_adapter(out_dir: Path, base_dir: Path, whole: dict[str, torch.Tensor]) -> None:
    """A PEFT LoRA adapter on `base_dir`, as colpali-engine trains nomic's: rank-4 updates of every language-model
    projection, in colpali-engine key names, plus modules saved whole (`whole`). Written directly (safetensors +
    adapter_config.json), so no PEFT is needed to make it."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir)
    state = {f"base_model.model.{key}": value for key, value in whole.items()}
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, f"model.{name}"):
            prefix = f"base_model.model.model.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, module.in_features) * 0.05
            # Non-zero (a fresh adapter's B is zero): the merge must visibly change every target.
            state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK) * 0.05
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "base_model_name_or_path": str(base_dir.resolve()),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.1, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": "gaussian", "inference_mode": True, "target_modules": LORA_TARGETS,
        "modules_to_save": sorted({key.rsplit(".", 1)[0] for key in whole}) or None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_qwen_inputs(out_dir, qwen_tokenizer())


def write_colqwen2_5_adapter(out_dir: Path) -> None:
    """ColNomic's shape: an adapter on a Qwen2.5-VL chat model (../qwen_vl) that also holds custom_text_proj."""
    whole = {"custom_text_proj.weight": torch.randn(COL_DIM, QWEN_TEXT["hidden_size"]) * 0.02,
             "custom_text_proj.bias": torch.randn(COL_DIM) * 0.02}
    write_lora_adapter(out_dir, out_dir.parent / "qwen_vl", whole)


def write_biqwen2_5(out_dir: Path) -> None:
    """Nomic Embed Multimodal's shape: a LoRA adapter on a Qwen2.5-VL chat model (../qwen_vl), no projection."""
    write_lora_adapter(out_dir, out_dir.parent / "qwen_vl", {})


def write_colqwen2(out_dir: Path) -> None:
    """transformers' ColQwen2ForRetrieval on a Qwen2-VL backbone, with its own processor."""
    tokenizer = qwen_tokenizer()
    vlm_config = Qwen2VLConfig(
        text_config={**QWEN_TEXT, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": QWEN_TEXT["hidden_size"], "mlp_ratio": 2,
                       "num_heads": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        **qwen_token_ids(tokenizer),
    )
    save_model(ColQwen2ForRetrieval(ColQwen2Config(vlm_config=vlm_config, embedding_dim=COL_DIM)), out_dir)
    tokenizer.padding_side = "left"  # as vidore/colqwen2-v1.0-hf
    ColQwen2Processor(image_processor=qwen_image_processor(), tokenizer=tokenizer).save_pretrained(out_dir)


def write_colpali(out_dir: Path) -> None:
    """transformers' ColPaliForRetrieval (PaliGemma: SigLIP vision + Gemma text) with its own processor."""
    tokenizer = gemma_tokenizer()
    image_processor = siglip_image_processor()
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2  # read by ColPaliProcessor
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image>, <locNNNN>
    hidden = QWEN_TEXT["hidden_size"]
    vlm_config = PaliGemmaConfig(
        vision_config={**VISION, "projection_dim": hidden},
        text_config={"hidden_size": hidden, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 256,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        image_token_index=processor.image_token_id,
        projection_dim=hidden,
        hidden_size=hidden,
        vocab_size=len(tokenizer),
    )
    save_model(ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm_config, embedding_dim=COL_DIM)), out_dir)
    processor.save_pretrained(out_dir)


# --- Qwen3-VL-Embedding (a Qwen3-VL backbone, patch 16: one language-model token per 32x32 pixels) -----------

# What Qwen3-VL's chat template renders for the messages an embedding recipe builds (system text; user images,
# videos and text; the generation prompt), written here for the tiny tokenizer.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The Sentence Transformers pipeline of Qwen/Qwen3-VL-Embedding-*: what tells it from the Qwen3-VL chat model.
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def qwen3_embedding_config(tokenizer: Qwen2Tokenizer) -> Any:
    """Qwen3-VL-Embedding-2B's architecture at toy size: interleaved M-RoPE, learned vision positions (an 8x8
    grid, resampled per image), DeepStack features into both language-model layers, tied word embeddings."""
    from transformers import Qwen3VLConfig

    rope = {**QWEN_TEXT["rope_parameters"], "mrope_interleaved": True}
    return Qwen3VLConfig(
        text_config={**QWEN_TEXT, "head_dim": 16, "rope_parameters": rope, "vocab_size": len(tokenizer),
                     "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": [0, 1], "out_hidden_size": QWEN_TEXT["hidden_size"]},
        tie_word_embeddings=True,
        **qwen_token_ids(tokenizer),
    )


def write_qwen3_vl_embedding(out_dir: Path) -> None:
    """Qwen3-VL-Embedding's files: a Qwen3VLForConditionalGeneration checkpoint (as the hub's config.json says),
    Qwen3-VL's image processor (patch 16, mean = std = 0.5), a chat template, and the Sentence Transformers
    modules.json + 1_Pooling/config.json (last-token pooling) by which the kind is detected."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    save_model(Qwen3VLForConditionalGeneration(qwen3_embedding_config(tokenizer)), out_dir)
    Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_TOKENS * 32 * 32, max_pixels=QWEN_MAX_TOKENS * 32 * 32,
                             patch_size=16, temporal_patch_size=2, merge_size=2, resample=BICUBIC,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(out_dir)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    (out_dir / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"embedding_dimension": QWEN_TEXT["hidden_size"], "pooling_mode": "lasttoken", "include_prompt": True}
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))


def qwen3_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's preprocessing (its preprocessor_config.json: patch 16, mean = std = 0.5) in the tiny token budget."""
    return Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_TOKENS * 32 * 32, max_pixels=QWEN_MAX_TOKENS * 32 * 32,
                                    patch_size=16, temporal_patch_size=2, merge_size=2, resample=BICUBIC,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_qwen3_vl(out_dir: Path) -> None:
    """A Qwen3-VL chat model (for `kind: qwen_vl_features`): the architecture of qwen3_embedding_config (DeepStack
    from both vision blocks), its image processor and tokenizer files. Its word embeddings are untied, as
    Qwen3-VL-8B's: tied at toy size, greedy generation repeats the prompt's last token whatever the image."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    config = qwen3_embedding_config(tokenizer)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    save_model(Qwen3VLForConditionalGeneration(config), out_dir)
    qwen3_image_processor().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


FAMILIES: dict[str, Callable[[Path], None]] = {
    "clip": write_clip,
    "siglip": write_siglip,
    "siglip2": write_siglip2,
    "dinov2": write_dinov2,
    # qwen_vl first: the adapters name it as their base.
    "qwen_vl": write_qwen_vl,
    "colqwen2_5": write_colqwen2_5,
    "colqwen2_5_adapter": write_colqwen2_5_adapter,
    "biqwen2_5": write_biqwen2_5,
    "colqwen2": write_colqwen2,
    "colpali": write_colpali,
    "qwen3_vl_embedding": write_qwen3_vl_embedding,
    "qwen3_vl": write_qwen3_vl,
}


def folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "out_dir", type=Path, help="folder that receives one sub-folder per family"
    )
    args = parser.parse_args(argv)
    # A "Writing model shards" progress bar per 200 KB file is only noise.
    hf_logging.disable_progress_bar()

    for name, write in FAMILIES.items():
        out_dir = args.out_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        # Re-seed per family: each model is the same whatever was written before it.
        torch.manual_seed(SEED)
        write(out_dir)
        print(f"{name}: wrote {out_dir} ({folder_size(out_dir) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
