"""Search-time settings of a LanceDB vector query: image or text queries, per index type."""

from __future__ import annotations

from typing import Any, Literal

from pipeline.config import SearchConfig

Modality = Literal["image", "text"]
RESULT_COLUMNS = ["path", "root", "size_bytes", "mtime_ns", "width", "height", "content_hash"]


def query_settings(search: SearchConfig, modality: Modality) -> dict[str, int | None]:
    """nprobes and refine_factor for this kind of query: text queries take search.text_* where set."""
    if modality == "text":
        return {"nprobes": search.text_nprobes or search.nprobes,
                "refine_factor": search.text_refine_factor or search.refine_factor}
    return {"nprobes": search.nprobes, "refine_factor": search.refine_factor}


def tuned(query: Any, index_type: str, search: SearchConfig, modality: Modality) -> Any:
    """`query` (a LanceDB vector query) with the settings for the index it will use."""
    settings = query_settings(search, modality)
    query = query.nprobes(settings["nprobes"])
    if index_type.startswith("IVF_HNSW"):
        query = query.ef(search.ef)
    # IVF_FLAT holds the vectors themselves: re-ranking would read the same distances again from disk
    if settings["refine_factor"] and index_type != "IVF_FLAT":
        query = query.refine_factor(settings["refine_factor"])
    return query
