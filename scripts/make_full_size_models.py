"""Write full-size random-initialised models of real architectures, for speed and memory benchmarks.

Random weights cost the same FLOPs and memory as trained ones, so these measure throughput and
peak VRAM exactly as the real checkpoints would (their embeddings are meaningless). The text tower
uses a small byte-level tokenizer; the vocabulary size of the real model is kept, so shapes match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Architectures as in openai/clip-vit-base-patch16 and openai/clip-vit-large-patch14.
CLIP_ARCHITECTURES = {
    "clip-vit-b16": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "projection_dim": 512,
    },
    "clip-vit-l14": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "projection_dim": 768,
    },
}


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def write_clip(name: str, out_dir: Path) -> None:
    arch = CLIP_ARCHITECTURES[name]
    tokenizer = byte_level_clip_tokenizer()
    config = CLIPConfig(
        text_config={**arch["text"], "vocab_size": 49408, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config=arch["vision"],
        projection_dim=arch["projection_dim"],
    )
    size = arch["vision"]["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True, resample=3,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    model = CLIPModel(config)
    model.config.embindex_smoke_test = True  # random weights: runs are labelled, vectors mean nothing
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out_dir)


# Qwen2.5-VL-3B/7B-Instruct (config.json of the hub checkpoints), the bases of nomic-ai's ColNomic and Nomic
# Embed Multimodal: the 3B ties its word embeddings, the 7B does not.
QWEN2_5_VL_ARCHITECTURES = {
    "3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                 "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
        "vision_out": 2048,
    },
    "7b": {
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
        "vision_out": 3584,
    },
}
# Qwen's special tokens at their real ids, so prompts tokenise to the real models' lengths around them.
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                 "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
# nomic-ai's processors: up to 768 tokens of 28x28 pixels per image (Qwen's default minimum of 4).
NOMIC_MIN_PIXELS, NOMIC_MAX_PIXELS = 4 * 28 * 28, 768 * 28 * 28
# name -> (Qwen2.5-VL size, colpali-engine architecture)
RETRIEVAL_MODELS = {"colnomic-3b": ("3b", "ColQwen2_5"), "colnomic-7b": ("7b", "ColQwen2_5"),
                    "nomic-3b": ("3b", "BiQwen2_5"), "nomic-7b": ("7b", "BiQwen2_5")}


def byte_level_qwen_tokenizer() -> Qwen2Tokenizer:
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))} | QWEN_SPECIALS
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIALS])
    return tokenizer


def qwen2_5_vl_config(size: str) -> Qwen2_5_VLConfig:
    arch = QWEN2_5_VL_ARCHITECTURES[size]
    return Qwen2_5_VLConfig(
        text_config={**arch["text"], "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     "bos_token_id": QWEN_SPECIALS["<|endoftext|>"], "eos_token_id": QWEN_SPECIALS["<|im_end|>"],
                     "pad_token_id": QWEN_SPECIALS["<|endoftext|>"]},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "hidden_act": "silu", "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                       "out_hidden_size": arch["vision_out"]},
        image_token_id=QWEN_SPECIALS["<|image_pad|>"], video_token_id=QWEN_SPECIALS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIALS["<|vision_start|>"], vision_end_token_id=QWEN_SPECIALS["<|vision_end|>"],
        tie_word_embeddings=arch["text"]["tie_word_embeddings"],
    )


def write_retrieval_model(name: str, out_dir: Path, device: str) -> None:
    """A merged ColQwen2.5 (ColNomic) or BiQwen2.5 (Nomic) checkpoint, bfloat16, random weights, loadable by
    `encoder.model: out_dir` (its kind is detected from `architectures`)."""
    from pipeline.encode.models.colqwen2_5 import BiQwen2_5Model, ColQwen2_5Model

    size, architecture = RETRIEVAL_MODELS[name]
    config = qwen2_5_vl_config(size)
    model_class = ColQwen2_5Model if architecture == "ColQwen2_5" else BiQwen2_5Model
    with torch.device(device):  # initialising 4-8 billion weights takes minutes on a CPU, seconds on a GPU
        model = model_class._from_config(config, dtype=torch.bfloat16)
    model.config.embindex_smoke_test = True  # random weights: runs are labelled, vectors mean nothing
    model.save_pretrained(out_dir)
    model.config.architectures = [architecture]  # colpali-engine's class name, as its checkpoints say
    model.config.save_pretrained(out_dir)  # (save_pretrained wrote this module's class name)
    Qwen2VLImageProcessorPil(min_pixels=NOMIC_MIN_PIXELS, max_pixels=NOMIC_MAX_PIXELS, patch_size=14,
                             temporal_patch_size=2, merge_size=2, resample=3, image_mean=CLIP_MEAN,
                             image_std=CLIP_STD).save_pretrained(out_dir)
    byte_level_qwen_tokenizer().save_pretrained(out_dir)


# Qwen/Qwen3-VL-Embedding-2B's config.json: a Qwen3-VL-2B backbone (model_type qwen3_vl, architectures
# ["Qwen3VLForConditionalGeneration"]), tied word embeddings, 2048-d vectors (the last token's hidden state).
QWEN3_VL_EMBEDDING_2B = {
    "text": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True}},
    "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
               "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
               "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17], "out_hidden_size": 2048},
}
EMBEDDING_MODELS = {"qwen3-vl-embedding-2b": QWEN3_VL_EMBEDDING_2B}


def write_qwen3_vl(arch: dict, out_dir: Path, device: str) -> None:
    """A Qwen3-VL checkpoint of these sizes, bfloat16, random weights, its image processor (patch 16,
    256x256..4096x4096 pixels, mean = std = 0.5) and a byte-level tokenizer with Qwen's special tokens at their ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={**arch["text"], "bos_token_id": QWEN_SPECIALS["<|endoftext|>"],
                     "eos_token_id": QWEN_SPECIALS["<|im_end|>"], "pad_token_id": QWEN_SPECIALS["<|endoftext|>"]},
        vision_config=arch["vision"], tie_word_embeddings=arch["text"]["tie_word_embeddings"],
        image_token_id=QWEN_SPECIALS["<|image_pad|>"], video_token_id=QWEN_SPECIALS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIALS["<|vision_start|>"], vision_end_token_id=QWEN_SPECIALS["<|vision_end|>"],
    )
    with torch.device(device):  # initialising 2 billion weights takes minutes on a CPU, seconds on a GPU
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.config.embindex_smoke_test = True  # random weights: runs are labelled, vectors mean nothing
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=65536, max_pixels=16777216, patch_size=16, temporal_patch_size=2,
                             merge_size=2, resample=3, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5]).save_pretrained(out_dir)
    byte_level_qwen_tokenizer().save_pretrained(out_dir)


