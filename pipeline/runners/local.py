"""The local runner: scan -> plan -> decode pool -> encode -> sinks -> commit -> report, on this machine."""

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

from pipeline.config import Config
from pipeline.decode.feed import Feed
from pipeline.decode.nvjpeg import GpuJpegDecoder
from pipeline.decode.prefetch import prefetch
from pipeline.decode.setup import DecodeSetup, decode_setup, early_pool, open_pool, worker_count
from pipeline.encode.compiled import CompileChoice, choose, compile_encoder
from pipeline.encode.groups import embed_groups
from pipeline.encode.layout import is_grouped, row_extras, row_schema, warm_up, wrap_encoder
from pipeline.encode.models.base import Encoder
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.encode.stream import EncodeTimer, embed_stream
from pipeline.errors import EXIT_OK, EXIT_TOO_MANY_ERRORS
from pipeline.index.commit import ShardCommitter
from pipeline.index.identity import check_identity, index_identity, write_identity
from pipeline.index.lock import IndexLock
from pipeline.index.sinks import finish_run, lance_versions, open_sinks, prepare_sinks
from pipeline.index.sinks.base import Sink
from pipeline.plan.diff import make_plan
from pipeline.plan.reuse import VectorReuse, load_known_rows
from pipeline.plan.scan import scan_table
from pipeline.records import Item
from pipeline.report import MemoryProbe, progress_bar, write_report
from pipeline.runners.summary import Embedding, Model, Work, run_report

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any]
    report_dir: Path


def run_index(config: Config, rebuild: bool = False, retry_errors: bool = False, progress: bool | None = None,
              encoder: Encoder | None = None, limit: int | None = None, lock: IndexLock | None = None,
              process_started: float | None = None) -> RunResult:
    """Index the configured roots once; the caller maps exceptions to exit codes.

    The model's weights are loaded only when some file needs encoding: a night with nothing new
    reads config.json and the image processor, checks the index's identity, and stops there.
    `encoder`: a loaded one (`embindex bench`); `limit`: only the first N pending files; `lock`: the
    index lock if the caller holds it already (the CLI takes it first), else it is taken here;
    `process_started`: the process's start (epoch seconds), so the report counts the imports before this call."""
    started_at, wall_started = datetime.now(timezone.utc), time.perf_counter()
    imports_s = max(0.0, started_at.timestamp() - process_started) if process_started is not None else 0.0
    run_id = started_at.strftime("%Y%m%dT%H%M%S_%fZ")
    model = _describe(config, encoder, wall_started)
    must_rebuild = check_identity(config, model.identity, rebuild)
    with lock or IndexLock(str(config.index_dir)), MemoryProbe(model.device) as memory:
        sinks = _open_index(config, drop=must_rebuild or rebuild)
        versions_before = lance_versions(sinks)
        work = _plan_work(config, sinks, retry_errors, limit)
        embedding = _embed(config, model, work, sinks, progress)
        finish_started = time.perf_counter()
        write_identity(config, embedding.identity)
        maintenance = None
        if lance_versions(sinks) != versions_before:  # tag the run, keep the ANN index up to date
            maintenance = finish_run(sinks, run_id, config.search, embedding.identity.get("dim"))
    embedding.finish_s = time.perf_counter() - finish_started
    report = run_report(run_id, started_at, time.perf_counter() - wall_started, config.encoder.batch_size, model,
                        work, embedding, memory, sinks, maintenance, imports_s)
    folder = write_report(config.run.report_dir, report)
    too_many = report["error_rate"] > config.run.max_error_rate
    return RunResult(EXIT_TOO_MANY_ERRORS if too_many else EXIT_OK, report, folder)


