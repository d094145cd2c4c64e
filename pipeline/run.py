"""The orchestrator: scan -> plan -> decode pool -> encode -> sinks -> commit -> report."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.commit import ShardCommitter
from pipeline.config import Config, ConfigError
from pipeline.embed import EncodeTimer, embed_stream
from pipeline.encoders import load_encoder
from pipeline.encoders.base import Encoder, fingerprint_id
from pipeline.exitcodes import EXIT_OK, EXIT_TOO_MANY_ERRORS
from pipeline.lock import IndexLock
from pipeline.plan import Plan, make_plan
from pipeline.report import MemoryProbe, write_report
from pipeline.reuse import VectorReuse, load_known_rows
from pipeline.scan import scan_table
from pipeline.schema import images_schema
from pipeline.sinks.base import Sink
from pipeline.sinks.lance import LanceSink
from pipeline.sinks.parquet import ParquetSink
from pipeline.workers import DecodePool, Item, usable_cores

log = logging.getLogger(__name__)



@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any]
    report_dir: Path


def open_sinks(config: Config, schema: pa.Schema) -> list[Sink]:
    """The configured sinks, primary first: LanceDB when configured, else Parquet."""
    sinks: list[Sink] = []
    if config.output.lancedb is not None:
        sinks.append(LanceSink(config.output.lancedb.uri, config.output.lancedb.table, schema))
    if config.output.parquet is not None:
        sinks.append(ParquetSink(config.output.parquet.dir, schema))
    return sinks


def _identity_path(config: Config) -> Path:
    table = config.output.lancedb.table if config.output.lancedb is not None else "images"
    return config.index_dir / f"{table}.embindex.json"


def check_identity(config: Config, encoder: Encoder, rebuild: bool) -> bool:
    """Refuse (exit 2) to mix vectors of another model or preprocessing into an existing index.
    Returns True when the index must be dropped and rebuilt."""
    path = _identity_path(config)
    if not path.exists():
        return False
    stored = json.loads(path.read_text())
    if stored.get("fingerprint_id") == fingerprint_id(encoder.fingerprint()):
        return False
    if rebuild:
        return True
    raise ConfigError(
        f"encoder.model: the index at {config.index_dir} was built with {stored.get('fingerprint', {}).get('model')!r} "
        f"({stored.get('fingerprint')}); this config gives {encoder.fingerprint()}. Vectors of different models or "
        "preprocessing must not mix: pass --rebuild to re-embed everything, or point output at a new index"
    )


def write_identity(config: Config, fingerprint: dict[str, Any]) -> None:
    path = _identity_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    identity = {"fingerprint_id": fingerprint_id(fingerprint), "fingerprint": fingerprint}
    temporary.write_text(json.dumps(identity, indent=2))
    os.replace(temporary, path)


def _prepare_sinks(sinks: list[Sink], plan: Plan) -> None:
    """Make every sink agree with the plan before writing. Sinks that cannot upsert (Parquet) drop
    the rows about to be rewritten; secondary sinks also drop orphans a killed run wrote after the
    primary's last commit. Then rows of deleted files go everywhere."""
    primary = sinks[0]
    for sink in sinks:
        if isinstance(sink, ParquetSink):
            sink.remove_temporary_files()
            for which in ("images", "errors"):
                doomed = [plan.pending.select(["root", "path"])]
                if sink is not primary:
                    held = sink.existing(which).select(["root", "path"])
                    committed = primary.existing(which).select(["root", "path"])
                    doomed.append(held.join(committed, keys=["root", "path"], join_type="left anti"))
                sink.delete(pa.concat_tables(doomed), which)
        sink.delete(plan.deleted_images, "images")
        sink.delete(plan.deleted_errors, "errors")


def _pending_items(pending: pa.Table, reuse: VectorReuse) -> Iterator[Item]:
    """(row, absolute path, hashes that need no decode) per pending file, one record batch at a time."""
    for batch in pending.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            yield row, os.path.join(row["root"], *row["path"].split("/")), reuse.hashes_for_size(row["size_bytes"])


def _lance_versions(sinks: list[Sink]) -> dict[str, int]:
    return {k: v for sink in sinks if isinstance(sink, LanceSink) for k, v in sink.versions().items()}


def _gpu_facts(encoder: Encoder) -> dict[str, Any]:
    import torch

    if encoder.device.type != "cuda":
        return {"gpu_name": None, "peak_vram_allocated_mb": 0.0, "peak_vram_reserved_mb": 0.0}
    mb = 1024 * 1024
    return {
        "gpu_name": torch.cuda.get_device_name(encoder.device),
        "peak_vram_allocated_mb": torch.cuda.max_memory_allocated(encoder.device) / mb,
        "peak_vram_reserved_mb": torch.cuda.max_memory_reserved(encoder.device) / mb,
    }


