"""models/source.py's own readers of config.json and the image processor's file agree with transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig, AutoImageProcessor

from pipeline.config import EncoderConfig
from pipeline.decode.spec import input_spec_from_processor
from pipeline.encode.models import source
from pipeline.encode.models.hub import snapshot_commit
from pipeline.encode.models.source import (
    PROCESSOR_DEFAULTS,
    describe_model,
    processor_settings,
    read_image_processor,
    read_model_config,
)

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["clip", "siglip", "siglip2", "dinov2", "colqwen2", "colqwen2_5", "colpali", "biqwen2_5",
            "colqwen2_5_adapter"]
FIELDS = ["size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std", "rescale_factor",
          "patch_size", "temporal_patch_size", "merge_size"]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
QWEN = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
# Image processor files as published on the Hub (the fields that matter), old and new forms, and edge cases.
PROCESSOR_FILES: dict[str, dict[str, Any]] = {
    "clip_transformers4": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
                           "image_std": CLIP_STD, "resample": 3, "size": 224},
    "clip": {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
             "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "CLIPImageProcessor",
             "processor_class": "CLIPProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
             "size": {"shortest_edge": 336}},
    "clip_fast_defaults": {"image_processor_type": "CLIPImageProcessorFast"},
    "clip_no_crop": {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False,
                     "size": {"height": 224, "width": 224}},
    "siglip": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
               "processor_class": "SiglipProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
               "size": {"height": 384, "width": 384}},
    "siglip_defaults": {"image_processor_type": "SiglipImageProcessor"},
    "siglip_int_size": {"image_processor_type": "SiglipImageProcessor", "size": 256},
    "colpali": {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
                "image_seq_length": 1024, "image_std": [0.5, 0.5, 0.5], "processor_class": "ColPaliProcessor",
                "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448}},
    "dinov2": {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
               "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
               "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
               "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}},
    "dinov2_defaults": {"image_processor_type": "BitImageProcessor"},
    "qwen2_vl_min_max": {**QWEN, "min_pixels": 3136, "max_pixels": 12845056},
    "qwen2_5_vl_size_and_max": {**QWEN, "size": {"shortest_edge": 3136, "longest_edge": 12845056},
                                "max_pixels": 602112},
    "qwen_defaults": {"image_processor_type": "Qwen2VLImageProcessor"},
    # Qwen/Qwen3-VL-2B-Instruct's preprocessor_config.json: patch 16, 256x256..4096x4096 pixels, mean = std = 0.5
    "qwen3_vl": {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"},
    "qwen_null_bound": {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": None, "max_pixels": 1003520},
}


@pytest.fixture(autouse=True)
def _qwen_default_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.17's Qwen2VLImageProcessor writes a file's min/max_pixels into its class default size
    (fixed by 5.24): each test gets its own copy, so one file's bounds do not become the next one's defaults."""
    import transformers

    for name in ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"):
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(getattr(cls, "size", None), dict):
            monkeypatch.setattr(cls, "size", dict(cls.size))