def _describe(config: Config, encoder: Encoder | None, wall_started: float) -> Model:
    """The model's identity from config.json and its processor (or from the encoder handed in): no weights."""
    described = describe_model(config.encoder) if encoder is None else None
    on_ray = config.run.runner == "ray" and encoder is None  # `embindex bench` hands in a local encoder
    if on_ray:  # the model runs in Ray's actors: fingerprint it as they will load it
        from pipeline.runners.ray_driver import actor_model_source

        described = actor_model_source(config, described)
    describe_s = time.perf_counter() - wall_started
    identity = index_identity(encoder.fingerprint() if encoder is not None else described.identity(), config.encoder)
    device = encoder.device if encoder is not None else described.device
    return Model(described, encoder, on_ray, identity, device, describe_s)


def _open_index(config: Config, drop: bool) -> list[Sink]:
    """The sinks, primary first, after removing what a killed run left half-written."""
    for stale in [*config.index_dir.glob("*.embindex.tmp"), *Path(config.run.report_dir).glob("*/*.tmp")]:
        stale.unlink(missing_ok=True)  # identity and report files (Parquet parts: ParquetSink's own)
    sinks = open_sinks(config)
    if drop:
        for sink in sinks:
            sink.drop()
    return sinks


def _plan_work(config: Config, sinks: list[Sink], retry_errors: bool, limit: int | None) -> Work:
    """Scan, diff against the primary sink, read the vectors renamed or copied files may reuse (before
    anything is deleted), then bring every sink in line with the plan."""
    started = time.perf_counter()
    scan = scan_table(config.input.root, config.input.extensions, config.input.include_hidden,
                      config.input.follow_symlinks)
    indexed = sinks[0].existing("images")
    plan = make_plan(scan, indexed, sinks[0].existing("errors"), retry_errors)
    if limit is not None:  # `embindex bench --limit`: the first N pending files
        plan.pending = plan.pending.slice(0, limit)
    reuse = VectorReuse(load_known_rows(sinks[0], plan.pending, indexed), indexed, plan.pending)
    prepare_sinks(sinks, plan.pending, plan.deleted_images, plan.deleted_errors)
    scan_s = time.perf_counter() - started
    log.info("scanned %d files: %d new, %d changed, %d deleted, %d unchanged", plan.n_scanned, plan.n_new,
             plan.n_changed, plan.n_deleted, plan.n_unchanged)
    return Work(plan, reuse, scan_s)


def _embed(config: Config, model: Model, work: Work, sinks: list[Sink], progress: bool | None) -> Embedding:
    """Nothing to do, the Ray cluster's actors, or this machine's decode pool and encoder."""
    if not work.plan.pending.num_rows:
        return Embedding(model.identity, model.encoder)
    if model.on_ray:
        from pipeline.runners.ray_driver import embed_on_ray

        ray_run = embed_on_ray(config, model.described, work.plan, work.reuse, sinks, progress)
        return Embedding({**model.identity, **ray_run.identity}, None, ray_run.timer, ray_run.committer,
                         ray_run.model_load_s, ray_run.embed_s, ray_report=ray_run.report, layout=ray_run.layout)
    return _embed_here(config, model, work, sinks, progress)


def _embed_here(config: Config, model: Model, work: Work, sinks: list[Sink], progress: bool | None) -> Embedding:
    """Load the model while the decode workers start, then stream every pending file to the sinks."""
    n_files, load_started = work.plan.pending.num_rows, time.perf_counter()
    encoder, early = _load_encoder(config, model, n_files)
    load_s = time.perf_counter() - load_started
    embed_started, cpu_started = time.perf_counter(), time.process_time()
    done = Embedding(index_identity(encoder.fingerprint(), config.encoder), encoder, load_s=load_s)
    done.committer = ShardCommitter(sinks, row_schema(encoder), encoder.name, config.run.shard_size,
                                    row_extras(encoder))
    stage, setup, done.n_workers = _decode_stage(config, encoder, n_files, early, work.reuse, done.timer)
    with stage as pool:
        # While the decode workers start: nvJPEG's and CUDA's lazy set-up and the kernels' choice
        # belong to loading, not to the first batch.
        warmed = time.perf_counter()
        gpu = GpuJpegDecoder(encoder.input_spec(), encoder.device) if setup and setup.use_gpu else None
        if setup is not None and encoder.device.type == "cuda":
            warm_up(encoder, 1 if is_grouped(encoder) else config.encoder.batch_size)
        done.compile = _compile(config, encoder, n_files)
        done.load_s += time.perf_counter() - warmed
        embed_started += time.perf_counter() - warmed
        events, done.feed = _events(config, encoder, pool, setup, gpu, work, done.timer)
        bar = progress_bar(n_files, sys.stderr.isatty() if progress is None else progress)
        for event in events:
            done.committer.add(event)
            bar.update(len(getattr(event, "items", [event])))
        done.committer.commit()
        bar.close()
    done.embed_s = time.perf_counter() - embed_started
    done.main_cpu_s = time.process_time() - cpu_started
    return done


