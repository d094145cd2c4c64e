"""Vectors that need no encoding: identical bytes already in the index, or already encoded this run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.schema import DEEPSTACK, KEY_COLUMNS, SIZE_EXTRAS, deepstack_of, pack_deepstack, vectors_of

# Beyond this many candidate rows the lookup is skipped (and files are simply encoded): a rename
# detector must not load half the index into memory on a night when everything changed.
MAX_PRELOADED_VECTORS = 200_000


@dataclass
class Known:
    vector: np.ndarray  # (dim,), or (n, dim) for multi-vector rows (packed with DeepStack layers: index.schema)
    width: int
    height: int
    extras: dict[str, Any] | None = None  # the indexed row's SIZE_EXTRAS columns, where the table has them


def candidate_keys(pending: pa.Table, images: pa.Table) -> pa.Table:
    """Indexed rows whose size equals a pending file's: the only ones a pending file can be a copy of."""
    sizes = pc.unique(pending["size_bytes"])
    rows = images.filter(pc.is_in(images["size_bytes"], value_set=sizes))
    # One row per distinct content is enough.
    first = rows.group_by("content_hash", use_threads=False).aggregate([("root", "first"), ("path", "first")])
    return first.select(["root_first", "path_first"]).rename_columns(KEY_COLUMNS)


def duplicate_sizes(pending: pa.Table) -> set[int]:
    """Sizes shared by two or more pending files: only those can hold identical bytes this run."""
    counts = pending.group_by("size_bytes").aggregate([("size_bytes", "count")])
    return set(counts.filter(pc.greater(counts["size_bytes_count"], 1))["size_bytes"].to_pylist())


class VectorReuse:
    """content_hash -> vector for indexed files that pending files may copy, plus vectors encoded
    this run for sizes that occur more than once."""

    def __init__(self, known_rows: pa.Table, images: pa.Table, pending: pa.Table) -> None:
        self._known: dict[str, Known] = {}
        if known_rows.num_rows:
            vectors = vectors_of(known_rows["embedding"])
            if DEEPSTACK in known_rows.column_names:  # as the encoder gives them: packed with their layers
                vectors = [pack_deepstack(v, layers) for v, layers in zip(vectors, deepstack_of(known_rows[DEEPSTACK]))]
            extras = [name for name in SIZE_EXTRAS if name in known_rows.column_names]
            extra_rows = known_rows.select(extras).to_pylist() if extras else None
            for index, (digest, width, height) in enumerate(zip(
                    known_rows["content_hash"].to_pylist(), known_rows["width"].to_pylist(),
                    known_rows["height"].to_pylist())):
                self._known[digest] = Known(vectors[index], width, height,
                                            extra_rows[index] if extra_rows is not None else None)
        # size -> hashes of known vectors with that size, sent to the workers with each file
        self._by_size: dict[int, frozenset[str]] = {}
        matching = images.filter(pc.is_in(images["content_hash"], value_set=pa.array(list(self._known), pa.string())))
        for size, digest in zip(matching["size_bytes"].to_pylist(), matching["content_hash"].to_pylist()):
            self._by_size[size] = self._by_size.get(size, frozenset()) | {digest}
        self.duplicate_sizes = duplicate_sizes(pending)
        self.reused = 0

    def hashes_for_size(self, size_bytes: int) -> frozenset[str] | None:
        return self._by_size.get(size_bytes)

    def lookup(self, digest: str | None) -> Known | None:
        return self._known.get(digest) if digest is not None else None

    def may_repeat(self, size_bytes: int) -> bool:
        return size_bytes in self.duplicate_sizes

    def remember(self, digest: str, vector: np.ndarray, width: int, height: int) -> None:
        self._known[digest] = Known(vector, width, height)


def load_known_rows(sink: object, pending: pa.Table, images: pa.Table) -> pa.Table:
    """Fetch the vectors of candidate rows from the primary sink (before anything is deleted), with their
    DeepStack layers where the table has them (Qwen3-VL feature rows)."""
    keys = candidate_keys(pending, images)
    if keys.num_rows == 0 or keys.num_rows > MAX_PRELOADED_VECTORS:
        return pa.table({"content_hash": pa.array([], pa.string()), "width": pa.array([], pa.int32()),
                         "height": pa.array([], pa.int32()), "embedding": pa.array([], pa.list_(pa.float32()))})
    # a column the table lacks is left out
    columns = ["content_hash", "width", "height", "embedding", DEEPSTACK, *SIZE_EXTRAS]
    return sink.rows_for_keys(keys, columns)  # type: ignore[attr-defined]
