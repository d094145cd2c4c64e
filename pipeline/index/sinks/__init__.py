"""Open the configured sinks and bring them in line with a plan before a run writes."""

from __future__ import annotations

import pyarrow as pa

from pipeline.config import Config, SearchConfig
from pipeline.index.sinks.base import Sink
from pipeline.index.sinks.lance import LanceSink
from pipeline.index.sinks.parquet import ParquetSink


def open_sinks(config: Config) -> list[Sink]:
    """The configured sinks, primary first: LanceDB when configured, else Parquet."""
    sinks: list[Sink] = []
    if config.output.lancedb is not None:
        sinks.append(LanceSink(config.output.lancedb.uri, config.output.lancedb.table))
    if config.output.parquet is not None:
        sinks.append(ParquetSink(config.output.parquet.dir))
    return sinks


def prepare_sinks(sinks: list[Sink], pending: pa.Table, deleted_images: pa.Table, deleted_errors: pa.Table) -> None:
    """Make every sink agree with a run's plan before writing. Sinks that cannot upsert (Parquet) drop
    the rows about to be rewritten (`pending`'s keys); secondary sinks also drop orphans a killed run
    wrote after the primary's last commit. Then rows of deleted files go everywhere."""
    primary = sinks[0]
    for sink in sinks:
        if isinstance(sink, ParquetSink):
            sink.remove_temporary_files()
            for which in ("images", "errors"):
                doomed = [pending.select(["root", "path"])]
                if sink is not primary:
                    held = sink.existing(which).select(["root", "path"])
                    committed = primary.existing(which).select(["root", "path"])
                    doomed.append(held.join(committed, keys=["root", "path"], join_type="left anti"))
                sink.delete(pa.concat_tables(doomed), which)
        sink.delete(deleted_images, "images")
        sink.delete(deleted_errors, "errors")


def lance_versions(sinks: list[Sink]) -> dict[str, int]:
    return {k: v for sink in sinks if isinstance(sink, LanceSink) for k, v in sink.versions().items()}


def finish_run(sinks: list[Sink], run_id: str, search: SearchConfig, dim: int | None) -> dict | None:
    """After a run that changed the LanceDB tables: maintain the search index, then tag the final
    version with the run id (`embindex history` lists it, `embindex rollback` returns to it)."""
    from pipeline.index.ann import maintain

    done = None
    for sink in sinks:
        if isinstance(sink, LanceSink):
            table = sink._table("images")
            if table is not None and dim is not None:
                done = maintain(table, search, dim)
            sink.tag(run_id)
    return done
