"""SearchTable: one handle for many searches that still follows every commit, and facts re-read per version."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.index.schema import images_schema
from pipeline.search.table import QueryError, SearchTable

DIM = 8


def rows(n: int, first: int = 0) -> pa.Table:
    vectors = np.random.default_rng(first).normal(size=(n, DIM)).astype(np.float32)
    return pa.table({"root": ["/r"] * n, "path": [f"{i}.jpg" for i in range(first, first + n)],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)})


def test_a_missing_table_says_run_first(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="run `embindex run` first"):
        SearchTable(str(tmp_path / "index"), "images")


def test_an_empty_table_says_so(tmp_path: Path) -> None:
    lancedb.connect(str(tmp_path / "index")).create_table("images", schema=images_schema(DIM))
    with pytest.raises(QueryError, match="is empty"):
        SearchTable(str(tmp_path / "index"), "images").current()


def test_commits_by_another_writer_are_seen_with_the_same_handle(tmp_path: Path) -> None:
    writer = lancedb.connect(str(tmp_path / "index")).create_table("images", rows(10))
    searched = SearchTable(str(tmp_path / "index"), "images")
    handle = searched.table
    first = searched.current()
    assert first.rows == 10 and first.index_type is None and not first.multivector and not first.tiles
    assert searched.current() is first  # same version: the facts are not read again
    writer.add(rows(5, 10))
    second = searched.current()
    assert second.version > first.version and second.rows == 15
    assert searched.table is handle
    query = rows(5, 10)["embedding"][2].values.to_numpy()  # row 12
    hits = searched.table.search(query, vector_column_name="embedding").limit(1).to_arrow()
    assert hits["path"].to_pylist() == ["12.jpg"]


def test_a_dropped_and_rewritten_table_is_renewed(tmp_path: Path) -> None:
    db = lancedb.connect(str(tmp_path / "index"))
    written = db.create_table("images", rows(10))
    written.add(rows(10, 10))  # a run commits shard after shard: versions 1, 2, 3
    written.add(rows(10, 20))
    searched = SearchTable(str(tmp_path / "index"), "images")
    assert searched.current().rows == 30
    db.drop_table("images")  # what `embindex run --rebuild` does
    db.create_table("images", rows(3, 100))
    assert searched.renew().rows == 3
    db.drop_table("images")
    with pytest.raises(QueryError, match="run `embindex run` first"):
        searched.renew()
