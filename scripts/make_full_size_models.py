"""Write full-size random-initialised models of real architectures, for speed and memory benchmarks.

Random weights cost the same FLOPs and memory as trained ones, so these measure throughput and
peak VRAM exactly as the real checkpoints would (their embeddings are meaningless). The text tower
uses a small byte-level tokenizer; the vocabulary size of the real model is kept, so shapes match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models", default=",".join(CLIP_ARCHITECTURES), help="comma-separated names")
    args = parser.parse_args()
    for name in args.models.split(","):
        torch.manual_seed(0)
        folder = args.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        write_clip(name, folder)
        print(f"{name}: wrote {folder}")


if __name__ == "__main__":
    main()
