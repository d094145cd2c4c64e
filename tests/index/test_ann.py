"""ANN maintenance: the configured type is built past the threshold, rebuilt on a change; new rows are folded in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import SearchConfig
from pipeline.index.ann import INDEX_TYPES, has_vector_index, maintain, vector_index_type

DIM = 16


def rows(n: int, first: int, rng: np.random.Generator) -> pa.Table:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table({"root": ["/r"] * n, "path": [f"{i}.jpg" for i in range(first, first + n)],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)})


def table(tmp_path: Path, n: int = 600) -> Any:
    return lancedb.connect(str(tmp_path / "index")).create_table("images", rows(n, 0, np.random.default_rng(0)))


def test_below_the_threshold_only_compaction(tmp_path: Path) -> None:
    images = table(tmp_path)
    done = maintain(images, SearchConfig(ann_min_rows=1000), DIM)
    assert done["action"] == "compacted" and done["rows"] == 600 and not has_vector_index(images)


@pytest.mark.parametrize("kind", sorted(INDEX_TYPES))
def test_each_type_is_built_and_named(tmp_path: Path, kind: str) -> None:
    images = table(tmp_path)
    done = maintain(images, SearchConfig(ann_min_rows=100, ann_index=kind), DIM)
    assert done["action"] == f"built {INDEX_TYPES[kind]}"
    assert vector_index_type(images) == INDEX_TYPES[kind]


def test_a_type_change_rebuilds_and_new_rows_are_folded_in(tmp_path: Path) -> None:
    images = table(tmp_path)
    maintain(images, SearchConfig(ann_min_rows=100, ann_index="ivf_sq"), DIM)
    images.add(rows(50, 600, np.random.default_rng(1)))
    done = maintain(images, SearchConfig(ann_min_rows=100, ann_index="ivf_sq"), DIM)
    assert done["action"] == "compacted"  # no rebuild for new rows...
    index = images.list_indices()[0]
    assert index.num_indexed_rows == 650 and index.num_unindexed_rows == 0  # ...they are in the index
    done = maintain(images, SearchConfig(ann_min_rows=100, ann_index="ivf_flat"), DIM)
    assert done["action"] == "rebuilt IVF_SQ as IVF_FLAT" and vector_index_type(images) == "IVF_FLAT"
    assert len(images.list_indices()) == 1


def test_a_table_grown_twofold_since_the_build_is_rebuilt(tmp_path: Path) -> None:
    images = table(tmp_path)
    search = SearchConfig(ann_min_rows=100)
    assert maintain(images, search, DIM)["action"] == "built IVF_SQ"
    assert (tmp_path / "index" / "images.ann.json").is_file()
    images.add(rows(500, 600, np.random.default_rng(1)))
    assert maintain(images, search, DIM)["action"] == "compacted"  # 1,100 rows: under twice the 600 built
    images.add(rows(100, 1100, np.random.default_rng(2)))
    assert maintain(images, search, DIM)["action"] == "rebuilt IVF_SQ: 600 rows at the last build, 1200 now"
    assert maintain(images, search, DIM)["action"] == "compacted"


def test_the_default_is_ivf_sq() -> None:
    assert SearchConfig().ann_index == "ivf_sq"


def test_partition_rows_reach_lancedb() -> None:
    from pipeline.index.ann import index_config

    for kind in INDEX_TYPES:
        assert index_config(kind, DIM, 1024).target_partition_size == 1024
        assert index_config(kind, DIM).target_partition_size is None  # LanceDB's default
    assert index_config("ivf_pq", 512).num_sub_vectors == 64
