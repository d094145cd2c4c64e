"""Load the encoder, start the decode processes and the batcher, and run the app under uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.decode.setup import usable_cores
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError
from pipeline.serve.app import ServerState, create_app
from pipeline.serve.batching import Batcher
from pipeline.serve.images import DecodeWorkers
from pipeline.serve.metrics import Metrics
from pipeline.serve.parse import Limits

log = logging.getLogger(__name__)


def served_name(config: Config) -> str:
    """The id in /v1/models: serve.model_name, else a hub id as given, else the model folder's name."""
    if config.serve.model_name:
        return config.serve.model_name
    model = config.encoder.model
    return Path(model).name if os.path.isdir(model) else model


def _api_key(config: Config) -> str | None:
    name = config.serve.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"serve.api_key_env: the environment variable {name} is not set (or empty)")
    return key


def build_state(config: Config) -> ServerState:
    """Everything the app needs, started: a model that cannot be served is a ConfigError (exit 2)."""
    if config.encoder.kind == "http":
        raise ConfigError("encoder.kind: 'http' cannot be served (it is itself a client of a server); "
                          "set encoder.model to a local model")
    api_key = _api_key(config)
    encoder = load_encoder(config.encoder, describe_model(config.encoder))
    spec = encoder.input_spec()
    if encoder.multivector or spec.dynamic:
        raise ConfigError(f"encoder.model: {encoder.name} is a multi-vector or variable-resolution model; "
                          "`embindex serve` serves single-vector, fixed-resolution models for now")
    metrics = Metrics()
    workers = usable_cores() if config.serve.decode_workers == "auto" else config.serve.decode_workers
    decoders = DecodeWorkers(spec, workers, config.decode.jpeg_draft, config.decode.timeout_s)
    batcher = Batcher(encoder, config.encoder.batch_size, config.serve.batch_window_ms / 1000, metrics.on_batch)
    batcher.start()
    name = served_name(config)
    limits = Limits(config.serve.max_items, config.serve.max_vectors,
                    config.serve.max_image_pixels or config.decode.max_image_pixels)
    log.info("serving %s as %r: %d-dimensional, %d decode processes, batches of up to %d", encoder.name, name,
             encoder.dim, workers, config.encoder.batch_size)
    return ServerState(encoder, batcher, decoders, metrics, name, {name, config.encoder.model}, limits,
                       config.serve.max_body_bytes, config.serve.max_queued_images, api_key)


def run_server(config: Config, host: str | None = None, port: int | None = None, access_log: bool = True) -> None:
    import uvicorn

    state = build_state(config)
    # The event loop, the decode pool's feeder threads and the encoder thread share one GIL; each torch op
    # releases and re-takes it. Handing it over every 0.5 ms instead of 5 keeps the encoder thread from
    # waiting behind the others at every op (as pipeline/decode/feed.py does for the GPU decode path).
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(state), host=host or config.serve.host, port=config.serve.port if port is None else port,
                access_log=access_log, log_level="info", timeout_graceful_shutdown=10)
