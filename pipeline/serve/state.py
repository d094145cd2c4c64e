"""What every route of one server shares: the encoder's batcher, the decode processes, limits, metrics, the index."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.encode.models.base import Encoder
from pipeline.serve.batching import Batcher
from pipeline.serve.bodies import ByteBudget
from pipeline.serve.images import DecodeWorkers
from pipeline.serve.metrics import Metrics
from pipeline.serve.parse import Limits
from pipeline.serve.responses import TokenCounter
from pipeline.serve.searcher import SearchService


@dataclass
class ServerState:
    encoder: Encoder
    batcher: Batcher
    decoders: DecodeWorkers
    metrics: Metrics
    model_name: str  # the id served in /v1/models
    model_names: set[str]  # ids a request may name: the served id and encoder.model as configured
    limits: Limits
    max_body_bytes: int
    max_queued_images: int
    api_key: str | None
    budget: ByteBudget
    tokens: TokenCounter
    body_timeout_s: float
    search: SearchService | None = None  # the config's index (output.lancedb), for /v1/search and the page
    in_flight_images: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def embeds_text(self) -> bool:
        return getattr(self.encoder, "tokenizer", None) is not None

    @property
    def smoke_test(self) -> bool:
        return bool(getattr(self.encoder, "smoke_test", False))
