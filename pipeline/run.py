"""The orchestrator: scan -> plan -> decode pool -> encode -> sinks -> commit -> report."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.commit import ShardCommitter
from pipeline.config import Config
from pipeline.decode_setup import decode_setup, early_pool, open_pool, worker_count
from pipeline.embed import EncodeTimer, embed_stream
from pipeline.embed_groups import embed_groups
from pipeline.encoders import describe_model, load_encoder
from pipeline.encoders.base import Encoder
from pipeline.exitcodes import EXIT_OK, EXIT_TOO_MANY_ERRORS
from pipeline.feed import Feed
from pipeline.gpu_decode import GpuJpegDecoder
from pipeline.identity import check_identity, fingerprint_id, index_identity, write_identity
from pipeline.layout import is_grouped, row_extras, row_schema, vector_sizes, warm_up, wrap_encoder
from pipeline.lock import IndexLock
from pipeline.plan import make_plan
from pipeline.prefetch import prefetch
from pipeline.report import MemoryProbe, gpu_memory_peaks, progress_bar, write_report
from pipeline.reuse import VectorReuse, load_known_rows
from pipeline.scan import scan_table
from pipeline.sinks import finish_run, lance_versions, open_sinks, prepare_sinks
from pipeline.workers import Item

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any]
    report_dir: Path


def _pending_items(pending: Any, reuse: VectorReuse) -> Iterator[Item]:
    """(row, absolute path, hashes that need no decode) per pending file, one record batch at a time."""
    for batch in pending.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            path = os.path.join(row["root"], *row["path"].split("/"))
            yield row, path, reuse.hashes_for_size(row["size_bytes"])


def _remove_stale_temporaries(config: Config) -> None:
    """Half-written identity and report files of a killed run (Parquet parts: ParquetSink's own)."""
    for stale in [*config.index_dir.glob("*.embindex.tmp"), *Path(config.run.report_dir).glob("*/*.tmp")]:
        stale.unlink(missing_ok=True)


def run_index(config: Config, rebuild: bool = False, retry_errors: bool = False, progress: bool | None = None,
              encoder: Encoder | None = None, limit: int | None = None) -> RunResult:
    """Index the configured roots once; the caller maps exceptions to exit codes.

    The model's weights are loaded only when some file needs encoding: a night with nothing new
    reads config.json and the image processor, checks the index's identity, and stops there."""
    started_at = datetime.now(timezone.utc)
    run_id = started_at.strftime("%Y%m%dT%H%M%S_%fZ")
    wall_started = time.perf_counter()
    described = describe_model(config.encoder) if encoder is None else None
    on_ray = config.run.runner == "ray" and encoder is None  # `embindex bench` hands in a local encoder
    if on_ray:  # the model runs in Ray's actors: fingerprint it as they will load it
        from pipeline.ray_runner import actor_model_source

        described = actor_model_source(config, described)
    describe_s = time.perf_counter() - wall_started  # imports and config files: part of loading the model
    identity = index_identity(encoder.fingerprint() if encoder is not None else described.identity(), config.encoder)
    must_rebuild = check_identity(config, identity, rebuild)
    device = encoder.device if encoder is not None else described.device

    with IndexLock(str(config.index_dir)), MemoryProbe(device) as memory:
        _remove_stale_temporaries(config)
        sinks = open_sinks(config)
        if must_rebuild or rebuild:
            for sink in sinks:
                sink.drop()
        versions_before = lance_versions(sinks)

        scan_started = time.perf_counter()
        scan = scan_table(config.input.root, config.input.extensions, config.input.include_hidden,
                          config.input.follow_symlinks)
        indexed = sinks[0].existing("images")
        plan = make_plan(scan, indexed, sinks[0].existing("errors"), retry_errors)
        if limit is not None:  # `embindex bench --limit`: the first N pending files
            plan.pending = plan.pending.slice(0, limit)
        # Read the vectors that renamed, copied or touched files may reuse before anything is deleted.
        reuse = VectorReuse(load_known_rows(sinks[0], plan.pending, indexed), indexed, plan.pending)
        prepare_sinks(sinks, plan)
        scan_s = time.perf_counter() - scan_started
        log.info("scanned %d files: %d new, %d changed, %d deleted, %d unchanged", plan.n_scanned, plan.n_new,
                 plan.n_changed, plan.n_deleted, plan.n_unchanged)

        timer, model_load_s, n_workers, embed_s = EncodeTimer(), describe_s, 0, 0.0
        committer = ray_run = feed = None
        main_cpu_s = 0.0  # CPU seconds of this process's threads while embedding: near embed_s means GIL-bound
        if plan.pending.num_rows and on_ray:  # decode tasks and embed actors on a Ray cluster
            from pipeline.ray_runner import embed_on_ray

            ray_run = embed_on_ray(config, described, plan, reuse, sinks, progress)
            committer, timer, embed_s = ray_run.committer, ray_run.timer, ray_run.embed_s
            model_load_s += ray_run.model_load_s
            identity = {**identity, **ray_run.identity}
        elif plan.pending.num_rows:
            load_started = time.perf_counter()
            early = early_pool(config, described, plan.pending.num_rows) if encoder is None else None
            try:
                encoder = wrap_encoder(encoder or load_encoder(config.encoder, described), config.encoder)
            except BaseException:
                if early is not None:
                    early[1].close()
                raise
            model_load_s += time.perf_counter() - load_started
            embed_started, cpu_started = time.perf_counter(), time.process_time()
            identity = index_identity(encoder.fingerprint(), config.encoder)
            committer = ShardCommitter(sinks, row_schema(encoder), encoder.name, config.run.shard_size,
                                       row_extras(encoder))
            remote = getattr(encoder, "remote", False)  # encoder.kind http: the endpoint decodes the files' bytes
            if remote:
                from pipeline.remote import RemoteStream

                n_workers = worker_count(config, False, plan.pending.num_rows)
                stage = RemoteStream(encoder, n_workers, reuse, timer, config.decode.max_image_pixels)
                use_gpu, depth = False, 0
            else:
                setup = decode_setup(config, encoder.input_spec(), encoder.device, is_grouped(encoder),
                                     plan.pending.num_rows)
                if early is not None and early[0] != setup:  # the prediction missed: start over
                    log.info("decode workers restart: the model's input policy differs from its processor's")
                    early[1].close()
                    early = None
                stage = early[1] if early is not None else open_pool(config, setup)
                n_workers, use_gpu, depth = setup.n_workers, setup.use_gpu, setup.depth
            with stage as pool:
                # While the decode workers start: nvJPEG's and CUDA's lazy set-up and the kernels' choice
                # belong to loading, not to the first batch.
                warmed = time.perf_counter()
                gpu = GpuJpegDecoder(encoder.input_spec(), encoder.device) if use_gpu else None
                if not remote and encoder.device.type == "cuda":
                    warm_up(encoder, 1 if is_grouped(encoder) else config.encoder.batch_size)
                model_load_s += time.perf_counter() - warmed
                embed_started += time.perf_counter() - warmed
                items = _pending_items(plan.pending, reuse)
                if use_gpu:
                    feed = Feed(pool, gpu, config.decode.gpu_batch)
                    results = feed.stream(items)
                elif remote:
                    results = pool.imap(items)
                else:
                    results = prefetch(pool.imap(items, consumer_thread=True), depth)
                bar = progress_bar(plan.pending.num_rows, sys.stderr.isatty() if progress is None else progress)
                if remote:  # it yields the committer's events itself
                    events = results
                elif is_grouped(encoder):
                    events = embed_groups(results, encoder, config.encoder.batch_size, config.encoder.max_batch_tokens,
                                          pool.release, timer, reuse, config.encoder.pool_factor)
                else:
                    events = embed_stream(results, encoder, config.encoder.batch_size, pool.release, timer, reuse)
                for event in events:
                    committer.add(event)
                    bar.update(len(getattr(event, "items", [event])))
                committer.commit()
                bar.close()
            embed_s = time.perf_counter() - embed_started
            main_cpu_s = time.process_time() - cpu_started
        write_identity(config, identity)
        maintenance = None
        if lance_versions(sinks) != versions_before:
            maintenance = finish_run(sinks, run_id, config.search, identity.get("dim"))

    wall_s = time.perf_counter() - wall_started
    processing_s = wall_s - model_load_s
    written, failed = (committer.rows_written, committer.errors_written) if committer else (0, 0)
    report: dict[str, Any] = {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "model": identity["model"],
        "model_kind": identity["kind"],
        "smoke_test": bool(getattr(encoder, "smoke_test", False) or (described and described.smoke_test)),
        "fingerprint_id": fingerprint_id(identity),
        "fingerprint": identity,
        "model_loaded": encoder is not None,
        "device": str(device),
        "dtype": identity["dtype"],
        **gpu_memory_peaks(device),
        "peak_vram_nvml_mb": memory.peak_nvml_used_mb,
        "gpu_busy_pct": memory.gpu_busy_pct,
        "batch_size": config.encoder.batch_size,
        "decode_workers": n_workers,
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
        "model_load_s": model_load_s,
        "processing_s": processing_s,
        "stage_s": {"scan": scan_s, "decode": timer.decode_s, "encode": timer.encode_s,
                    "write": committer.write_s if committer else 0.0},
        "decode_wait_s": timer.decode_wait_s,
        "first_decode_wait_s": timer.first_wait_s or 0.0,
        "embed_s": embed_s,
        "main_process_cpu_s": main_cpu_s,
        "images_per_s": written / embed_s if embed_s > 0 else 0.0,
        **vector_sizes(encoder, timer),
        "encode_images_per_s": timer.images / timer.encode_s if timer.encode_s > 0 else 0.0,
        "peak_host_rss_mb": memory.peak_host_rss_mb,
        "peak_main_rss_mb": memory.peak_main_rss_mb,
        "peak_workers_rss_mb": memory.peak_workers_rss_mb,
        "shards_committed": committer.shards if committer else 0,
        "output_rows": sinks[0].count_rows("images"),
        "output_error_rows": sinks[0].count_rows("errors"),
        "storage_bytes": sum(sink.storage_bytes() for sink in sinks),
        "sinks": [sink.name for sink in sinks],
        "index_maintenance": maintenance,
        **({"gpu_feed": feed.stats} if feed is not None else {}),
        **(ray_run.report if ray_run is not None else {}),
    }
    folder = write_report(config.run.report_dir, report)
    too_many = report["error_rate"] > config.run.max_error_rate
    return RunResult(EXIT_TOO_MANY_ERRORS if too_many else EXIT_OK, report, folder)
