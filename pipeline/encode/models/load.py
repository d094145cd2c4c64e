"""Load the described model family through the real from_pretrained path."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import EncoderConfig
from pipeline.encode.models.base import Encoder, HFSingleVectorEncoder
from pipeline.encode.models.hub import load_error
from pipeline.encode.models.source import VLM_MODEL_TYPES, ModelSource, describe_model

log = logging.getLogger(__name__)


def _encoder_class(kind: str) -> type[HFSingleVectorEncoder]:
    if kind == "clip":
        from pipeline.encode.models.clip import ClipEncoder

        return ClipEncoder
    if kind in ("siglip", "siglip2"):
        from pipeline.encode.models.siglip import SiglipEncoder

        return SiglipEncoder
    from pipeline.encode.models.dinov2 import Dinov2Encoder

    return Dinov2Encoder


def _load_vision_language(described: ModelSource) -> Encoder:
    """The vision-language kinds: each family module builds its model class, tokenizer and encoder."""
    import importlib

    import torch

    module = {"colqwen2_5": "colqwen2_5", "biqwen2_5": "colqwen2_5", "colqwen2": "colqwen2", "colpali": "colpali",
              "qwen_vl_features": "qwen_features", "qwen3_vl_embedding": "qwen3_embedding"}[described.kind]
    try:
        encoder = importlib.import_module(f"pipeline.encode.models.{module}").load(described)
    except (OSError, ValueError) as exc:
        raise load_error(described.source, exc) from None
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
        from pipeline.encode.models.http import HttpEncoder

        return HttpEncoder(config)  # type: ignore[return-value]
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill cron logs
    model_source = described or describe_model(config)
    source, kind, device, dtype = model_source.source, model_source.kind, model_source.device, model_source.dtype
    if kind in VLM_MODEL_TYPES:
        return _load_vision_language(model_source)
    try:
        options: dict[str, Any] = {"revision": model_source.revision, "local_files_only": model_source.offline}
        model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options) if kind != "dinov2" else None
    except (OSError, ValueError) as exc:
        raise load_error(source, exc) from None
    model.to(device)
    if model_source.precision == "float8":  # checked in describe_model: a CUDA GPU of capability 8.9+, torchao
        from pipeline.encode.models.float8 import to_float8

        to_float8(model)
    if device.type == "cuda":
        # The main process only stages batches for the GPU; torch's CPU pool (one thread per core,
        # spinning between ops) would compete with the decode workers for every core.
        torch.set_num_threads(2)
    if model_source.smoke_test:
        log.warning("SMOKE TEST: %s has random weights (scripts/make_*_models.py); its embeddings are "
                    "meaningless. Set encoder.model to a real model for real use.", source)
    log.info("loaded %s (%s) on %s as %s", model_source.name, kind, device, model_source.precision or dtype)
    encoder = _encoder_class(kind)(model, model_source.processor, tokenizer, model_source.identity(), device, dtype)
    encoder.smoke_test = model_source.smoke_test
    return encoder
