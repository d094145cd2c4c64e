"""Write tiny random-initialised models for offline tests and smoke runs."""

from __future__ import annotations

import argparse
import io
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    GemmaTokenizer,
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


FAMILIES: dict[str, Callable[[Path], None]] = {
    "clip": write_clip,
    "siglip": write_siglip,
    "siglip2": write_siglip2,
    "dinov2": write_dinov2,
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
