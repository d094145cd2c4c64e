"""The VLM feature cache (`encoder.kind: qwen_vl_features`): stored vision features stand in for the pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from pipeline.config import EncoderConfig, load_config
from pipeline.decode.image import decode_file
from pipeline.encode.layout import wrap_encoder
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError, ModelLoadError
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
    assert list(encoder.extra_columns()) == ["image_grid_thw"]  # Qwen2.5-VL has no DeepStack: no such column
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


# --- Qwen3-VL: patch 16 (a language-model token per 32x32 pixels) and DeepStack -------------------------------

def _qwen3_features(model: torch.nn.Module, paths: list[Path]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the chat model computes from its own processor's pixels: per image its features with the DeepStack
    layers' after them (n, (1 + layers) * dim), as the encoder packs them; and image_grid_thw."""
    batch = AutoImageProcessor.from_pretrained(model.name_or_path)(images=[_pil(p) for p in paths],
                                                                   return_tensors="pt")
    with torch.inference_mode():
        output = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    return [torch.cat([features, *(layer[index] for layer in output.deepstack_features)], dim=-1)
            for index, features in enumerate(output.pooler_output)], batch["image_grid_thw"]


def _assert_tower_output(folder: Path, model: torch.nn.Module) -> None:
    encoder = load_encoder(EncoderConfig(model=str(folder), kind="qwen_vl_features", device="cpu"))
    assert (encoder.input_spec().factor, encoder.dim, encoder.deepstack_layers) == (32, 64, 2)
    assert not any(name.startswith(("model.language_model", "lm_head")) for name in encoder.model.state_dict())
    pixels = [torch.from_numpy(decode_file(str(p), encoder.input_spec(), 10**8).pixels.copy()) for p in PHOTOS]
    reference, grids = _qwen3_features(model, PHOTOS)
    for mine, theirs, image, grid in zip(encoder.encode_image_list(pixels), reference, pixels, grids.tolist()):
        assert mine.shape == theirs.shape == (encoder.tokens_for(*image.shape[:2]), 3 * 64)
        assert torch.allclose(mine, theirs, atol=1e-4)
        assert encoder.extras_for(*image.shape[:2]) == {"image_grid_thw": grid}


def test_qwen3_features_and_deepstack_are_the_vision_towers_output(tiny_models: Path) -> None:
    """Pipeline pixels (smart-resized to multiples of 32, patchified on the device) give what the full model's
    get_image_features gives from its own processor: the merger's output and both DeepStack layers'."""
    folder = tiny_models / "qwen3_vl"
    _assert_tower_output(folder, Qwen3VLForConditionalGeneration.from_pretrained(folder).eval())


def test_qwen3_varlen_interface_gives_the_sdpa_features(tiny_models: Path) -> None:
    """The vision tower hands the varlen interface (CUDA's, test_multivector_models) each image's bounds: on CPU
    its per-sequence sdpa fallback must give the same features and DeepStack layers."""
    from pipeline.encode.models.varlen import register, set_vision_attention

    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "qwen3_vl"), kind="qwen_vl_features", device="cpu"))
    pixels = [torch.from_numpy(decode_file(str(p), encoder.input_spec(), 10**8).pixels.copy()) for p in PHOTOS]
    with_sdpa = encoder.encode_image_list(pixels)
    set_vision_attention(encoder.model, register())
    for ours, theirs in zip(encoder.encode_image_list(pixels), with_sdpa):
        assert torch.allclose(ours, theirs, atol=1e-5)


def _moe_checkpoint(dense: Path, out: Path) -> Path:
    """The tiny Qwen3-VL with a mixture-of-experts language model (qwen3_vl_moe): the same vision tower."""
    config = json.loads((dense / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k not in ("model_type", "dtype")}
    vision = {k: v for k, v in config["vision_config"].items() if k not in ("model_type", "dtype")}
    moe = Qwen3VLMoeConfig(text_config={**text, "num_experts": 4, "num_experts_per_tok": 2,
                                        "moe_intermediate_size": 32},
                           vision_config=vision,
                           **{k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                     "vision_end_token_id")})
    torch.manual_seed(1)
    Qwen3VLMoeForConditionalGeneration(moe).save_pretrained(out)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense / name, out / name)
    return out


def test_qwen3_vl_moe_has_the_same_features(tmp_path: Path, tiny_models: Path) -> None:
    folder = _moe_checkpoint(tiny_models / "qwen3_vl", tmp_path / "moe")
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    assert model.config.model_type == "qwen3_vl_moe"
    _assert_tower_output(folder, model)


def _generate(model: torch.nn.Module, tokenizer: object, grid_thw: torch.Tensor, **image: object) -> list[int]:
    n_tokens = int(grid_thw.prod()) // 4
    tokens = tokenizer(_prompt(n_tokens), return_tensors="pt")  # type: ignore[operator]
    out = model.generate(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         mm_token_type_ids=(tokens["input_ids"] == model.config.image_token_id).int(),
                         image_grid_thw=grid_thw, max_new_tokens=12, do_sample=False, **image)
    assert out.shape[1] > tokens["input_ids"].shape[1]  # it did generate
    return out[0].tolist()


def _index(tmp_path: Path, folder: Path, photos: list[Path]) -> dict:
    root = tmp_path / "photos"
    root.mkdir(exist_ok=True)
    for path in photos:
        shutil.copy(path, root / path.name)
    config = load_config(write_config(tmp_path, str(root), str(folder), encoder={"kind": "qwen_vl_features"}),
                         ["encoder.device=cpu"])
    result = run_index(config, progress=False)
    assert result.exit_code == 0
    return result.report


