"""LanceSink and ParquetSink: idempotent writes by (root, path), deletes, counts, storage and round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.index.schema import ERRORS_SCHEMA, error_rows, image_rows, images_schema
from pipeline.index.sinks.base import EXISTING_ERROR_COLUMNS, EXISTING_IMAGE_COLUMNS
from pipeline.index.sinks.lance import LanceSink
from pipeline.index.sinks.parquet import TMP_SUFFIX, ParquetSink

DIM = 4
SCHEMA = images_schema(DIM)
MODEL = "test-model"
KEYS = [
    ("/photos", "a.jpg"),
    ("/photos", "it's here.jpg"),
    ("/photos", "sub/ünïcödé & spaces.png"),
    ("/photos", "o''clock'.jpg"),
    ("/backup", "a.jpg"),  # the same path under another root
    ("/it's a root", "back\\slash\nnewline.jpg"),
]
def make_sink(kind: str, tmp_path: Path) -> LanceSink | ParquetSink:
    if kind == "lance":
        return LanceSink(str(tmp_path / "index"), "images")
    return ParquetSink(str(tmp_path / "embeddings"))


@pytest.fixture(params=["lance", "parquet"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> LanceSink | ParquetSink:
    return make_sink(request.param, tmp_path)


def vectors(n: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(n * DIM, dtype=np.float64).reshape(n, DIM) / 7 + offset)


def images(keys: list[tuple[str, str]] = KEYS, size: int = 100, offset: float = 0.0) -> pa.Table:
    n = len(keys)
    meta = {
        "root": [k[0] for k in keys], "path": [k[1] for k in keys], "size_bytes": [size] * n,
        "mtime_ns": [1_700_000_000_000_000_000 + i for i in range(n)], "content_hash": [f"h{i}" for i in range(n)],
        "width": [640] * n, "height": [480] * n,
    }
    return image_rows(meta, vectors(n, offset), MODEL, SCHEMA)


def errors(keys: list[tuple[str, str]] = (), reason: str = "truncated file", attempts: int = 1) -> pa.Table:
    n = len(keys)
    return error_rows({
        "root": [k[0] for k in keys], "path": [k[1] for k in keys], "size_bytes": [0] * n,
        "mtime_ns": [5] * n, "error": [reason] * n, "attempts": [attempts] * n,
    })


def no_errors() -> pa.Table:
    return errors([])


def key_table(keys: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"root": pa.array([k[0] for k in keys], pa.string()),
                     "path": pa.array([k[1] for k in keys], pa.string())})


def keys_of(table: pa.Table) -> list[tuple[str, str]]:
    return sorted((row["root"], row["path"]) for row in table.select(["root", "path"]).to_pylist())


def test_empty_sink(sink) -> None:
    assert sink.count_rows("images") == sink.count_rows("errors") == 0
    assert sink.existing("images").num_rows == 0
    assert sink.existing("images").column_names == EXISTING_IMAGE_COLUMNS
    assert sink.existing("errors").column_names == EXISTING_ERROR_COLUMNS
    sink.delete(key_table(KEYS[:1]), "images")  # deleting from nothing is fine
    assert sink.count_rows() == 0


def test_write_then_read_back_keys(sink) -> None:
    sink.write(images(), errors([("/photos", "bad.jpg")]))
    assert sink.count_rows("images") == len(KEYS)
    assert sink.count_rows("errors") == 1
    assert keys_of(sink.existing("images")) == sorted(KEYS)
    assert keys_of(sink.existing("errors")) == [("/photos", "bad.jpg")]


def test_existing_returns_key_and_change_columns(sink) -> None:
    sink.write(images(), errors([("/photos", "bad.jpg")], attempts=3))
    held = sink.existing("images")
    assert held.column_names == EXISTING_IMAGE_COLUMNS
    assert "embedding" not in held.column_names
    row = next(r for r in held.to_pylist() if (r["root"], r["path"]) == KEYS[1])
    assert row == {"root": "/photos", "path": "it's here.jpg", "size_bytes": 100,
                   "mtime_ns": 1_700_000_000_000_000_001, "content_hash": "h1", "width": 640, "height": 480}
    assert sink.existing("errors").to_pylist() == [
        {"root": "/photos", "path": "bad.jpg", "size_bytes": 0, "mtime_ns": 5, "attempts": 3},
    ]


@pytest.mark.parametrize("kind", ["lance"])
def test_writing_the_same_rows_twice_is_idempotent(kind: str, tmp_path: Path) -> None:
    sink = make_sink(kind, tmp_path)
    for _ in range(2):
        sink.write(images(), errors([("/photos", "bad.jpg")]))
    assert sink.count_rows("images") == len(KEYS)
    assert sink.count_rows("errors") == 1
    assert keys_of(sink.existing("images")) == sorted(KEYS)


@pytest.mark.parametrize("kind", ["lance"])
def test_a_new_size_replaces_the_old_row(kind: str, tmp_path: Path) -> None:
    sink = make_sink(kind, tmp_path)
    sink.write(images(), no_errors())
    sink.write(images(KEYS[:1], size=999, offset=1.0), no_errors())
    held = {(r["root"], r["path"]): r for r in sink.existing().to_pylist()}
    assert sink.count_rows() == len(KEYS)
    assert held[KEYS[0]]["size_bytes"] == 999
    assert held[KEYS[4]]["size_bytes"] == 100  # same path, other root: untouched


@pytest.mark.parametrize("kind", ["lance"])
def test_rewriting_errors_replaces_them(kind: str, tmp_path: Path) -> None:
    sink = make_sink(kind, tmp_path)
    sink.write(images([]), errors([("/photos", "bad.jpg")], attempts=1))
    sink.write(images([]), errors([("/photos", "bad.jpg")], attempts=2))
    assert sink.existing("errors")["attempts"].to_pylist() == [2]


def test_parquet_appends_and_the_run_deletes_first(tmp_path: Path) -> None:
    """Parquet parts are append-only (an upsert would rewrite every part per shard); the run deletes
    the keys it is about to rewrite, once, before writing (index.sinks.prepare_sinks)."""
    sink = make_sink("parquet", tmp_path)
    sink.write(images(), errors([("/photos", "bad.jpg")], attempts=1))
    sink.delete(pa.table({"root": [KEYS[0][0]], "path": [KEYS[0][1]]}), "images")
    sink.delete(pa.table({"root": ["/photos"], "path": ["bad.jpg"]}), "errors")
    sink.write(images(KEYS[:1], size=999, offset=1.0), errors([("/photos", "bad.jpg")], attempts=2))
    held = {(r["root"], r["path"]): r for r in sink.existing().to_pylist()}
    assert sink.count_rows() == len(KEYS)
    assert held[KEYS[0]]["size_bytes"] == 999
    assert sink.existing("errors")["attempts"].to_pylist() == [2]


def test_upsert_replaces_the_embedding_in_lance(tmp_path: Path) -> None:
    sink = make_sink("lance", tmp_path)
    sink.write(images(), no_errors())
    sink.write(images(KEYS[:1], size=999, offset=1.0), no_errors())
    row = next(r for r in sink.read().to_pylist() if (r["root"], r["path"]) == KEYS[0])
    np.testing.assert_allclose(row["embedding"], vectors(1, offset=1.0)[0], rtol=1e-6)


def test_delete_removes_exactly_the_given_keys(sink) -> None:
    sink.write(images(), no_errors())
    doomed = [("/photos", "it's here.jpg"), ("/photos", "sub/ünïcödé & spaces.png"), ("/photos", "o''clock'.jpg"),
              ("/it's a root", "back\\slash\nnewline.jpg")]
    sink.delete(key_table(doomed), "images")
    assert keys_of(sink.existing()) == sorted(set(KEYS) - set(doomed))
    assert sink.count_rows() == len(KEYS) - len(doomed)


def test_delete_of_a_path_only_touches_its_root(sink) -> None:
    sink.write(images(), no_errors())
    sink.delete(key_table([("/backup", "a.jpg")]), "images")
    remaining = keys_of(sink.existing())
    assert ("/photos", "a.jpg") in remaining and ("/backup", "a.jpg") not in remaining
    assert len(remaining) == len(KEYS) - 1


def test_delete_with_unknown_and_empty_keys_keeps_everything(sink) -> None:
    sink.write(images(), no_errors())
    sink.delete(key_table([("/elsewhere", "a.jpg"), ("/photos", "missing.jpg")]), "images")
    sink.delete(key_table([]), "images")
    assert sink.count_rows() == len(KEYS)


def test_delete_of_many_keys(sink) -> None:
    many = [("/photos", f"batch/{i:04d}'.jpg") for i in range(1_200)]  # more than one delete chunk
    sink.write(images(many), no_errors())
    sink.delete(key_table(many[:1_100]), "images")
    assert keys_of(sink.existing()) == sorted(many[1_100:])


def test_delete_is_per_table(sink) -> None:
    sink.write(images(KEYS[:2]), errors([("/photos", "bad.jpg"), KEYS[2]]))
    sink.delete(key_table([KEYS[2], KEYS[0]]), "errors")
    assert keys_of(sink.existing("errors")) == [("/photos", "bad.jpg")]
    assert keys_of(sink.existing("images")) == sorted(KEYS[:2])


def test_count_rows_storage_and_drop(sink) -> None:
    assert sink.storage_bytes() == 0
    sink.write(images(), errors([("/photos", "bad.jpg")]))
    assert sink.count_rows("images") == len(KEYS) and sink.count_rows("errors") == 1
    assert sink.storage_bytes() > 0
    sink.drop()
    assert sink.count_rows("images") == sink.count_rows("errors") == 0
    assert sink.existing().num_rows == 0
    sink.write(images(KEYS[:1]), no_errors())  # usable again after a drop
    assert sink.count_rows() == 1


def test_embeddings_round_trip_as_float32_fixed_size_lists(sink) -> None:
    sink.write(images(), no_errors())
    table = sink.read("images")
    field_type = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(field_type)
    assert field_type.list_size == DIM and field_type.value_type == pa.float32()
    by_key = {(r["root"], r["path"]): r for r in table.to_pylist()}
    stored = np.array([by_key[k]["embedding"] for k in KEYS], dtype=np.float32)
    np.testing.assert_array_equal(stored, vectors(len(KEYS)).astype(np.float32))
    assert {r["model"] for r in by_key.values()} == {MODEL}


def test_error_rows_round_trip(sink) -> None:
    sink.write(images([]), errors([("/photos", "bad.jpg")], reason="not an image", attempts=2))
    (row,) = sink.read("errors").to_pylist()
    assert (row["error"], row["attempts"], row["last_seen"] is not None) == ("not an image", 2, True)
    assert set(row) == set(ERRORS_SCHEMA.names)


def test_parquet_leaves_no_temporary_files(tmp_path: Path) -> None:
    sink = make_sink("parquet", tmp_path)
    sink.write(images(), errors([("/photos", "bad.jpg")]))
    sink.delete(key_table(KEYS[:1]), "images")  # rewrites a part file in place
    assert list(tmp_path.rglob(f"*{TMP_SUFFIX}")) == []
    assert len(list(tmp_path.rglob("*.parquet"))) == 2


def test_parquet_remove_temporary_files(tmp_path: Path) -> None:
    sink = make_sink("parquet", tmp_path)
    sink.write(images(), errors([("/photos", "bad.jpg")]))
    planted = [Path(sink.folders["images"]) / f".part-killed.parquet{TMP_SUFFIX}",
               Path(sink.folders["errors"]) / f".part-killed.parquet{TMP_SUFFIX}"]
    for path in planted:
        path.write_bytes(b"half a parquet file")
    # Dataset readers skip the dot-named temporary files even before they are cleaned up.
    assert ds.dataset(sink.folders["images"]).count_rows() == len(KEYS)
    assert sink.remove_temporary_files() == 2
    assert not any(path.exists() for path in planted)
    assert sink.count_rows() == len(KEYS)  # real parts untouched
    assert sink.remove_temporary_files() == 0


def test_parquet_delete_of_every_row_in_a_part_removes_the_file(tmp_path: Path) -> None:
    sink = make_sink("parquet", tmp_path)
    sink.write(images(KEYS[:2]), no_errors())
    sink.write(images(KEYS[2:]), no_errors())
    sink.delete(key_table(KEYS[:2]), "images")
    assert len(list(Path(sink.folders["images"]).glob("*.parquet"))) == 1
    assert keys_of(sink.existing()) == sorted(KEYS[2:])
