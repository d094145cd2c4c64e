"""What can be known of a model without its weights: its family (from config.json), processor, device and identity."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import EncoderConfig
from pipeline.decode.spec import InputSpec, input_spec_from_processor
from pipeline.encode.models.base import resolve_device, resolve_dtype
from pipeline.encode.models.float8 import check_float8
from pipeline.encode.models.hub import (
    base_load_error,
    hub_reachable,
    load_error,
    model_file,
    snapshot_commit,
    weights_digest,
)
from pipeline.errors import ConfigError, ModelLoadError

# config.json model_type -> encoder kind. Fixed-resolution SigLIP2 checkpoints are model_type "siglip".
KIND_BY_MODEL_TYPE = {"clip": "clip", "siglip": "siglip", "dinov2": "dinov2", "colqwen2": "colqwen2",
                      "colpali": "colpali"}
# Qwen3-VL (dense and MoE): patch 16, so a language-model token per 32x32 pixels, and DeepStack features.
QWEN3_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# The model_type each vision-language kind loads (a forced encoder.kind is checked against it).
VLM_MODEL_TYPES = {"colqwen2": ("colqwen2",), "colpali": ("colpali",), "colqwen2_5": ("qwen2_5_vl",),
                   "biqwen2_5": ("qwen2_5_vl",), "qwen_vl_features": ("qwen2_5_vl", *QWEN3_VL_TYPES),
                   "qwen3_vl_embedding": ("qwen3_vl",)}


def _qwen_vl_kind(model_config: Any, adapter: Any) -> str:
    """colpali-engine's ColQwen2.5 and BiQwen2.5 share the Qwen2.5-VL config: the architecture, or the adapter's
    `custom_text_proj`, tells them apart; a plain Qwen-VL chat model is neither."""
    architectures = getattr(model_config, "architectures", None) or []
    if model_config.model_type == "qwen2_5_vl":
        if "ColQwen2_5" in architectures or (adapter is not None and adapter.targets("custom_text_proj")):
            return "colqwen2_5"
        if "BiQwen2_5" in architectures or adapter is not None:
            return "biqwen2_5"
    features = " set encoder.kind to qwen_vl_features to store its vision features, or" \
        if model_config.model_type in VLM_MODEL_TYPES["qwen_vl_features"] else ""
    raise ConfigError(
        f"encoder.kind: a {model_config.model_type} model {architectures} is a chat model, not a retrieval model:"
        f"{features} point encoder.model at a ColQwen2.5 / ColNomic / Nomic checkpoint or adapter"
        + (" (a Qwen3-VL-Embedding copy without its modules.json: set encoder.kind to qwen3_vl_embedding)"
           if model_config.model_type == "qwen3_vl" else "")
    )


def detect_kind(model_config: Any, requested: str, adapter: Any = None) -> str:
    model_type = getattr(model_config, "model_type", None)
    if requested in VLM_MODEL_TYPES and model_type not in VLM_MODEL_TYPES[requested]:
        raise ConfigError(f"encoder.kind: {requested} needs a model of type {' or '.join(VLM_MODEL_TYPES[requested])}, "
                          f"not {model_type!r}")
    if requested != "auto":
        return requested
    if model_type in ("qwen2_vl", "qwen2_5_vl", *QWEN3_VL_TYPES):
        return _qwen_vl_kind(model_config, adapter)
    if model_type == "siglip2":
        raise ConfigError(
            "encoder.model: SigLIP2 NaFlex (model_type 'siglip2', variable resolution) is not supported yet; "
            "use a fixed-resolution SigLIP2 checkpoint such as google/siglip2-base-patch16-224"
        )
    if model_type not in KIND_BY_MODEL_TYPE:
        raise ConfigError(
            f"encoder.kind: cannot tell the family of a model with model_type {model_type!r}; "
            f"supported: {sorted({*KIND_BY_MODEL_TYPE.values(), *VLM_MODEL_TYPES})} (set encoder.kind to force one)"
        )
    return KIND_BY_MODEL_TYPE[model_type]


# Reading config.json and the image processor's file here, not through transformers, keeps a run that finds
# nothing new free of transformers (4.2 s to import on the H200 machine): its config classes import their
# modeling and generation code (scikit-learn when installed, 3.2 s), its image processors torchvision
# (6.5 s, torch._dynamo 5.4 s of it). Anything these readers do not know goes through transformers as before.
LIGHT_MODEL_TYPES = {*KIND_BY_MODEL_TYPE, "qwen2_vl", "qwen2_5_vl", *QWEN3_VL_TYPES, "siglip2"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers 5's class defaults (the same for its PIL and torchvision backends) of the image processors of
# the supported families, for the fields a file leaves out; tests/encode/test_source.py checks them.
_CROPPED = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CROPPED,
    "BitImageProcessor": _CROPPED,  # DINOv2
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "crop_size": None, "do_center_crop": None,
                             "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
    "Qwen2VLImageProcessor": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, "crop_size": None,
                              "do_center_crop": None, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2},
}
SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
SETTINGS_FIELDS = ("size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std", "rescale_factor",
                   "default_to_square", "patch_size", "temporal_patch_size", "merge_size")


@dataclass(frozen=True)
class ConfigFile:
    """The fields of config.json that describe_model reads, named as on transformers' config object."""

    model_type: str
    architectures: list[str] | None
    embindex_smoke_test: bool
    _commit_hash: str | None  # the hub snapshot's commit; None for a folder


