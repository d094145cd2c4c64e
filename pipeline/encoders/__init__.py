"""Pick the encoder family from the model's config.json and load it through from_pretrained."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.config import ConfigError, EncoderConfig
from pipeline.encoders.base import Encoder, HFSingleVectorEncoder, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# config.json model_type -> encoder kind. Fixed-resolution SigLIP2 checkpoints are model_type "siglip".
KIND_BY_MODEL_TYPE = {"clip": "clip", "siglip": "siglip", "dinov2": "dinov2"}


class ModelLoadError(Exception):
    """The model could not be loaded; the message says how to point at a local copy."""


def _load_error(model: str, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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


def _encoder_class(kind: str) -> type[HFSingleVectorEncoder]:
    if kind == "clip":
        from pipeline.encoders.clip import ClipEncoder

        return ClipEncoder
    if kind in ("siglip", "siglip2"):
        from pipeline.encoders.siglip import SiglipEncoder

        return SiglipEncoder
    from pipeline.encoders.dinov2 import Dinov2Encoder

    return Dinov2Encoder


def detect_kind(model_config: Any, requested: str) -> str:
    if requested != "auto":
        return requested
    model_type = getattr(model_config, "model_type", None)
    if model_type == "siglip2":
        raise ConfigError(
            "encoder.model: SigLIP2 NaFlex (model_type 'siglip2', variable resolution) is not supported yet; "
            "use a fixed-resolution SigLIP2 checkpoint such as google/siglip2-base-patch16-224"
        )
    if model_type not in KIND_BY_MODEL_TYPE:
        raise ConfigError(
            f"encoder.kind: cannot tell the family of a model with model_type {model_type!r}; "
            f"supported: {sorted(set(KIND_BY_MODEL_TYPE.values()))} (set encoder.kind to force one)"
        )
    return KIND_BY_MODEL_TYPE[model_type]


def load_encoder(config: EncoderConfig) -> Encoder:
    """Load model, image processor and tokenizer with the real from_pretrained path."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill cron logs

    source, revision = config.model, config.revision
    if os.path.isabs(source) and not os.path.isdir(source):
        raise ModelLoadError(f"encoder.model: folder not found: {source}")
    # A hub id is read from the local cache when the Hub cannot be reached (or HF_HUB_OFFLINE is set).
    offline = not os.path.isdir(source) and not _hub_reachable()
    try:
        model_config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    kind = detect_kind(model_config, config.kind)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        options: dict[str, Any] = {"revision": revision, "local_files_only": offline}
        model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **options)
        processor = AutoImageProcessor.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options) if kind != "dinov2" else None
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from None
    model.to(device)
    if device.type == "cuda":
        # The main process only stages batches for the GPU; torch's CPU pool (one thread per core,
        # spinning between ops) would compete with the decode workers for every core.
        torch.set_num_threads(2)
    if getattr(model_config, "embindex_smoke_test", False):
        log.warning("SMOKE TEST: %s has random weights (scripts/make_*_models.py); its embeddings are "
                    "meaningless. Set encoder.model to a real model for real use.", source)
    name = source if revision is None else f"{source}@{revision}"
    revision_hash = getattr(model_config, "_commit_hash", None)
    log.info("loaded %s (%s) on %s as %s", name, kind, device, dtype)
    encoder = _encoder_class(kind)(model, processor, tokenizer, name, kind, device, dtype, revision_hash)
    encoder.smoke_test = bool(getattr(model_config, "embindex_smoke_test", False))
    return encoder