def run_index(config: Config, rebuild: bool = False, retry_errors: bool = False, progress: bool | None = None,
              encoder: Encoder | None = None) -> RunResult:
    """Index the configured roots once; the caller maps exceptions to exit codes."""
    started_at = datetime.now(timezone.utc)
    run_id = started_at.strftime("%Y%m%dT%H%M%S_%fZ")
    wall_started = time.perf_counter()
    encoder = encoder or load_encoder(config.encoder)
    model_load_s = time.perf_counter() - wall_started
    must_rebuild = check_identity(config, encoder, rebuild)
    schema = images_schema(encoder.dim)
    gpu_index = (encoder.device.index or 0) if encoder.device.type == "cuda" else None
    if gpu_index is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(encoder.device)

    with IndexLock(str(config.index_dir)), MemoryProbe(gpu_index) as memory:
        sinks = open_sinks(config, schema)
        if must_rebuild or rebuild:
            for sink in sinks:
                sink.drop()
        write_identity(config, encoder.fingerprint())
        versions_before = _lance_versions(sinks)

        scan_started = time.perf_counter()
        scan = scan_table(config.input.root, config.input.extensions, config.input.include_hidden,
                          config.input.follow_symlinks)
        indexed = sinks[0].existing("images")
        plan = make_plan(scan, indexed, sinks[0].existing("errors"), retry_errors)
        # Read the vectors that renamed, copied or touched files may reuse before anything is deleted.
        reuse = VectorReuse(load_known_rows(sinks[0], plan.pending, indexed), indexed, plan.pending)
        _prepare_sinks(sinks, plan)
        scan_s = time.perf_counter() - scan_started
        log.info("scanned %d files: %d new, %d changed, %d deleted, %d unchanged", plan.n_scanned, plan.n_new,
                 plan.n_changed, plan.n_deleted, plan.n_unchanged)

        committer = ShardCommitter(sinks, schema, encoder.name, config.run.shard_size)
        timer = EncodeTimer()
        decode_s = 0.0
        n_workers = usable_cores() if config.decode.workers == "auto" else config.decode.workers
        n_pending = plan.pending.num_rows
        if n_pending:
            n_workers = min(n_workers, n_pending)
            show = sys.stderr.isatty() if progress is None else progress
            with DecodePool(encoder.input_spec(), n_workers, config.decode.max_image_pixels, config.decode.timeout_s,
                            config.decode.jpeg_draft) as pool:
                results = pool.imap(_pending_items(plan.pending, reuse))
                bar = _progress(n_pending, show)
                for event in embed_stream(results, encoder, config.encoder.batch_size, pool.release, timer, reuse):
                    items = getattr(event, "items", [event])
                    decode_s += sum(item.decode_s for item in items)
                    committer.add(event)
                    bar.update(len(items))
                committer.commit()
                bar.close()
        if _lance_versions(sinks) != versions_before:
            for sink in sinks:
                if isinstance(sink, LanceSink):
                    sink.tag(run_id)  # `embindex history` lists it, `embindex rollback` returns to it

    wall_s = time.perf_counter() - wall_started
    processing_s = wall_s - model_load_s
    n_attempted = committer.rows_written + committer.errors_written
    report: dict[str, Any] = {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "model": encoder.name,
        "model_kind": encoder.kind,
        "smoke_test": getattr(encoder, "smoke_test", False),
        "fingerprint_id": fingerprint_id(encoder.fingerprint()),
        "device": str(encoder.device),
        "dtype": str(encoder.dtype).removeprefix("torch."),
        **_gpu_facts(encoder),
        "peak_vram_nvml_mb": memory.peak_nvml_used_mb,
        "batch_size": config.encoder.batch_size,
        "decode_workers": n_workers,
        "files_scanned": plan.n_scanned,
        "files_new": plan.n_new,
        "files_changed": plan.n_changed,
        "files_deleted": plan.n_deleted,
        "files_unchanged": plan.n_unchanged,
        "files_retried": plan.n_retried,
        "images_embedded": committer.rows_written,
        "images_encoded": timer.images,
        "images_reused": timer.reused,
        "errors": committer.error_reasons,
        "error_rate": committer.errors_written / n_attempted if n_attempted else 0.0,
        "wall_s": wall_s,
        "model_load_s": model_load_s,
        "processing_s": processing_s,
        "stage_s": {"scan": scan_s, "decode": decode_s, "encode": timer.encode_s, "write": committer.write_s},
        "decode_wait_s": timer.decode_wait_s,
        "images_per_s": committer.rows_written / processing_s if processing_s > 0 else 0.0,
        "encode_images_per_s": timer.images / timer.encode_s if timer.encode_s > 0 else 0.0,
        "fingerprint": encoder.fingerprint(),
        "peak_host_rss_mb": memory.peak_host_rss_mb,
        "peak_main_rss_mb": memory.peak_main_rss_mb,
        "peak_workers_rss_mb": memory.peak_workers_rss_mb,
        "shards_committed": committer.shards,
        "output_rows": sinks[0].count_rows("images"),
        "output_error_rows": sinks[0].count_rows("errors"),
        "storage_bytes": sum(sink.storage_bytes() for sink in sinks),
        "sinks": [sink.name for sink in sinks],
    }
    folder = write_report(config.run.report_dir, report)
    too_many = report["error_rate"] > config.run.max_error_rate
    return RunResult(EXIT_TOO_MANY_ERRORS if too_many else EXIT_OK, report, folder)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)