@dataclass(frozen=True)
class ImageProcessorSettings:
    """The fields of a Hugging Face image processor that embindex reads (the input spec and the identity),
    with transformers' values, read from the processor's file."""

    image_processor_type: str
    size: dict[str, int]
    crop_size: dict[str, int] | None
    do_center_crop: bool | None
    resample: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    patch_size: int | None = None  # Qwen2-VL's: pixels per patch side, patches merged per token side
    temporal_patch_size: int | None = None
    merge_size: int | None = None


def _read_json(source: str, filename: str, revision: str | None, offline: bool) -> dict[str, Any] | None:
    path = model_file(source, filename, revision, offline)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else None


def read_model_config(source: str, revision: str | None, offline: bool) -> ConfigFile | None:
    """config.json of a supported family, or None: AutoConfig reads it then (and reports any failure)."""
    try:
        path = model_file(source, "config.json", revision, offline)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except Exception:  # any failure: transformers reads it again and says what is wrong
        return None
    if not isinstance(data, dict) or data.get("model_type") not in LIGHT_MODEL_TYPES:
        return None
    architectures = data.get("architectures")
    if architectures is not None and not isinstance(architectures, list):
        return None
    commit = snapshot_commit(path) if not os.path.isdir(source) and _configs_keep_commit() else None
    return ConfigFile(data["model_type"], architectures, bool(data.get("embindex_smoke_test", False)), commit)


def _configs_keep_commit() -> bool:
    """Whether transformers' config objects carry the hub commit (`_commit_hash`, the identity's revision of a
    hub model): up to 5.17 they do; 5.18 dropped it, so the identity records None there. Mirrored, so that
    an index keeps its identity whichever reader ran."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) < (5, 18)


def _size(value: Any, default_to_square: bool) -> dict[str, int] | None:
    """A size field as transformers' get_size_dict reads it; None for a form not handled here."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, list | tuple) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict) or set(value) not in SIZE_KEYS:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return None
    return dict(value)


def _floats(value: Any) -> tuple[float, ...] | None:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        return None
    return tuple(value)


