"""Encoders: family detection, loading errors, and preprocessing parity with each model's own HF processor."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from pipeline.config import EncoderConfig, load_config
from pipeline.encode.models.load import load_encoder
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.runners.local import run_index
from tests.conftest import IMAGES, write_config

FAMILIES = ["clip", "siglip", "siglip2", "dinov2"]


def _reference_vectors(folder: Path, family: str, paths: list[str]) -> np.ndarray:
    """The model's own Hugging Face image processor + model, fp32 on CPU."""
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    vectors = []
    for start in range(0, len(paths), 100):
        images = [ImageOps.exif_transpose(Image.open(IMAGES / p)).convert("RGB") for p in paths[start:start + 100]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            if family == "dinov2":
                features = model(pixel_values=pixel_values).pooler_output
            else:
                features = model.get_image_features(pixel_values=pixel_values).pooler_output
        vectors.append(torch.nn.functional.normalize(features, dim=-1).numpy())
    return np.concatenate(vectors)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_matches_reference_on_real_images(tmp_path: Path, tiny_models: Path, family: str) -> None:
    """Index the 400 real photos with the pipeline; every vector matches the reference path."""
    config = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / family)),
                         ["output.parquet=null", "encoder.device=cpu"])
    result = run_index(config, progress=False)
    assert result.exit_code == 0
    table = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow()
    assert table.num_rows == 400
    paths = table["path"].to_pylist()
    ours = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    reference = _reference_vectors(tiny_models / family, family, paths)
    cosine = np.sum(ours * reference, axis=1)
    assert cosine.min() >= 0.999, f"{family}: worst cosine {cosine.min():.5f} at {paths[int(cosine.argmin())]}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_text_vectors_match_reference(tiny_models: Path, family: str) -> None:
    folder = tiny_models / family
    encoder = load_encoder(EncoderConfig(model=str(folder), device="cpu"))
    texts = ["a photo of a dog", "a red car on a street"]
    ours = encoder.encode_texts(texts)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    padding = "max_length" if family.startswith("siglip") else True
    tokens = tokenizer(texts, padding=padding, truncation=True, max_length=64 if padding == "max_length" else 77,
                       return_tensors="pt")
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).numpy()
    assert ours.shape == (2, encoder.dim)
    assert np.allclose(ours, reference, atol=1e-5)


def test_dinov2_has_no_text_tower(tiny_models: Path) -> None:
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "dinov2"), device="cpu"))
    with pytest.raises(NotImplementedError, match="no text tower"):
        encoder.encode_texts(["a cat"])


@pytest.mark.parametrize("family", FAMILIES)
def test_kind_is_detected_and_fingerprint_is_stable(tiny_models: Path, family: str) -> None:
    first = load_encoder(EncoderConfig(model=str(tiny_models / family), device="cpu"))
    second = load_encoder(EncoderConfig(model=str(tiny_models / family), device="cpu"))
    assert first.kind == ("siglip" if family == "siglip2" else family)
    assert first.dim == 32 and first.multivector is False
    assert first.fingerprint() == second.fingerprint()
    assert first.smoke_test is True


def test_dtype_and_device_auto_on_cpu(tiny_models: Path) -> None:
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "clip")))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert encoder.device.type in (expected, "mps")
    if encoder.device.type == "cpu":
        assert encoder.dtype == torch.float32


def test_forced_kind_overrides_detection(tiny_models: Path) -> None:
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / "siglip2"), kind="siglip2", device="cpu"))
    assert encoder.kind == "siglip2"


def test_unknown_model_type_is_a_config_error(tmp_path: Path, tiny_models: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="encoder.kind"):
        load_encoder(EncoderConfig(model=str(folder), device="cpu"))


def test_missing_model_gives_one_paragraph_with_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        load_encoder(EncoderConfig(model="nobody/no-such-model-xyz", device="cpu"))
    message = str(caught.value)
    assert "encoder.model" in message and "local" in message and "\n" not in message
    with pytest.raises(ModelLoadError, match="folder not found"):
        load_encoder(EncoderConfig(model=str(tmp_path / "missing" / "model"), device="cpu"))
