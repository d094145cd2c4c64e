"""The Arrow schemas of the `images` and `images_errors` tables, and builders for their rows."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

KEY_COLUMNS = ["root", "path"]  # a file is identified by its root and its POSIX path below it
TIMESTAMP = pa.timestamp("us", tz="UTC")


FLOAT32 = pa.float32()


def images_schema(dim: int, vector_type: pa.DataType = FLOAT32) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("root", pa.string()),
            ("size_bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("content_hash", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("model", pa.string()),
            ("embedding", pa.list_(vector_type, dim)),
            ("indexed_at", TIMESTAMP),
        ]
    )


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


def image_rows(meta: dict[str, list], embeddings: np.ndarray, model: str, schema: pa.Schema) -> pa.Table:
    """One row per embedded file; `meta` holds the per-file columns, embeddings is (N, dim) float."""
    dim = embeddings.shape[1]
    vector_type = schema.field("embedding").type.value_type
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=vector_type.to_pandas_dtype()).reshape(-1))
    n = len(meta["path"])
    columns = {
        **{name: pa.array(meta[name], schema.field(name).type) for name in
           ("path", "root", "size_bytes", "mtime_ns", "content_hash", "width", "height")},
        "model": pa.array([model] * n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "indexed_at": pa.array([now_utc()] * n, TIMESTAMP),
    }
    return pa.table(columns, schema=schema)


def error_rows(meta: dict[str, list]) -> pa.Table:
    n = len(meta["path"])
    columns = {name: pa.array(meta[name], ERRORS_SCHEMA.field(name).type)
               for name in ("path", "root", "size_bytes", "mtime_ns", "error", "attempts")}
    columns["last_seen"] = pa.array([now_utc()] * n, TIMESTAMP)
    return pa.table(columns, schema=ERRORS_SCHEMA)


def empty_keys() -> pa.Table:
    return pa.table({"root": pa.array([], pa.string()), "path": pa.array([], pa.string())})
