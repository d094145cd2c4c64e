"""Keep the table fast to search: compaction after each changing run, and an ANN index past a row count."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import SearchConfig

log = logging.getLogger(__name__)

INDEX_TYPES = {"ivf_pq": "IVF_PQ", "ivf_hnsw_sq": "IVF_HNSW_SQ"}


def has_vector_index(table: Any) -> bool:
    return any("embedding" in index.columns for index in table.list_indices())


def maintain(table: Any, search: SearchConfig, dim: int) -> dict[str, Any]:
    """After a run changed `table`: build the ANN index once it is big enough, else fold new rows
    into it; compact the shards' small files; prune untagged versions older than LanceDB's
    default 7 days (tagged runs stay for history and rollback). Returns what was done."""
    started = time.perf_counter()
    rows = table.count_rows()
    action = "compacted"
    if rows >= search.ann_min_rows and not has_vector_index(table):
        index_type = INDEX_TYPES[search.ann_index]
        # PQ: 8 dimensions per sub-vector keeps recall high with refine; partitions default to ~sqrt(rows).
        options = {"num_sub_vectors": max(1, dim // 8)} if index_type == "IVF_PQ" else {}
        table.create_index(metric="cosine", vector_column_name="embedding", index_type=index_type, **options)
        action = f"built {index_type}"
    table.optimize()  # compaction + adding new rows to existing indices + version cleanup
    seconds = time.perf_counter() - started
    log.info("index maintenance: %s over %d rows in %.1f s", action, rows, seconds)
    return {"action": action, "rows": rows, "seconds": seconds}
