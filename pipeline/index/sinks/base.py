"""The Sink protocol: where committed rows live, idempotent by (root, path)."""

from __future__ import annotations

from typing import Literal, Protocol

import pyarrow as pa
import pyarrow.compute as pc

Which = Literal["images", "errors"]
EXISTING_IMAGE_COLUMNS = ["root", "path", "size_bytes", "mtime_ns", "content_hash", "width", "height"]
EXISTING_ERROR_COLUMNS = ["root", "path", "size_bytes", "mtime_ns", "attempts"]


class Sink(Protocol):
    name: str

    def write(self, rows: pa.Table, errors: pa.Table) -> None:
        """Add one shard's rows. LanceDB upserts on (root, path); Parquet appends a part file, so
        the run deletes the keys it will rewrite before its first write (index.sinks.prepare_sinks)."""
        ...

    def existing(self, which: Which = "images") -> pa.Table:
        """The committed key and change-detection columns (no embeddings)."""
        ...

    def rows_for_keys(self, keys: pa.Table, columns: list[str]) -> pa.Table:
        """The `columns` of the `images` rows whose (root, path) is in keys; columns the table lacks are left out."""
        ...

    def delete(self, keys: pa.Table, which: Which) -> None:
        """Remove the rows whose (root, path) is in keys."""
        ...

    def drop(self) -> None:
        """Remove everything (for --rebuild)."""
        ...

    def storage_bytes(self) -> int: ...

    def count_rows(self, which: Which = "images") -> int: ...


def existing_schema(which: Which) -> pa.Schema:
    """The columns existing() returns, for an index that has no table yet."""
    from pipeline.index.schema import ERRORS_SCHEMA, images_schema

    full = images_schema(1) if which == "images" else ERRORS_SCHEMA
    columns = EXISTING_IMAGE_COLUMNS if which == "images" else EXISTING_ERROR_COLUMNS
    return pa.schema([full.field(c) for c in columns])


def key_strings(table: pa.Table) -> pa.Array:
    """(root, path) as one string column, for set operations with pyarrow compute."""
    if table.num_rows == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(table["root"], table["path"], "\x00")


def keys_in(table: pa.Table, keys: pa.Table) -> pa.Array:
    """A boolean mask: which rows of `table` have a (root, path) found in `keys`."""
    return pc.is_in(key_strings(table), value_set=key_strings(keys))


def folder_bytes(path: str) -> int:
    import os

    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total
