"""Load the encoder, start the decode processes and the batcher, and run the app under uvicorn."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.decode.setup import usable_cores
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError
from pipeline.serve.app import create_app
from pipeline.serve.batching import Batcher
from pipeline.serve.bodies import ByteBudget
from pipeline.serve.images import DecodeWorkers
from pipeline.serve.links import Links
from pipeline.serve.metrics import Metrics
from pipeline.serve.parse import Limits
from pipeline.serve.responses import TokenCounter
from pipeline.serve.searcher import SearchService
from pipeline.serve.state import ServerState

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
    """Everything the app needs, started: a model that cannot be served is a ConfigError (exit 2). The config's
    index (output.lancedb) is opened for search; without one the server embeds and says why search is unavailable."""
    if config.encoder.kind == "http":
        raise ConfigError("encoder.kind: 'http' cannot be served (it is itself a client of a server); "
                          "set encoder.model to a local model")
    api_key = _api_key(config)
    encoder = load_encoder(config.encoder, describe_model(config.encoder))
    spec = encoder.input_spec()
    if encoder.multivector:
        raise ConfigError(f"encoder.model: {encoder.name} is a multi-vector model; `embindex serve` serves "
                          "single-vector models for now")
    metrics = Metrics()
    serve = config.serve
    workers = usable_cores() if serve.decode_workers == "auto" else serve.decode_workers
    decoders = DecodeWorkers(spec, workers, config.decode.jpeg_draft, config.decode.timeout_s,
                             config.decode.max_worker_mb)
    batcher = Batcher(encoder, config.encoder.batch_size, serve.batch_window_ms / 1000, metrics.on_batch)
    batcher.start()
    name = served_name(config)
    limits = Limits(serve.max_items, serve.max_vectors, serve.max_image_pixels or config.decode.max_image_pixels,
                    serve.max_text_chars)
    log.info("serving %s as %r: %d-dimensional, %d decode processes, batches of up to %d, %d MiB of requests in "
             "flight", encoder.name, name, encoder.dim, workers, config.encoder.batch_size, serve.inflight_bytes >> 20)
    return ServerState(encoder, batcher, decoders, metrics, name, {name, config.encoder.model}, limits,
                       serve.max_body_bytes, serve.max_queued_images, api_key,
                       budget=ByteBudget(serve.inflight_bytes, metrics.inflight_bytes),
                       tokens=TokenCounter(getattr(encoder, "tokenizer", None)), body_timeout_s=serve.body_timeout_s,
                       search=SearchService(config, Links(api_key)))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; a name or a wildcard (0.0.0.0, ::) reaches beyond this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server that anyone on the network may use, or None."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"SERVING ON {host} WITHOUT AN API KEY: anyone who can reach this port can embed on this machine and "
            "load it (POST /v1/embeddings takes up to serve.max_body_bytes a request). Set serve.api_key_env to "
            "a variable holding a key, or serve on 127.0.0.1 behind a proxy that authenticates.")


def run_server(config: Config, host: str | None = None, port: int | None = None, access_log: bool = True) -> None:
    import uvicorn

    state = build_state(config)
    host = host or config.serve.host
    warning = exposure_warning(host, state.api_key)
    if warning:
        log.warning("%s\n%s\n%s", "!" * 100, warning, "!" * 100)
    # The event loop, the decode pool's feeder threads and the encoder thread share one GIL; each torch op
    # releases and re-takes it. Handing it over every 0.5 ms instead of 5 keeps the encoder thread from
    # waiting behind the others at every op (as pipeline/decode/feed.py does for the GPU decode path).
    sys.setswitchinterval(0.0005)
    # A full garbage collection walks every object, holding the GIL (the event loop waits): torch and
    # transformers leave ~350,000, 0.26 s on this 2-core machine at start-up, longer when its cores are busy.
    # They live as long as the server: frozen, collections skip them.
    gc.collect()
    gc.freeze()
    uvicorn.run(create_app(state), host=host, port=config.serve.port if port is None else port,
                access_log=access_log, log_level="info", timeout_graceful_shutdown=10)
