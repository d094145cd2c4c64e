"""encoder.dtype float8: its refusals, the layers it converts, its identity, and (on an FP8 GPU) its vectors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, CLIPConfig, CLIPModel

from pipeline.config import EncoderConfig
from pipeline.encode.models import source
from pipeline.encode.models.float8 import check_float8, float8_linears, to_float8
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _torchao_imports() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA GPU of capability 9.0 as far as check_float8 asks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")


def test_float8_on_cpu_is_refused_before_the_weights_load(tiny_models: Path) -> None:
    with pytest.raises(ConfigError, match=r"^encoder\.dtype: float8 needs a CUDA GPU .*the device is cpu"):
        load_encoder(EncoderConfig(model=str(tiny_models / "clip"), device="cpu", dtype="float8"))


def test_float8_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="encoder.dtype: .*no CUDA GPU is available"):
        check_float8(torch.device("cuda"), "clip")


@pytest.mark.parametrize("family", ["colqwen2", "colqwen2_5", "colpali", "qwen_vl"])
def test_multivector_and_dynamic_resolution_kinds_are_refused(tiny_models: Path, family: str) -> None:
    config = EncoderConfig(model=str(tiny_models / family), device="cpu", dtype="float8",
                           kind="qwen_vl_features" if family == "qwen_vl" else "auto")
    with pytest.raises(ConfigError, match=r"encoder\.dtype: float8 is available for .*clip, siglip, siglip2, dinov2"):
        describe_model(config)


def test_http_kind_is_refused() -> None:
    config = EncoderConfig(model="remote", kind="http", url="http://127.0.0.1:9", dtype="float8")
    with pytest.raises(ConfigError, match=r"encoder\.dtype: .*not 'http'"):
        describe_model(config)


def test_a_gpu_without_fp8_tensor_cores_is_named(fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(ConfigError) as caught:
        check_float8(torch.device("cuda"), "clip")
    message = str(caught.value)
    assert message.startswith("encoder.dtype:")
    assert "NVIDIA A10" in message and "8.6" in message and "Hopper/Ada" in message


def test_missing_torchao_says_how_to_install_it(fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as installed:  # a capable GPU and torchao: nothing to refuse
        installed.setattr(importlib.util, "find_spec", lambda name, package=None: object())
        check_float8(torch.device("cuda"), "siglip2")
    for name in ("torchao", "torchao.quantization"):  # importing them raises ImportError; find_spec gives None
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"^encoder\.dtype: .*pip install torchao"):
        check_float8(torch.device("cuda"), "siglip2")
    with pytest.raises(ConfigError, match=r"^encoder\.dtype: .*pip install torchao"):
        to_float8(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_identity_records_float8_and_the_model_computes_in_bfloat16(tiny_models: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "check_float8", lambda device, kind: None)  # as on an FP8 GPU
    described = describe_model(EncoderConfig(model=str(tiny_models / "clip"), device="cpu", dtype="float8"))
    plain = describe_model(EncoderConfig(model=str(tiny_models / "clip"), device="cpu", dtype="bfloat16"))
    assert described.dtype == torch.bfloat16 and described.precision == "float8"
    assert described.identity()["dtype"] == "float8" and plain.identity()["dtype"] == "bfloat16"
    assert {**described.identity(), "dtype": "bfloat16"} == plain.identity()


def test_only_the_vision_towers_linear_layers_of_fitting_size_are_chosen() -> None:
    """CLIP with an MLP width of 40: fc1 and fc2 cannot be float8 (not multiples of 16), the attention
    projections and the final projection can; the text tower and the patch convolution are left alone."""
    layers = {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4}
    model = CLIPModel(CLIPConfig(text_config={**layers, "vocab_size": 99}, projection_dim=32,
                                 vision_config={**layers, "image_size": 32, "patch_size": 8}))
    convert, keep = float8_linears(model)
    assert "visual_projection" in convert and "vision_model.encoder.layers.1.self_attn.q_proj" in convert
    assert len(convert) == 2 * 4 + 1
    assert keep == [f"vision_model.encoder.layers.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    assert not any(name.startswith("text") for name in convert + keep)


def test_siglips_pooling_attention_keeps_its_out_proj(tiny_models: Path) -> None:
    convert, keep = float8_linears(AutoModel.from_pretrained(tiny_models / "siglip"))
    assert "vision_model.head.mlp.fc1" in convert and not keep
    assert not any(name.startswith("vision_model.head.attention") for name in convert)
    dinov2, _ = float8_linears(AutoModel.from_pretrained(tiny_models / "dinov2"))
    assert len(dinov2) == 2 * 6 and "encoder.layer.1.mlp.fc2" in dinov2  # q, k, v, out, fc1, fc2 per layer


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9+ (Hopper/Ada)")
@pytest.mark.skipif(not _torchao_imports(), reason="needs torchao (pip install torchao)")
@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_float8_vectors_stay_close_to_bfloat16(tiny_models: Path, family: str) -> None:
    folder = str(tiny_models / family)
    reference = load_encoder(EncoderConfig(model=folder, device="cuda", dtype="bfloat16"))
    encoder = load_encoder(EncoderConfig(model=folder, device="cuda", dtype="float8"))
    assert encoder.fingerprint()["dtype"] == "float8" and encoder.dtype == torch.bfloat16
    convert, _ = float8_linears(encoder.model)
    weights = {type(encoder.model.get_submodule(name).weight).__name__ for name in convert}
    assert convert and weights == {"Float8Tensor"}
    height, width, _ = encoder.input_spec().output_shape
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, height, width, 3), dtype=torch.uint8, generator=generator)
    cosine = (encoder.encode_images(pixels) * reference.encode_images(pixels)).sum(dim=-1)
    assert cosine.min().item() >= 0.99, f"{family}: worst cosine {cosine.min().item():.4f}"
    if family != "dinov2":  # the text tower stays bfloat16
        assert torch.allclose(torch.from_numpy(encoder.encode_texts(["a cat"])),
                              torch.from_numpy(reference.encode_texts(["a cat"])))