def _plain(value: Any) -> Any:
    """A transformers attribute in plain Python (SizeDict -> dict, PIL resampling -> int, list -> tuple)."""
    if type(value).__name__ == "SizeDict" or isinstance(value, dict):
        return dict(value)
    if hasattr(value, "value"):
        return int(value.value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _same_fields(light: Any, processor: Any) -> None:
    for name in FIELDS:
        if hasattr(processor, name) or getattr(light, name) is not None:
            assert getattr(light, name) == _plain(getattr(processor, name)), name


def _transformers_describe(config: EncoderConfig, monkeypatch: pytest.MonkeyPatch) -> source.ModelSource:
    """describe_model through AutoConfig and AutoImageProcessor, as before models/source.py read the files."""
    with monkeypatch.context() as patch:
        patch.setattr(source, "read_model_config", lambda *args: None)
        patch.setattr(source, "read_image_processor", lambda *args: None)
        return describe_model(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_and_spec_match_transformers(tiny_models: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = EncoderConfig(model=str(tiny_models / family), device="cpu")
    light, slow = describe_model(config), _transformers_describe(config, monkeypatch)
    assert type(light.processor).__name__ == "ImageProcessorSettings"  # the files were read, not transformers
    assert light.identity() == slow.identity()
    assert (light.kind, light.spec, light.smoke_test, light.tokenizer_source) == \
        (slow.kind, slow.spec, slow.smoke_test, slow.tokenizer_source)
    if light.spec is None:
        assert input_spec_from_processor(light.processor) == input_spec_from_processor(slow.processor)
    _same_fields(light.processor, slow.processor)


def test_a_qwen3_vl_chat_model_is_described_as_through_transformers(tiny_models: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Its config.json and image processor are read here; the spec is Qwen3-VL's: sides multiples of 32."""
    config = EncoderConfig(model=str(tiny_models / "qwen3_vl"), kind="qwen_vl_features", device="cpu")
    light, slow = describe_model(config), _transformers_describe(config, monkeypatch)
    assert type(light.processor).__name__ == "ImageProcessorSettings"
    assert light.identity() == slow.identity() and light.spec == slow.spec
    assert (light.spec.factor, light.spec.min_pixels, light.spec.max_pixels) == (32, 4 * 1024, 64 * 1024)
    _same_fields(light.processor, slow.processor)
    # encoder.quality counts tokens, 32x32 pixels each here (28x28 for Qwen2/2.5-VL)
    fast = describe_model(EncoderConfig(model=str(tiny_models / "qwen3_vl"), kind="qwen_vl_features", device="cpu",
                                        quality="fast")).spec
    assert (fast.min_pixels, fast.max_pixels) == (128 * 1024, 256 * 1024)


@pytest.mark.parametrize("name", sorted(PROCESSOR_FILES))
def test_processor_files_read_as_transformers_reads_them(tmp_path: Path, name: str) -> None:
    data = PROCESSOR_FILES[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
    light = read_image_processor(str(tmp_path), None, False)
    assert light is not None
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    _same_fields(light, processor)
    try:
        expected = input_spec_from_processor(processor)
    except ValueError:
        with pytest.raises(ValueError):
            input_spec_from_processor(light)
    else:
        assert input_spec_from_processor(light) == expected


def test_the_defaults_are_transformers_class_defaults(tmp_path: Path) -> None:
    for name in PROCESSOR_DEFAULTS:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": name}))
        _same_fields(read_image_processor(str(tmp_path), None, False), AutoImageProcessor.from_pretrained(tmp_path))


def test_a_nested_processor_config_wins_over_preprocessor_config(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_FILES["clip"]))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": PROCESSOR_FILES["dinov2"]}))
    light = read_image_processor(str(tmp_path), None, False)
    _same_fields(light, AutoImageProcessor.from_pretrained(str(tmp_path)))
    assert light.size == {"shortest_edge": 256}


@pytest.mark.parametrize("data", [
    {"image_processor_type": "ViTImageProcessor"},  # a family the reader does not know
    {"image_processor_type": "CLIPImageProcessor", "auto_map": {"AutoImageProcessor": "x.Y"}},  # remote code
    {"image_processor_type": "CLIPImageProcessor", "use_square_size": True},
    {"image_processor_type": "CLIPImageProcessor", "size": {"max_height": 10, "max_width": 10}},
    {"image_processor_type": "Qwen2VLImageProcessor", "size": 3136, "max_pixels": 9000},
    {"size": 224},  # no processor class named
    {"image_processor_type": "CLIPImageProcessor", "size": None},  # a null: transformers keeps some, not others
    {"image_processor_type": "Qwen2VLImageProcessor", "size": None, "max_pixels": 1003520},
])
def test_what_the_reader_cannot_be_sure_of_goes_to_transformers(data: dict[str, Any]) -> None:
    assert processor_settings(data) is None


def test_no_processor_file_goes_to_transformers(tmp_path: Path) -> None:
    assert read_image_processor(str(tmp_path), None, False) is None
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    assert read_image_processor(str(tmp_path), None, False) is None


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "colqwen2", "colqwen2_5", "colpali", "qwen_vl",
                                    "qwen3_vl"])
def test_config_json_read_as_autoconfig_reads_it(tiny_models: Path, family: str) -> None:
    light = read_model_config(str(tiny_models / family), None, False)
    config = AutoConfig.from_pretrained(tiny_models / family)
    assert light is not None
    assert (light.model_type, light.architectures, light.embindex_smoke_test) == \
        (config.model_type, config.architectures, bool(getattr(config, "embindex_smoke_test", False)))


def test_config_json_of_other_families_goes_to_autoconfig(tmp_path: Path) -> None:
    assert read_model_config(str(tmp_path), None, False) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert read_model_config(str(tmp_path), None, False) is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))  # no model_type
    assert read_model_config(str(tmp_path), None, False) is None


def test_hub_snapshot_commit_is_the_revision(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--name" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    assert snapshot_commit(str(snapshot / "config.json")) == commit
    assert snapshot_commit(str(tmp_path / "config.json")) is None


def test_describe_model_imports_neither_transformers_nor_torchvision(tiny_models: Path) -> None:
    """A run with nothing new reads the model's files only: transformers' config classes import scikit-learn
    (through its generation code) and its image processors torchvision (torch._dynamo), seconds each."""
    code = (
        "import sys\n"
        "from pipeline.config import EncoderConfig\n"
        "from pipeline.encode.models.source import describe_model\n"
        f"described = describe_model(EncoderConfig(model={str(tiny_models / 'clip')!r}, device='cpu'))\n"
        "described.identity()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torchvision', 'sklearn'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_hub_id_in_the_cache_reads_as_through_transformers(tiny_models: Path, tmp_path: Path) -> None:
    """An offline machine with the model in its hub cache: the same identity (the snapshot's commit as the
    revision) whether the files are read here or by transformers."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in (tiny_models / "clip").iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    code = (
        "import json\n"
        "from pipeline.config import EncoderConfig\n"
        "from pipeline.encode.models import source\n"
        "config = EncoderConfig(model='acme/tiny-clip', device='cpu')\n"
        "light = source.describe_model(config)\n"
        "assert type(light.processor).__name__ == 'ImageProcessorSettings', light.processor\n"
        "source.read_model_config = source.read_image_processor = lambda *args: None\n"
        "slow = source.describe_model(config)\n"
        "print(json.dumps([light.identity(), slow.identity()]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    light, slow = json.loads(result.stdout)
    assert light == slow
    # transformers up to 5.17 gives the snapshot's commit; 5.18 dropped it from its configs (None)
    assert light["revision"] in (commit, None)