def _rows(tmp_path: Path) -> tuple[pa.Table, pa.Table]:
    """The `images` rows from LanceDB and from the Parquet parts, in path order."""
    lance = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow().sort_by("path")
    parquet = pq.read_table(tmp_path / "embeddings" / "images").sort_by("path")
    return lance, parquet


def test_qwen3_generation_from_a_stored_row_needs_its_deepstack_features(tmp_path: Path, tiny_models: Path) -> None:
    """`embindex run`, then each row read back from LanceDB: its features, DeepStack layers and image_grid_thw
    fed to generate give the tokens that generating from the image gives; the merger's output alone does not."""
    folder = tiny_models / "qwen3_vl"
    _index(tmp_path, folder, PHOTOS)
    lance, parquet = _rows(tmp_path)
    assert lance.schema.field("deepstack").type == pa.list_(pa.list_(pa.list_(pa.float16(), 64)))
    for column in ("path", "embedding", "n_vectors", "image_grid_thw", "deepstack"):
        assert lance[column].combine_chunks().equals(parquet[column].combine_chunks()), column  # both sinks alike

    model = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    for row in lance.to_pylist():
        features = torch.tensor(np.asarray(row["embedding"], dtype=np.float32))
        deepstack = [torch.tensor(np.asarray(layer, dtype=np.float32)) for layer in row["deepstack"]]
        grid_thw = torch.tensor([row["image_grid_thw"]])
        assert len(features) == row["n_vectors"] == int(grid_thw.prod()) // 4
        assert [layer.shape for layer in deepstack] == [features.shape] * 2
        cached = BaseModelOutputWithDeepstackFeatures(pooler_output=(features,),
                                                       deepstack_features=[(layer,) for layer in deepstack])
        from_row = _generate(model, tokenizer, grid_thw, mm_encoder_outputs={"image": cached})
        batch = processor(images=[_pil(tmp_path / "photos" / row["path"])], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == grid_thw.tolist()
        from_pixels = _generate(model, tokenizer, grid_thw, pixel_values=batch["pixel_values"])
        assert from_row == from_pixels
        # The control: a cache of the merger's output alone (what Qwen2.5-VL needs) answers otherwise.
        merger_only = BaseModelOutputWithDeepstackFeatures(pooler_output=(features,), deepstack_features=[])
        assert _generate(model, tokenizer, grid_thw, mm_encoder_outputs={"image": merger_only}) != from_pixels


def test_qwen3_rows_of_identical_bytes_are_reused_with_their_deepstack(tmp_path: Path, tiny_models: Path) -> None:
    """A copy of an indexed photo (reused from the index) and two copies of a new one (one encoded, its twin
    reused in the run) get rows equal to the original's, DeepStack layers included."""
    folder = tiny_models / "qwen3_vl"
    _index(tmp_path, folder, PHOTOS[:2])
    copies = tmp_path / "copies"
    copies.mkdir()
    for name, source in (("copy_of_0.jpg", PHOTOS[0]), ("twin_a.jpg", PHOTOS[2]), ("twin_b.jpg", PHOTOS[2])):
        shutil.copy(source, copies / name)
    report = _index(tmp_path, folder, list(copies.iterdir()))
    assert (report["images_encoded"], report["images_reused"]) == (1, 2)
    for table in _rows(tmp_path):
        rows = {row["path"]: row for row in table.to_pylist()}
        for copy, original in (("copy_of_0.jpg", PHOTOS[0].name), ("twin_b.jpg", "twin_a.jpg")):
            for column in ("embedding", "image_grid_thw", "deepstack"):
                assert rows[copy][column] == rows[original][column], (copy, column)


def test_qwen3_chat_models_and_what_cannot_be_cached_exactly_are_refused(tmp_path: Path, tiny_models: Path) -> None:
    folder = tiny_models / "qwen3_vl"
    with pytest.raises(ConfigError, match="a qwen3_vl model .* set encoder.kind to qwen_vl_features"):
        describe_model(EncoderConfig(model=str(folder), device="cpu"))
    # A checkpoint with a video processor only: the pixel budget and patch size of still images are unknown.
    video_only = tmp_path / "video_only"
    shutil.copytree(folder, video_only)
    settings = json.loads((video_only / "preprocessor_config.json").read_text())
    settings["video_processor_type"] = "Qwen3VLVideoProcessor"
    (video_only / "video_preprocessor_config.json").write_text(json.dumps(settings))
    (video_only / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no image processor \(preprocessor_config.json\)"):
        describe_model(EncoderConfig(model=str(video_only), kind="qwen_vl_features", device="cpu"))
    # An image processor that does not fit the tower (Qwen2.5-VL's patch 14 on a patch-16 tower).
    misfit = tmp_path / "misfit"
    shutil.copytree(folder, misfit)
    (misfit / "preprocessor_config.json").write_text(json.dumps({**settings, "patch_size": 14}))
    with pytest.raises(ModelLoadError, match=r"patch_size 14 \(the vision tower's: 16\)"):
        load_encoder(EncoderConfig(model=str(misfit), kind="qwen_vl_features", device="cpu"))
    # Token pooling would hand the language model other features than the tower's.
    config = EncoderConfig(model=str(folder), kind="qwen_vl_features", device="cpu", pool_factor=2)
    with pytest.raises(ConfigError, match="encoder.pool_factor: qwen_vl_features"):
        wrap_encoder(load_encoder(config), config)