def write_qwen3_vl_embedding(name: str, out_dir: Path, device: str) -> None:
    """Qwen3-VL-Embedding's files (write_qwen3_vl; the pipeline resizes by the embedding recipe's own bounds) and
    the Sentence Transformers modules.json + 1_Pooling/config.json by which `encoder.kind: auto` detects it."""
    import json

    arch = EMBEDDING_MODELS[name]
    write_qwen3_vl(arch, out_dir, device)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"embedding_dimension": arch["text"]["hidden_size"], "pooling_mode": "lasttoken", "include_prompt": True}
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))


# Qwen/Qwen3-VL-2B-Instruct's config.json (the backbone of Qwen3-VL-Embedding-2B, hence the same values): the chat
# model whose vision features `encoder.kind: qwen_vl_features` stores, DeepStack layers 5, 11 and 17 included.
CHAT_MODELS = {"qwen3-vl-2b-instruct": QWEN3_VL_EMBEDDING_2B}


def write_qwen3_vl_chat(name: str, out_dir: Path, device: str) -> None:
    """Qwen3-VL-2B-Instruct's files (write_qwen3_vl): only its vision tower is loaded by qwen_vl_features."""
    write_qwen3_vl(CHAT_MODELS[name], out_dir, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models", default=",".join(CLIP_ARCHITECTURES),
                        help="comma-separated names: "
                             f"{', '.join([*CLIP_ARCHITECTURES, *RETRIEVAL_MODELS, *EMBEDDING_MODELS, *CHAT_MODELS])}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are initialised (Qwen-VL models)")
    args = parser.parse_args()
    for name in args.models.split(","):
        torch.manual_seed(0)
        folder = args.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if name in RETRIEVAL_MODELS:
            write_retrieval_model(name, folder, args.device)
        elif name in EMBEDDING_MODELS:
            write_qwen3_vl_embedding(name, folder, args.device)
        elif name in CHAT_MODELS:
            write_qwen3_vl_chat(name, folder, args.device)
        else:
            write_clip(name, folder)
        print(f"{name}: wrote {folder}")


if __name__ == "__main__":
    main()
