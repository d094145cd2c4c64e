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
        from lancedb.index import HnswSq, IvfPq

        if search.ann_index == "ivf_pq":
            # 8 dimensions per PQ sub-vector keeps recall up with refine; partitions default to ~sqrt(rows).
            config = IvfPq(distance_type="cosine", num_sub_vectors=max(1, dim // 8))
        else:
            config = HnswSq(distance_type="cosine")
        table.create_index("embedding", config=config)
        action = f"built {INDEX_TYPES[search.ann_index]}"
    table.optimize()  # compaction + adding new rows to existing indices + version cleanup
    seconds = time.perf_counter() - started
    log.info("index maintenance: %s over %d rows in %.1f s", action, rows, seconds)
    return {"action": action, "rows": rows, "seconds": seconds}
