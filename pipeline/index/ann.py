"""Keep the table fast to search: compaction after each changing run, and an ANN index past a row count."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import SearchConfig

log = logging.getLogger(__name__)

# search.ann_index -> LanceDB's name of the index type (create_index's index_type; list_indices says "IvfSq")
INDEX_TYPES = {"ivf_pq": "IVF_PQ", "ivf_sq": "IVF_SQ", "ivf_rq": "IVF_RQ", "ivf_flat": "IVF_FLAT",
               "ivf_hnsw_sq": "IVF_HNSW_SQ"}


def vector_index_type(table: Any) -> str | None:
    """The vector index on `embedding` as create_index names it (IVF_SQ...), or None when there is none."""
    for index in table.list_indices():
        if "embedding" in index.columns:
            name = str(index.index_type)
            return name if "_" in name else _CAMEL.get(name, name.upper())
    return None


_CAMEL = {"IvfPq": "IVF_PQ", "IvfSq": "IVF_SQ", "IvfRq": "IVF_RQ", "IvfFlat": "IVF_FLAT",
          "IvfHnswSq": "IVF_HNSW_SQ", "IvfHnswPq": "IVF_HNSW_PQ", "IvfHnswFlat": "IVF_HNSW_FLAT"}


# Partitions are sized for the rows at build time and new rows only join existing ones: past twice those rows
# a probe scans twice the rows it did. A rebuild then costs 60-90 s at 1M rows (IVF_SQ, 2 cores).
REBUILD_GROWTH = 2.0


def _built_rows_path(table: Any) -> Path | None:
    """images.lance -> images.ann.json beside it (local tables only), where the build's row count is kept."""
    uri = str(getattr(table, "uri", "") or "")
    return None if not uri or "://" in uri else Path(uri).with_suffix(".ann.json")


def _built_rows(table: Any) -> int | None:
    path = _built_rows_path(table)
    try:
        return int(json.loads(path.read_text())["built_rows"]) if path is not None else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet (an index built before this file existed)
        return None


def _record_built_rows(table: Any, rows: int) -> None:
    path = _built_rows_path(table)
    if path is not None:
        path.write_text(json.dumps({"built_rows": rows}))


def has_vector_index(table: Any) -> bool:
    return vector_index_type(table) is not None


def index_config(kind: str, dim: int, partition_rows: int | None = None) -> Any:
    """LanceDB's config for search.ann_index `kind` over `dim`-d cosine vectors, `partition_rows` rows per
    IVF partition (None: LanceDB's default)."""
    from lancedb.index import HnswSq, IvfFlat, IvfPq, IvfRq, IvfSq

    options: dict[str, Any] = {"distance_type": "cosine", "target_partition_size": partition_rows}
    if kind == "ivf_pq":
        # 8 dimensions per PQ sub-vector keeps recall up with refine
        return IvfPq(num_sub_vectors=max(1, dim // 8), **options)
    if kind == "ivf_rq":
        # RaBitQ at 1 bit a dimension: 64 bytes a 512-d row; refine re-ranks with the stored vectors.
        return IvfRq(**options)
    if kind == "ivf_flat":
        return IvfFlat(**options)
    if kind == "ivf_hnsw_sq":
        return HnswSq(**options)
    # ivf_sq: 8 bits a dimension. Built in 28 s at 1M x 512 on 2 cores where IVF_PQ took 212-637 s, and it
    # keeps recall@10 >= 0.95 for text queries, which IVF_PQ drops to ~0.7 (docs/benchmarks.md, issue 21).
    return IvfSq(**options)


def maintain(table: Any, search: SearchConfig, dim: int) -> dict[str, Any]:
    """After a run changed `table`: build the ANN index once it is big enough, rebuild it when
    search.ann_index names another type than the one built or the table has grown REBUILD_GROWTH-fold since
    the build, else fold the new rows into it (LanceDB's optimize adds them to the existing partitions without
    retraining: 8.5 s for 10,000 new rows on 1M, against 60-90 s for a build); compact the shards' small files;
    prune untagged versions older than LanceDB's default 7 days (tagged runs stay for history and rollback).
    Returns what was done."""
    started = time.perf_counter()
    rows = table.count_rows()
    built = vector_index_type(table)
    wanted = INDEX_TYPES[search.ann_index]
    built_rows = _built_rows(table) if built is not None else None
    action = "compacted"
    if rows >= search.ann_min_rows and (built != wanted or (built_rows and rows >= REBUILD_GROWTH * built_rows)):
        config = index_config(search.ann_index, dim, search.ann_partition_rows)
        table.create_index("embedding", config=config, replace=True)
        _record_built_rows(table, rows)
        if built is None:
            action = f"built {wanted}"
        elif built != wanted:
            action = f"rebuilt {built} as {wanted}"
        else:
            action = f"rebuilt {wanted}: {built_rows} rows at the last build, {rows} now"
    table.optimize()  # compaction + adding new rows to existing indices + version cleanup
    seconds = time.perf_counter() - started
    log.info("index maintenance: %s over %d rows in %.1f s", action, rows, seconds)
    return {"action": action, "rows": rows, "seconds": seconds}
