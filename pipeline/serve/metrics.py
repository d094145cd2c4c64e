"""Prometheus metrics of the server: requests, items, GPU batch sizes and latencies (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """One registry per server (tests start several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embindex_requests", "HTTP requests by route and status (499: the client went away)",
                                ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("embindex_request_seconds", "Embedding request latency", ["kind"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.items = Counter("embindex_items", "Inputs embedded", ["kind"], registry=self.registry)
        self.vectors = Counter("embindex_vectors", "Vectors returned (pyramid tiles count one each)",
                               registry=self.registry)
        self.decode_seconds = Histogram("embindex_decode_seconds", "Time to decode a request's images",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("embindex_batch_size", "Rows per encoder forward pass", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("embindex_batch_seconds", "Seconds per encoder forward pass", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queued_images = Gauge("embindex_queued_images", "Images accepted and not yet embedded",
                                   registry=self.registry)
        self.inflight_bytes = Gauge("embindex_inflight_bytes", "Request bytes admitted and not yet answered "
                                    "(serve.max_inflight_bytes)", registry=self.registry)

    def on_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
