"""The VLM feature cache (`encoder.kind: qwen_vl_features`): stored vision features stand in for the pixels."""

from __future__ import annotations

import shutil
from pathlib import Path

import lancedb
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pipeline.config import EncoderConfig, load_config
from pipeline.decode.image import decode_file
from pipeline.encode.models.load import load_encoder
from pipeline.runners.local import run_index
from tests.conftest import IMAGES, write_config

PHOTOS = [IMAGES / name for name in sorted(p.name for p in IMAGES.iterdir())[:30:10]]
QUESTION = "What is in the image?"


def _pil(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _prompt(n_image_tokens: int) -> str:
    """Qwen2.5-VL's chat format for one image and a question (what its chat template writes)."""
    return (f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * n_image_tokens}<|vision_end|>{QUESTION}"
            "<|im_end|>\n<|im_start|>assistant\n")


def test_features_are_the_vision_towers_output(tiny_models: Path) -> None:
    """Pipeline pixels (smart-resized by the decode workers, patchified on the device) give the image
    embeddings the full model computes from its own processor's pixel_values."""
    folder = tiny_models / "qwen_vl"
    encoder = load_encoder(EncoderConfig(model=str(folder), kind="qwen_vl_features", device="cpu"))
    assert encoder.multivector and not encoder.normalized and encoder.dim == 64
    pixels = [torch.from_numpy(decode_file(str(p), encoder.input_spec(), 10**8).pixels.copy()) for p in PHOTOS]
    ours = encoder.encode_image_list(pixels)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    batch = AutoImageProcessor.from_pretrained(folder)(images=[_pil(p) for p in PHOTOS], return_tensors="pt")
    with torch.inference_mode():
        reference = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    for mine, theirs, image, grid in zip(ours, reference, pixels, batch["image_grid_thw"].tolist()):
        assert mine.shape == theirs.shape == (encoder.tokens_for(*image.shape[:2]), 64)
        assert torch.allclose(mine, theirs, atol=1e-4)
        assert encoder.extras_for(*image.shape[:2]) == {"image_grid_thw": grid}
    with pytest.raises(NotImplementedError, match="no text query"):
        encoder.encode_texts(["a cat"])


def test_generation_from_stored_features_equals_generation_from_pixels(tmp_path: Path, tiny_models: Path) -> None:
    """Index photos with `embindex run`, read each row's features and image_grid_thw back from LanceDB,
    and generate greedily: the same tokens as generating from the image itself."""
    folder = tiny_models / "qwen_vl"
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in PHOTOS:
        shutil.copy(path, photos / path.name)
    config = load_config(write_config(tmp_path, str(photos), str(folder), encoder={"kind": "qwen_vl_features"}),
                         ["output.parquet=null", "encoder.device=cpu"])
    assert run_index(config, progress=False).exit_code == 0
    rows = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow().to_pylist()
    assert len(rows) == len(PHOTOS)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_token = model.config.image_token_id
    for row in rows:
        # What a VLM application does with a stored row: features (n, hidden) + image_grid_thw (t, h, w).
        features = torch.tensor(np.asarray(row["embedding"], dtype=np.float32))
        grid_thw = torch.tensor([row["image_grid_thw"]])
        assert len(features) == row["n_vectors"] == int(grid_thw.prod()) // 4
        tokens = tokenizer(_prompt(len(features)), return_tensors="pt")
        common = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                  "mm_token_type_ids": (tokens["input_ids"] == image_token).int(), "max_new_tokens": 12,
                  "do_sample": False}
        from_features = model.generate(
            **common, image_grid_thw=grid_thw,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(features,))})
        batch = processor(images=[_pil(photos / row["path"])], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == grid_thw.tolist()
        from_pixels = model.generate(**common, pixel_values=batch["pixel_values"],
                                     image_grid_thw=batch["image_grid_thw"])
        assert from_features.shape[1] > tokens["input_ids"].shape[1]  # it did generate
        assert from_features.tolist() == from_pixels.tolist()
        # The control: the same features in another order (another image, as far as the model knows) do
        # change the answer, so the equality above is the features' doing.
        shuffled = model.generate(
            **common, image_grid_thw=grid_thw,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(features.flip(0),))})
        assert shuffled.tolist() != from_pixels.tolist()