def processor_settings(data: dict[str, Any]) -> ImageProcessorSettings | None:
    """What transformers' image processor of this file would hold, or None where this reader cannot be sure
    (another processor class, remote code, an unusual field): transformers builds the processor then."""
    name = data.get("image_processor_type")
    if name is None and isinstance(data.get("feature_extractor_type"), str):  # files of transformers 4's time
        name = data["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    if isinstance(name, str) and name.endswith("Fast"):
        name = name[:-4]
    if name not in PROCESSOR_DEFAULTS or "auto_map" in data or "use_square_size" in data:
        return None
    if any(key in data and data[key] is None for key in SETTINGS_FIELDS):  # transformers keeps some nulls
        return None
    defaults = PROCESSOR_DEFAULTS[name]

    def field_value(key: str, default: Any = None) -> Any:
        return data[key] if key in data else defaults.get(key, default)

    default_to_square = field_value("default_to_square", False)
    size: Any = field_value("size")
    if name == "Qwen2VLImageProcessor":  # min_pixels / max_pixels override the size's bounds, as in its __init__
        size = dict(size) if isinstance(size, dict) else size
        for key, bound in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if data.get(key) is not None:
                if not isinstance(size, dict):
                    return None
                size[bound] = data[key]
                size.pop(key, None)
    size = _size(size, bool(default_to_square))
    crop_value = field_value("crop_size")
    crop_size = None if crop_value is None else _size(crop_value, True)
    mean, std = _floats(field_value("image_mean")), _floats(field_value("image_std"))
    resample, rescale = field_value("resample", 3), field_value("rescale_factor", 1 / 255)
    do_center_crop = field_value("do_center_crop")
    if (size is None or (crop_value is not None and crop_size is None) or mean is None or std is None
            or not isinstance(resample, int) or not isinstance(rescale, int | float)
            or not isinstance(do_center_crop, bool | None) or not isinstance(default_to_square, bool)):
        return None
    patches = [field_value(key) for key in ("patch_size", "temporal_patch_size", "merge_size")]
    if not all(value is None or isinstance(value, int) for value in patches):
        return None
    return ImageProcessorSettings(name, size, crop_size, do_center_crop, int(resample), mean, std, float(rescale),
                                  *patches)


def read_image_processor(source: str, revision: str | None, offline: bool) -> ImageProcessorSettings | None:
    """The image processor's settings from its file, found as transformers finds it (processor_config.json's
    "image_processor", else preprocessor_config.json); None where transformers must read it."""
    try:
        nested = _read_json(source, "processor_config.json", revision, offline)
        if nested is not None and "image_processor" in nested:
            data = nested["image_processor"]
        else:
            data = _read_json(source, "preprocessor_config.json", revision, offline)
    except Exception:  # any failure: transformers reads it again and says what is wrong
        return None
    return processor_settings(data) if isinstance(data, dict) else None


@dataclass
class ModelSource:
    """What can be known of a model without loading its weights: enough to check the index's identity."""

    source: str
    revision: str | None
    revision_hash: str | None  # hub commit, or a digest of a local folder's weight files
    kind: str
    device: Any
    dtype: Any
    processor: Any
    offline: bool
    smoke_test: bool
    spec: InputSpec | None = None  # vision-language kinds: the input spec (dynamic resolution), else the processor's
    adapter: Any = None  # a PEFT adapter (models.peft_loading.Adapter) applied to its base model
    tokenizer_source: str | None = None  # where the tokenizer is (an adapter's base when the adapter has none)
    weights_options: dict[str, Any] = field(default_factory=dict)  # from_pretrained options for the weights
    # encoder.dtype when the weights are not all `dtype`: "float8" (its vision Linear layers, models/float8.py).
    # The identity records it, so float8 vectors never mix into a bfloat16 index.
    precision: str | None = None
    dim: int | None = None  # encoder.dim (Matryoshka): stated in the identity before the weights are loaded

    @property
    def name(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    def identity(self) -> dict[str, Any]:
        """The encoder fingerprint less the embedding dimension (known only once loaded, unless encoder.dim sets it)."""
        spec = self.spec or input_spec_from_processor(self.processor)
        if spec.dynamic:
            from pipeline.encode.models.multivector import spec_identity

            preprocess = spec_identity(spec)
        else:
            preprocess = {
                "resize": spec.resize, "size": list(spec.size), "crop": list(spec.crop or []),
                "resample": spec.resample, "mean": list(spec.mean), "std": list(spec.std),
            }
        return {
            "model": self.name,
            "revision": self.revision_hash,
            "kind": self.kind,
            "dtype": self.precision or str(self.dtype).removeprefix("torch."),
            "preprocess": preprocess,
            **({"dim": self.dim} if self.dim is not None else {}),
        }


def describe_model(config: EncoderConfig) -> ModelSource:
    """Read config.json and the image processor (small files), not the weights: read here where the readers
    above know the family and the processor, else through transformers."""
    if config.kind == "http":  # a remote endpoint: nothing to read here (see models/http.py)
        from pipeline.encode.models.qwen3_embedding import check_dim_applies

        check_dim_applies(config, config.kind)
        if config.dtype == "float8":
            check_float8(resolve_device(config.device), config.kind)
        from pipeline.encode.models.http import describe_http

        return describe_http(config)  # type: ignore[return-value]
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # download bars would fill cron logs (models/load.py silences transformers' own)
    source, revision = config.model, config.revision
    if os.path.isabs(source) and not os.path.isdir(source):
        raise ModelLoadError(f"encoder.model: folder not found: {source}")
    # A hub id is read from the local cache when the Hub cannot be reached (or HF_HUB_OFFLINE is set).
    offline = not os.path.isdir(source) and not hub_reachable()
    from pipeline.encode.models.peft_loading import find_adapter

    adapter = find_adapter(source, revision, offline, config.base_model)  # None unless a PEFT adapter
    # An adapter's config.json is its base model's; the adapter's own files (processor, tokenizer) win.
    weights_source, weights_revision = (adapter.base, None) if adapter else (source, revision)
    weights_offline = offline if adapter is None else not os.path.isdir(adapter.base) and not hub_reachable()
    model_config = read_model_config(weights_source, weights_revision, weights_offline)
    if model_config is None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(weights_source, revision=weights_revision,
                                                      local_files_only=weights_offline)
        except (OSError, ValueError) as exc:
            if adapter is not None:
                raise base_load_error(adapter, exc) from None
            raise load_error(source, exc) from None
    from pipeline.encode.models.qwen3_embedding import check_dim_applies, requested_kind

    requested = requested_kind(config.kind, model_config, weights_source, weights_revision, weights_offline)
    kind = detect_kind(model_config, requested, adapter)
    check_dim_applies(config, kind)
    processor_source = source if adapter is None or adapter.has_file("preprocessor_config.json") else adapter.base
    own = processor_source == source
    processor_revision, processor_offline = (revision, offline) if own else (None, weights_offline)
    processor: Any = read_image_processor(processor_source, processor_revision, processor_offline)
    if processor is None:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(processor_source, revision=processor_revision,
                                                           local_files_only=processor_offline)
        except (OSError, ValueError) as exc:
            if kind in VLM_MODEL_TYPES and os.path.isdir(processor_source):  # e.g. a video processor alone
                raise ModelLoadError(f"encoder.model: {processor_source} has no image processor "
                                     f"(preprocessor_config.json): {kind} embeds still images and takes their "
                                     "resolution from it") from None
            raise load_error(source, exc) from None
    from pipeline.encode.models.multivector import vlm_input_spec

    spec = vlm_input_spec(kind, processor, config)  # None for the fixed-resolution single-vector kinds
    device = resolve_device(config.device)
    if config.dtype == "float8":  # before the weights are hashed or loaded
        check_float8(device, kind)
    if adapter is not None:
        base_hash = (weights_digest(adapter.base) if os.path.isdir(adapter.base)
                     else getattr(model_config, "_commit_hash", None))
        revision_hash = f"{adapter.revision_hash}+{base_hash}"
    else:
        revision_hash = weights_digest(source) if os.path.isdir(source) else getattr(model_config, "_commit_hash", None)
    tokenizer_source = source if adapter is None or adapter.has_file("tokenizer_config.json") else adapter.base
    return ModelSource(source, revision, revision_hash, kind, device, resolve_dtype(config.dtype, device), processor,
                       offline, bool(getattr(model_config, "embindex_smoke_test", False)), spec, adapter,
                       tokenizer_source,
                       {"revision": weights_revision, "local_files_only": weights_offline},
                       precision="float8" if config.dtype == "float8" else None, dim=config.dim)
