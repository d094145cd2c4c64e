"""Search settings: text queries take search.text_* where set; each index type gets only what it uses."""

from __future__ import annotations

from typing import Any

from pipeline.config import SearchConfig
from pipeline.search.settings import query_settings, tuned


class Recorder:
    """Stands in for a LanceDB query builder: records the settings it is given."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        def setter(value: Any) -> Recorder:
            self.calls[name] = value
            return self
        return setter


def test_text_queries_fall_back_to_the_image_settings() -> None:
    search = SearchConfig(nprobes=12, refine_factor=4)
    assert query_settings(search, "text") == query_settings(search, "image") == {"nprobes": 12, "refine_factor": 4}
    both = SearchConfig(nprobes=12, refine_factor=4, text_nprobes=30, text_refine_factor=8)
    assert query_settings(both, "text") == {"nprobes": 30, "refine_factor": 8}
    assert query_settings(both, "image") == {"nprobes": 12, "refine_factor": 4}


def test_each_index_type_gets_what_it_uses() -> None:
    search = SearchConfig(nprobes=12, refine_factor=4, ef=50)
    assert tuned(Recorder(), "IVF_SQ", search, "image").calls == {"nprobes": 12, "refine_factor": 4}
    assert tuned(Recorder(), "IVF_FLAT", search, "image").calls == {"nprobes": 12}  # exact already
    assert tuned(Recorder(), "IVF_HNSW_SQ", search, "image").calls == {"nprobes": 12, "ef": 50, "refine_factor": 4}
    no_refine = SearchConfig(refine_factor=None)
    assert "refine_factor" not in tuned(Recorder(), "IVF_PQ", no_refine, "text").calls
