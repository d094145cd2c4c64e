"""Model FLOPs per image: ViT and Qwen-VL counts against hand computations and MODELS.md's measured figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPConfig, Qwen2_5_VLConfig

from pipeline.config import EncoderConfig, load_config
from pipeline.encode.flops import (
    ImageFlops,
    image_flops,
    language_model_flops,
    linear_flops,
    qwen_vision_flops,
    vit_flops,
)
from pipeline.encode.models.load import load_encoder
from pipeline.runners.local import run_index
from tests.conftest import IMAGES, write_config

# Qwen2.5-VL-3B-Instruct's config.json sizes (the base of ColQwen2.5-3B and Nomic-3B).
QWEN2_5_VL_3B = Qwen2_5_VLConfig(
    vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    text_config={"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936},
)
# colpali-engine's image prompt around the image tokens: <|im_start|> user \n <|vision_start|> before, and
# <|vision_end|> Describe the image . <|im_end|> <|endoftext|> after.
PROMPT_TOKENS = 4 + 7


def test_clip_vit_b16_at_224_is_the_hand_count() -> None:
    config = CLIPConfig(vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                       "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
                        projection_dim=512)
    patches = (224 // 16) ** 2  # 196
    tokens = patches + 1  # + CLS
    macs = (
        patches * (3 * 16 * 16) * 768  # patch embedding: a 16x16x3 -> 768 convolution per patch
        + 12 * (
            tokens * 768 * 3 * 768  # Q, K, V
            + 2 * tokens * tokens * 768  # scores Q K^T and the weighted sum, all 12 heads of 64
            + tokens * 768 * 768  # output projection
            + 2 * tokens * 768 * 3072  # MLP fc1, fc2
        )
        + 768 * 512  # visual_projection of the pooled CLS token
    )
    assert macs == 17_563_453_440  # the "17.6 GFLOPs" quoted for ViT-B/16 are multiply-adds
    flops = vit_flops(config.vision_config, 224, 224, 1, projection_dim=512)
    assert flops == 2 * macs  # 35.1 GFLOP, as MODELS.md measured with FlopCounterMode
    assert flops / 1e9 == pytest.approx(35.1, abs=0.05)


def test_qwen2_5_vl_3b_is_within_10_percent_of_the_measured_figure() -> None:
    """MODELS.md: ColQwen2.5-3B at 768 tokens of 28x28 px ~ 8.3 TFLOP (vision 3.9, LM 4.4), at 1024 ~ 11.3."""
    grid_h, grid_w = 32 * 2, 24 * 2  # 32 x 24 merged tokens = 768, each 2 x 2 patches of 14 px
    vision = qwen_vision_flops(QWEN2_5_VL_3B.vision_config, grid_h, grid_w)
    language = language_model_flops(QWEN2_5_VL_3B.text_config, 768 + PROMPT_TOKENS)
    projection = linear_flops(768 + PROMPT_TOKENS, 2048, 128)  # custom_text_proj
    assert vision / 1e12 == pytest.approx(3.9, rel=0.10)  # 4.16: the 0.22 T of attention scores is most of the gap
    assert language / 1e12 == pytest.approx(4.4, rel=0.10)  # 4.50
    assert (vision + language + projection) / 1e12 == pytest.approx(8.3, rel=0.10)  # 8.66: +4 %
    at_1024 = qwen_vision_flops(QWEN2_5_VL_3B.vision_config, 64, 64) + language_model_flops(
        QWEN2_5_VL_3B.text_config, 1024 + PROMPT_TOKENS)
    assert at_1024 / 1e12 == pytest.approx(11.3, rel=0.10)  # 11.69


def test_windowed_layers_cost_less_than_full_attention() -> None:
    vision = QWEN2_5_VL_3B.vision_config
    full = Qwen2_5_VLConfig(vision_config={**vision.to_dict(), "fullatt_block_indexes": list(range(32))}).vision_config
    assert qwen_vision_flops(vision, 64, 48) < qwen_vision_flops(full, 64, 48)
    # One window (4 x 4 merged tokens = 8 x 8 patches): every layer attends the same span, windowed or not.
    assert qwen_vision_flops(vision, 8, 8) == qwen_vision_flops(full, 8, 8)


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "colqwen2_5", "biqwen2_5", "colqwen2", "qwen_vl",
                                    "qwen3_vl", "qwen3_vl_embedding"])
def test_every_counted_family_has_a_cost(tiny_models: Path, family: str) -> None:
    kind = "qwen_vl_features" if family in ("qwen_vl", "qwen3_vl") else "auto"
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / family), kind=kind, device="cpu"))
    spec = encoder.input_spec()
    side = 4 * spec.factor if spec.dynamic else spec.output_shape[0]
    flops = image_flops(encoder, side, side)
    assert flops is not None and flops > 0
    if spec.dynamic:  # more pixels, more tokens: more FLOPs
        assert image_flops(encoder, 2 * side, side) > flops


def test_an_encoder_it_does_not_know_is_not_counted() -> None:
    class Remote:
        kind = "http"

    assert image_flops(Remote(), 224, 224) is None
    assert ImageFlops(Remote())(224, 224) is None


def test_a_run_reports_its_flops(tmp_path: Path, tiny_models: Path) -> None:
    config = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"), encoder={"device": "cpu"}))
    encoder = load_encoder(config.encoder)
    report = run_index(config, progress=False, encoder=encoder, limit=12).report
    height, width, _ = encoder.input_spec().output_shape
    assert report["images_encoded"] == 12
    assert report["flops_per_image"] == pytest.approx(image_flops(encoder, height, width))
    assert report["flops_per_image"] > 0
    total = report["flops_per_image"] * report["images_encoded"]
    assert report["achieved_tflops"] == pytest.approx(total / report["embed_s"] / 1e12)
    assert report["model_tflops"] == pytest.approx(total / report["stage_s"]["encode"] / 1e12)
    assert report["model_tflops"] >= report["achieved_tflops"]  # the encoder's time is within embed_s
