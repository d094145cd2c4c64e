"""Run history from LanceDB tags, and rollback of the index to the end of a past run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.index.identity import write_identity
from pipeline.index.lock import IndexLock
from pipeline.index.sinks.lance import LanceSink
from pipeline.index.sinks.parquet import ParquetSink

EXPORT_ROWS = 8192  # rows per Parquet part when the dataset is rewritten after a rollback


def _lance(config: Config) -> LanceSink:
    if config.output.lancedb is None:
        raise ConfigError("output.lancedb: history and rollback need the LanceDB sink (Parquet keeps no versions)")
    return LanceSink(config.output.lancedb.uri, config.output.lancedb.table)


def _report(config: Config, run_id: str) -> dict[str, Any]:
    path = Path(config.run.report_dir) / run_id / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


def list_history(config: Config) -> list[dict[str, Any]]:
    """One entry per tagged run, oldest first: run id, version, time and the run's counts."""
    entries = []
    for run_id, tag in _lance(config).tags().items():
        report = _report(config, run_id)
        entries.append({
            "run_id": run_id,
            "version": tag["version"],
            "committed_at": tag["timestamp"],
            **{key: report.get(key) for key in ("files_new", "files_changed", "files_deleted", "images_embedded",
                                                 "output_rows", "model")},
        })
    return sorted(entries, key=lambda entry: entry["version"])


def rollback(config: Config, run_id: str) -> dict[str, int]:
    """Restore the tables to the end of run_id; the Parquet dataset is rewritten to match."""
    sink = _lance(config)
    if run_id not in sink.tags():
        known = ", ".join(entry["run_id"] for entry in list_history(config)) or "none"
        raise ConfigError(f"RUN_ID: no run {run_id!r} in the history of {config.output.lancedb.uri} (runs: {known})")
    with IndexLock(str(config.index_dir)):
        sink.restore(run_id)
        report = _report(config, run_id)
        if "fingerprint" in report:  # the restored rows' model identity
            write_identity(config, report["fingerprint"])
        if config.output.parquet is not None:
            images, errors = sink.read("images"), sink.read("errors")
            parquet = ParquetSink(config.output.parquet.dir)
            parquet.drop()
            for start in range(0, max(images.num_rows, errors.num_rows), EXPORT_ROWS):
                parquet.write(images.slice(start, EXPORT_ROWS), errors.slice(start, EXPORT_ROWS))
        return {"images": sink.count_rows("images"), "errors": sink.count_rows("errors")}
