"""What each step of a run measured, and the report.json fields built from it (SPEC: report fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.decode.feed import Feed
from pipeline.encode.compiled import CompileChoice
from pipeline.encode.layout import RowLayout, vector_sizes
from pipeline.encode.models.base import Encoder
from pipeline.encode.models.source import ModelSource
from pipeline.encode.stream import EncodeTimer
from pipeline.index.commit import ShardCommitter
from pipeline.index.identity import fingerprint_id
from pipeline.index.sinks.base import Sink
from pipeline.plan.diff import Plan
from pipeline.plan.reuse import VectorReuse
from pipeline.report import MemoryProbe, gpu_memory_peaks


@dataclass
class Model:
    """The model as a run knows it before any weights load."""

    described: ModelSource | None  # None when the caller hands in a loaded encoder (`embindex bench`)
    encoder: Encoder | None  # the caller's, else loaded only if some file needs encoding
    on_ray: bool
    identity: dict[str, Any]  # the index fingerprint less the dimension
    device: Any
    describe_s: float  # imports and config files: part of loading the model


@dataclass
class Work:
    """The plan against the index, the vectors identical bytes may reuse, and what finding them took."""

    plan: Plan
    reuse: VectorReuse
    scan_s: float


@dataclass
class Embedding:
    """What the embedding phase leaves behind: the committed counts, its timings, the encoder it ran."""

    identity: dict[str, Any]
    encoder: Encoder | None
    timer: EncodeTimer = field(default_factory=EncodeTimer)
    committer: ShardCommitter | None = None
    load_s: float = 0.0  # weights, warm-up and nvJPEG set-up (after describing the model)
    embed_s: float = 0.0  # from a loaded, warmed-up model to the last commit
    main_cpu_s: float = 0.0  # this process's CPU seconds meanwhile: near embed_s means GIL-bound
    n_workers: int = 0
    feed: Feed | None = None
    compile: CompileChoice | None = None  # encoder.compile's decision and compile time (within load_s)
    finish_s: float = 0.0  # after the last commit: identity, tagging the run, ANN maintenance
    ray_report: dict[str, Any] = field(default_factory=dict)
    layout: RowLayout | None = None  # Ray runs: what the actors' encoder stores per row (for vector_sizes)


def run_report(run_id: str, started_at: datetime, wall_s: float, batch_size: int, model: Model, work: Work,
               embedding: Embedding, memory: MemoryProbe, sinks: list[Sink],
               maintenance: dict | None, imports_s: float = 0.0) -> dict[str, Any]:
    """Every field of report.json; SPEC.md's "Report" section says what each means."""
    plan, timer, committer, encoder = work.plan, embedding.timer, embedding.committer, embedding.encoder
    identity = embedding.identity
    # Loaded here, or by Ray's actors; a run with nothing to embed only described the model (config files).
    loaded = encoder is not None or bool(embedding.ray_report)
    written, failed = (committer.rows_written, committer.errors_written) if committer else (0, 0)
    embed_s = embedding.embed_s
    flops = timer.flops if timer.images else 0.0  # 0: an encoder encode/flops.py does not count (null below)
    return {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "model": identity["model"],
        "model_kind": identity["kind"],
        "smoke_test": bool(getattr(encoder, "smoke_test", False) or (model.described and model.described.smoke_test)),
        "fingerprint_id": fingerprint_id(identity),
        "fingerprint": identity,
        "model_loaded": loaded,
        "device": str(model.device),
        "dtype": identity["dtype"],
        **gpu_memory_peaks(model.device),
        "peak_vram_nvml_mb": memory.peak_nvml_used_mb,
        "gpu_busy_pct": memory.gpu_busy_pct,
        "batch_size": batch_size,
        "decode_workers": embedding.n_workers,
        "files_scanned": plan.n_scanned,
        "files_new": plan.n_new,
        "files_changed": plan.n_changed,
        "files_deleted": plan.n_deleted,
        "files_unchanged": plan.n_unchanged,
        "files_retried": plan.n_retried,
        "images_embedded": written,
        "images_encoded": timer.images,
        "images_reused": timer.reused,
        "images_gpu_decoded": timer.gpu_decoded,
        "oom_halvings": timer.oom_halvings,
        "errors": committer.error_reasons if committer else {},
        "error_rate": failed / (written + failed) if written + failed else 0.0,
        "wall_s": wall_s,
        "describe_s": model.describe_s,
        # The fixed cost around the embedding phase (SPEC): imports before the run started (CLI runs),
        # describing the model, then weights, decode workers, warm-up and compile; and what follows the last commit.
        "imports_s": imports_s,
        "startup_s": imports_s + model.describe_s + embedding.load_s,
        "compile_s": embedding.compile.compile_s if embedding.compile else 0.0,
        "compile": embedding.compile.report() if embedding.compile else None,
        "finish_s": embedding.finish_s,
        "model_load_s": model.describe_s + embedding.load_s if loaded else 0.0,
        "processing_s": wall_s - model.describe_s - embedding.load_s,
        "stage_s": {"scan": work.scan_s, "decode": timer.decode_s, "encode": timer.encode_s,
                    "write": committer.write_s if committer else 0.0},
        "decode_wait_s": timer.decode_wait_s,
        "first_decode_wait_s": timer.first_wait_s or 0.0,
        "embed_s": embed_s,
        "main_process_cpu_s": embedding.main_cpu_s,
        "images_per_s": written / embed_s if embed_s > 0 else 0.0,
        **vector_sizes(encoder if encoder is not None else embedding.layout, timer),
        "encode_images_per_s": timer.images / timer.encode_s if timer.encode_s > 0 else 0.0,
        # Model FLOPs (encode/flops.py) against the GPU's limit (an H200: ~790 dense bf16 TFLOP/s): over the whole
        # embedding phase, and over the main thread's time in the encoder alone.
        "flops_per_image": flops / timer.images if flops else None,
        "achieved_tflops": flops / embed_s / 1e12 if flops and embed_s > 0 else None,
        "model_tflops": flops / timer.encode_s / 1e12 if flops and timer.encode_s > 0 else None,
        "peak_host_rss_mb": memory.peak_host_rss_mb,
        "peak_host_pss_mb": memory.peak_host_pss_mb,
        "peak_main_rss_mb": memory.peak_main_rss_mb,
        "peak_workers_rss_mb": memory.peak_workers_rss_mb,
        "shards_committed": committer.shards if committer else 0,
        "output_rows": sinks[0].count_rows("images"),
        "output_error_rows": sinks[0].count_rows("errors"),
        "storage_bytes": sum(sink.storage_bytes() for sink in sinks),
        "sinks": [sink.name for sink in sinks],
        "index_maintenance": maintenance,
        **({"gpu_feed": embedding.feed.stats} if embedding.feed is not None else {}),
        **embedding.ray_report,
    }