def _load_encoder(config: Config, model: Model, n_files: int) -> tuple[Encoder, tuple[DecodeSetup, Any] | None]:
    """The encoder, wrapped for the run; decode workers start first where the input policy is known without it."""
    early = early_pool(config, model.described, n_files) if model.encoder is None else None
    try:
        return wrap_encoder(model.encoder or load_encoder(config.encoder, model.described), config.encoder), early
    except BaseException:
        if early is not None:
            early[1].close()
        raise


def _compile(config: Config, encoder: Encoder, n_files: int) -> CompileChoice:
    """encoder.compile: decide (auto measures an eager batch), and compile now if so: part of the start-up."""
    choice = choose(config.encoder.compile, encoder, n_files, config.encoder.batch_size)
    if choice.enabled:
        compile_encoder(encoder, choice, config.encoder.batch_size)
    log.info("encoder.compile: %s", choice.reason)
    return choice


def _decode_stage(config: Config, encoder: Encoder, n_files: int, early: tuple[DecodeSetup, Any] | None,
                  reuse: VectorReuse, timer: EncodeTimer) -> tuple[Any, DecodeSetup | None, int]:
    """(stage, its decode setup, workers): the decode pool (the early one if its setup still holds), or for
    encoder.kind http the remote stream, which sends the files' bytes to the endpoint (setup None)."""
    if getattr(encoder, "remote", False):
        from pipeline.runners.remote import RemoteStream

        n_workers = worker_count(config, False, n_files)
        return RemoteStream(encoder, n_workers, reuse, timer, config.decode.max_image_pixels), None, n_workers
    setup = decode_setup(config, encoder.input_spec(), encoder.device, is_grouped(encoder), n_files)
    if early is not None and early[0] != setup:  # the prediction missed: start over
        log.info("decode workers restart: the model's input policy differs from its processor's")
        early[1].close()
        early = None
    return (early[1] if early is not None else open_pool(config, setup)), setup, setup.n_workers


def _events(config: Config, encoder: Encoder, pool: Any, setup: DecodeSetup | None, gpu: GpuJpegDecoder | None,
            work: Work, timer: EncodeTimer) -> tuple[Iterator[Any], Feed | None]:
    """The committer's events (embedded batches and error rows) from the stage, and the nvJPEG feed if any."""
    items = _pending_items(work.plan.pending, work.reuse)
    if setup is None:  # the remote stream yields the committer's events itself
        return pool.imap(items), None
    feed = Feed(pool, gpu, config.decode.gpu_batch) if gpu is not None else None
    results = feed.stream(items) if feed is not None else prefetch(pool.imap(items, consumer_thread=True), setup.depth)
    if is_grouped(encoder):
        return embed_groups(results, encoder, config.encoder.batch_size, config.encoder.max_batch_tokens,
                            pool.release, timer, work.reuse, config.encoder.pool_factor), feed
    return embed_stream(results, encoder, config.encoder.batch_size, pool.release, timer, work.reuse), feed


def _pending_items(pending: Any, reuse: VectorReuse) -> Iterator[Item]:
    """(row, absolute path, hashes that need no decode) per pending file, one record batch at a time."""
    for batch in pending.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            path = os.path.join(row["root"], *row["path"].split("/"))
            yield row, path, reuse.hashes_for_size(row["size_bytes"])
