"""What can be known of a model without its weights: its family (from config.json), processor, device and identity."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import EncoderConfig
from pipeline.decode.spec import InputSpec, input_spec_from_processor
from pipeline.encode.models.base import resolve_device, resolve_dtype
from pipeline.encode.models.hub import base_load_error, hub_reachable, load_error, weights_digest
from pipeline.errors import ConfigError, ModelLoadError

# config.json model_type -> encoder kind. Fixed-resolution SigLIP2 checkpoints are model_type "siglip".
KIND_BY_MODEL_TYPE = {"clip": "clip", "siglip": "siglip", "dinov2": "dinov2", "colqwen2": "colqwen2",
                      "colpali": "colpali"}
# The model_type each vision-language kind loads (a forced encoder.kind is checked against it).
VLM_MODEL_TYPES = {"colqwen2": ("colqwen2",), "colpali": ("colpali",), "colqwen2_5": ("qwen2_5_vl",),
                   "biqwen2_5": ("qwen2_5_vl",), "qwen_vl_features": ("qwen2_5_vl",)}


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
        if model_config.model_type == "qwen2_5_vl" else ""
    raise ConfigError(
        f"encoder.kind: a {model_config.model_type} model {architectures} is a chat model, not a retrieval model:"
        f"{features} point encoder.model at a ColQwen2.5 / ColNomic / Nomic checkpoint or adapter"
    )


def detect_kind(model_config: Any, requested: str, adapter: Any = None) -> str:
    model_type = getattr(model_config, "model_type", None)
    if requested in VLM_MODEL_TYPES and model_type not in VLM_MODEL_TYPES[requested]:
        raise ConfigError(f"encoder.kind: {requested} needs a model of type {' or '.join(VLM_MODEL_TYPES[requested])}, "
                          f"not {model_type!r}")
    if requested != "auto":
        return requested
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
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

    @property
    def name(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    def identity(self) -> dict[str, Any]:
        """The encoder fingerprint less the embedding dimension (known only once loaded)."""
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
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": preprocess,
        }


def describe_model(config: EncoderConfig) -> ModelSource:
    """Read config.json and the image processor (small files), not the weights."""
    if config.kind == "http":  # a remote endpoint: nothing to read here (see models/http.py)
        from pipeline.encode.models.http import describe_http

        return describe_http(config)  # type: ignore[return-value]
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill cron logs
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
    try:
        model_config = AutoConfig.from_pretrained(weights_source, revision=weights_revision,
                                                  local_files_only=weights_offline)
    except (OSError, ValueError) as exc:
        if adapter is not None:
            raise base_load_error(adapter, exc) from None
        raise load_error(source, exc) from None
    kind = detect_kind(model_config, config.kind, adapter)
    processor_source = source if adapter is None or adapter.has_file("preprocessor_config.json") else adapter.base
    own = processor_source == source
    try:
        processor = AutoImageProcessor.from_pretrained(processor_source, revision=revision if own else None,
                                                       local_files_only=offline if own else weights_offline)
    except (OSError, ValueError) as exc:
        raise load_error(source, exc) from None
    from pipeline.encode.models.multivector import vlm_input_spec

    spec = vlm_input_spec(kind, processor, config)  # None for the fixed-resolution single-vector kinds
    device = resolve_device(config.device)
    if adapter is not None:
        base_hash = weights_digest(adapter.base) if os.path.isdir(adapter.base) else model_config._commit_hash
        revision_hash = f"{adapter.revision_hash}+{base_hash}"
    else:
        revision_hash = weights_digest(source) if os.path.isdir(source) else getattr(model_config, "_commit_hash", None)
    tokenizer_source = source if adapter is None or adapter.has_file("tokenizer_config.json") else adapter.base
    return ModelSource(source, revision, revision_hash, kind, device, resolve_dtype(config.dtype, device), processor,
                       offline, bool(getattr(model_config, "embindex_smoke_test", False)), spec, adapter,
                       tokenizer_source,
                       {"revision": weights_revision, "local_files_only": weights_offline})
