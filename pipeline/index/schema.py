"""The Arrow schemas of the `images` and `images_errors` tables, and builders for their rows."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

KEY_COLUMNS = ["root", "path"]  # a file is identified by its root and its POSIX path below it
TIMESTAMP = pa.timestamp("us", tz="UTC")


FLOAT32 = pa.float32()
FLOAT16 = pa.float16()
# Where each vector of a pyramid-tile row came from: grid level, row and column (level 0 = whole image)
TILE_TYPE = pa.struct([("level", pa.int8()), ("row", pa.int8()), ("col", pa.int8())])
# Qwen3-VL's DeepStack: beside the image tokens' features (`embedding`) its language model takes those of a few
# vision layers, a vector per image token each. A row stores one list of per-token vectors per layer; from the
# encoder to the commit (and in the reuse of identical bytes) a row's tokens travel packed, (n, (1 + layers) * dim),
# the embedding first.
DEEPSTACK = "deepstack"
# Per-row columns an encoder adds, computed from the image's size alone (encode/layout.row_extras): identical
# bytes have identical values, so a reused vector takes them from its indexed row.
SIZE_EXTRAS = ("tiles", "image_grid_thw")


def images_schema(dim: int, vector_type: pa.DataType = FLOAT32, multivector: bool = False,
                  extra_fields: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """Single-vector rows hold `fixed_size_list<float>[dim]`; multi-vector rows (late interaction, pyramid
    tiles) hold `list<fixed_size_list<float>[dim]>` (only real tokens) and their count `n_vectors`."""
    vector = pa.list_(vector_type, dim)
    fields = [
        ("path", pa.string()),
        ("root", pa.string()),
        ("size_bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),
        ("embedding", pa.list_(vector) if multivector else vector),
    ]
    if multivector:
        fields.append(("n_vectors", pa.int32()))
    fields.extend((extra_fields or {}).items())
    fields.append(("indexed_at", TIMESTAMP))
    return pa.schema(fields)


def deepstack_type(dim: int) -> pa.DataType:
    """list (layers) of list (image tokens) of fixed_size_list<float16>[dim], as the multi-vector embedding."""
    return pa.list_(pa.list_(pa.list_(FLOAT16, dim)))


def pack_deepstack(embedding: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """(n, dim) and (layers, n, dim) -> (n, (1 + layers) * dim)."""
    return np.concatenate([embedding, *layers], axis=1)


def unpack_deepstack(packed: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, (1 + layers) * dim) -> the embedding (n, dim) and the layers (layers, n, dim)."""
    stacked = packed.reshape(len(packed), -1, dim).transpose(1, 0, 2)
    return stacked[0], stacked[1:]


def _offsets(counts: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))


def deepstack_column(values: list[np.ndarray], kind: pa.DataType) -> pa.Array:
    """One (layers, n, dim) array per row -> the column, built from offsets (not from Python lists)."""
    vector = kind.value_type.value_type
    flat = np.concatenate([v.reshape(-1) for v in values]) if values else np.zeros(0)
    vectors = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(flat, vector.value_type.to_pandas_dtype())), vector.list_size)
    layers = pa.ListArray.from_arrays(_offsets([v.shape[1] for v in values for _ in range(len(v))]), vectors,
                                      type=kind.value_type)
    return pa.ListArray.from_arrays(_offsets([len(v) for v in values]), layers, type=kind)


def deepstack_of(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """A deepstack column -> one float32 (layers, n, dim) array per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    dim = column.type.value_type.value_type.list_size
    rows, tokens = column.offsets.to_numpy(), column.values.offsets.to_numpy()
    flat = column.values.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return [flat[tokens[start]:tokens[end]].reshape(end - start, -1, dim) for start, end in zip(rows[:-1], rows[1:])]


def is_multivector(schema: pa.Schema) -> bool:
    return pa.types.is_list(schema.field("embedding").type)


def vector_field(schema: pa.Schema) -> pa.FixedSizeListType:
    """The type of one vector: the column itself, or its list's items for multi-vector tables."""
    kind = schema.field("embedding").type
    return kind.value_type if is_multivector(schema) else kind


ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("root", pa.string()),
        ("size_bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("last_seen", TIMESTAMP),
    ]
)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def embedding_column(embeddings: np.ndarray | list[np.ndarray], schema: pa.Schema) -> tuple[pa.Array, list[int]]:
    """(N, dim) floats, or one (n_i, dim) array per row for multi-vector tables -> the column, vector counts."""
    kind = vector_field(schema)
    numpy_type = kind.value_type.to_pandas_dtype()
    if not is_multivector(schema):
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=numpy_type).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size), []
    counts = [len(vectors) for vectors in embeddings]
    stacked = np.concatenate(embeddings) if counts else np.zeros((0, kind.list_size))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(stacked, numpy_type).reshape(-1)),
                                                kind.list_size)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, vectors, type=schema.field("embedding").type), counts


def vectors_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray | list[np.ndarray]:
    """An embedding column as float32: (N, dim) for single vectors, a list of (n_i, dim) for multi-vector."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        dim = column.type.value_type.list_size
        flat = column.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        offsets = column.offsets.to_numpy()
        return [flat[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def image_rows(meta: dict[str, list], embeddings: np.ndarray | list[np.ndarray], model: str,
               schema: pa.Schema) -> pa.Table:
    """One row per embedded file; `meta` holds the per-file columns (and any extra fields of the schema)."""
    n = len(meta["path"])
    column, counts = embedding_column(embeddings, schema)
    columns = {
        **{name: pa.array(meta[name], schema.field(name).type) for name in
           ("path", "root", "size_bytes", "mtime_ns", "content_hash", "width", "height")},
        "model": pa.array([model] * n, pa.string()),
        "embedding": column,
    }
    if is_multivector(schema):
        columns["n_vectors"] = pa.array(counts, pa.int32())
    for field in schema:
        if field.name == DEEPSTACK:
            columns[field.name] = deepstack_column(meta[field.name], field.type)
        elif field.name not in columns and field.name != "indexed_at":
            columns[field.name] = pa.array(meta[field.name], field.type)
    columns["indexed_at"] = pa.array([now_utc()] * n, TIMESTAMP)
    return pa.table(columns, schema=schema)


def error_rows(meta: dict[str, list]) -> pa.Table:
    n = len(meta["path"])
    columns = {name: pa.array(meta[name], ERRORS_SCHEMA.field(name).type)
               for name in ("path", "root", "size_bytes", "mtime_ns", "error", "attempts")}
    columns["last_seen"] = pa.array([now_utc()] * n, TIMESTAMP)
    return pa.table(columns, schema=ERRORS_SCHEMA)


def empty_keys() -> pa.Table:
    return pa.table({"root": pa.array([], pa.string()), "path": pa.array([], pa.string())})
