"""Pick the encoder family from the model's config.json and load it through from_pretrained."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, EncoderConfig
from pipeline.decode import InputSpec
from pipeline.encoders.base import (
    Encoder,
    HFSingleVectorEncoder,
    input_spec_from_processor,
    resolve_device,
    resolve_dtype,
)
from pipeline.errors import ModelLoadError

log = logging.getLogger(__name__)

# config.json model_type -> encoder kind. Fixed-resolution SigLIP2 checkpoints are model_type "siglip".
KIND_BY_MODEL_TYPE = {"clip": "clip", "siglip": "siglip", "dinov2": "dinov2", "colqwen2": "colqwen2",
                      "colpali": "colpali"}
# The model_type each vision-language kind loads (a forced encoder.kind is checked against it).
VLM_MODEL_TYPES = {"colqwen2": ("colqwen2",), "colpali": ("colpali",), "colqwen2_5": ("qwen2_5_vl",),
                   "biqwen2_5": ("qwen2_5_vl",), "qwen_vl_features": ("qwen2_5_vl",)}


def _load_error(model: str, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.path.isdir(model):
        return ModelLoadError(
            f"could not load the model in {model} ({reason}). encoder.model must name a folder saved by "
            "Hugging Face `save_pretrained` or `hf download`: config.json, the weights and the processor files."
        )
    return ModelLoadError(
        f"could not load model {model!r} ({reason}). If this machine cannot reach the Hugging Face Hub, "
        f"download the model where it can (e.g. `hf download {model} --local-dir ./models/NAME`), copy the "
        "folder here and set `encoder.model: ./models/NAME` (a path is read relative to the config file). "
        "For an offline smoke test, `python scripts/make_tiny_models.py ./tiny-models` writes tiny random "
        "models to point at (their embeddings are meaningless)."
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of after the Hub
    client's retries with backoff (~25 s of warnings)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def weights_digest(folder: str) -> str:
    """A cheap identity of a local model's weights: names, sizes, and the first and last MiB of each
    weight file (a full hash of a 15 GB checkpoint would cost a minute every night)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return "weights:" + digest.hexdigest()


def _encoder_class(kind: str) -> type[HFSingleVectorEncoder]:
    if kind == "clip":
        from pipeline.encoders.clip import ClipEncoder

        return ClipEncoder
    if kind in ("siglip", "siglip2"):
        from pipeline.encoders.siglip import SiglipEncoder

        return SiglipEncoder
    from pipeline.encoders.dinov2 import Dinov2Encoder

    return Dinov2Encoder


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
    adapter: Any = None  # a PEFT adapter (encoders.peft_loading.Adapter) applied to its base model
    tokenizer_source: str | None = None  # where the tokenizer is (an adapter's base when the adapter has none)
    weights_options: dict[str, Any] = field(default_factory=dict)  # from_pretrained options for the weights

    @property
    def name(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    def identity(self) -> dict[str, Any]:
        """The encoder fingerprint less the embedding dimension (known only once loaded)."""
        spec = self.spec or input_spec_from_processor(self.processor)
        if spec.dynamic:
            from pipeline.encoders.multivector import spec_identity

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
    if config.kind == "http":  # a remote endpoint: nothing to read here (see encoders/http.py)
        from pipeline.encoders.http import describe_http

        return describe_http(config)  # type: ignore[return-value]
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill cron logs
    source, revision = config.model, config.revision
    if os.path.isabs(source) and not os.path.isdir(source):
        raise ModelLoadError(f"encoder.model: folder not found: {source}")
    # A hub id is read from the local cache when the Hub cannot be reached (or HF_HUB_OFFLINE is set).
    offline = not os.path.isdir(source) and not _hub_reachable()
    from pipeline.encoders.peft_loading import find_adapter

    adapter = find_adapter(source, revision, offline, config.base_model)  # None unless a PEFT adapter
    # An adapter's config.json is its base model's; the adapter's own files (processor, tokenizer) win.
    weights_source, weights_revision = (adapter.base, None) if adapter else (source, revision)
    weights_offline = offline if adapter is None else not os.path.isdir(adapter.base) and not _hub_reachable()
    try:
        model_config = AutoConfig.from_pretrained(weights_source, revision=weights_revision,
                                                  local_files_only=weights_offline)
    except (OSError, ValueError) as exc:
        if adapter is not None:
            raise _base_load_error(adapter, exc) from None
        raise _load_error(source, exc) from None
    kind = detect_kind(model_config, config.kind, adapter)
    processor_source = source if adapter is None or adapter.has_file("preprocessor_config.json") else adapter.base
    own = processor_source == source
    try:
        processor = AutoImageProcessor.from_pretrained(processor_source, revision=revision if own else None,
                                                       local_files_only=offline if own else weights_offline)
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    from pipeline.encoders.multivector import vlm_input_spec

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


def _base_load_error(adapter: Any, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"encoder.base_model: could not load {adapter.base!r}, the base model of the adapter {adapter.source} "
        f"({reason}). Download the base where the Hub can be reached (e.g. `hf download {adapter.base} --local-dir "
        "./models/base`), copy it here and set encoder.base_model to that folder."
    )


def _load_vision_language(described: ModelSource) -> Encoder:
    """The vision-language kinds: each family module builds its model class, tokenizer and encoder."""
    import importlib

    import torch

    module = {"colqwen2_5": "colqwen2_5", "biqwen2_5": "colqwen2_5", "colqwen2": "colqwen2", "colpali": "colpali",
              "qwen_vl_features": "qwen_features"}[described.kind]
    try:
        encoder = importlib.import_module(f"pipeline.encoders.{module}").load(described)
    except (OSError, ValueError) as exc:
        raise _load_error(described.source, exc) from None
    if described.device.type == "cuda":
        torch.set_num_threads(2)  # as in load_encoder: leave the cores to the decode workers
    if described.smoke_test:
        log.warning("SMOKE TEST: %s has random weights (scripts/make_*_models.py); its embeddings are "
                    "meaningless. Set encoder.model to a real model for real use.", described.source)
    log.info("loaded %s (%s) on %s as %s", described.name, described.kind, described.device, described.dtype)
    encoder.smoke_test = described.smoke_test
    return encoder


def load_encoder(config: EncoderConfig, described: ModelSource | None = None) -> Encoder:
    """Load model, image processor and tokenizer with the real from_pretrained path."""
    if config.kind == "http":  # a remote endpoint: asks it for its model and dimension
        from pipeline.encoders.http import HttpEncoder

        return HttpEncoder(config)  # type: ignore[return-value]
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_source = described or describe_model(config)
    source, kind, device, dtype = model_source.source, model_source.kind, model_source.device, model_source.dtype
    if kind in VLM_MODEL_TYPES:
        return _load_vision_language(model_source)
    try:
        options: dict[str, Any] = {"revision": model_source.revision, "local_files_only": model_source.offline}
        model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options) if kind != "dinov2" else None
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    model.to(device)
    if device.type == "cuda":
        # The main process only stages batches for the GPU; torch's CPU pool (one thread per core,
        # spinning between ops) would compete with the decode workers for every core.
        torch.set_num_threads(2)
    if model_source.smoke_test:
        log.warning("SMOKE TEST: %s has random weights (scripts/make_*_models.py); its embeddings are "
                    "meaningless. Set encoder.model to a real model for real use.", source)
    log.info("loaded %s (%s) on %s as %s", model_source.name, kind, device, dtype)
    encoder = _encoder_class(kind)(model, model_source.processor, tokenizer, model_source.identity(), device, dtype)
    encoder.smoke_test = model_source.smoke_test
    return encoder
