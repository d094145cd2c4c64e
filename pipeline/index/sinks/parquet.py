"""The Parquet sink: one part file per shard under dir/images and dir/images_errors, written atomically."""

from __future__ import annotations

import glob
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.index.schema import ERRORS_SCHEMA
from pipeline.index.sinks.base import (
    EXISTING_ERROR_COLUMNS,
    EXISTING_IMAGE_COLUMNS,
    Which,
    existing_schema,
    folder_bytes,
    keys_in,
)

# A part is written as ".NAME.tmp" and renamed: dataset readers (pyarrow, DuckDB, Spark) skip
# names starting with "." so a half-written file left by a killed run is never read.
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"


class ParquetSink:
    name = "parquet"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.folders = {"images": os.path.join(directory, "images"), "errors": os.path.join(directory, "images_errors")}

    def _parts(self, which: Which) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folders[which], "*.parquet")))

    def remove_temporary_files(self) -> int:
        """Delete part files a killed run left half-written."""
        pattern = f"{TMP_PREFIX}*{TMP_SUFFIX}"
        stale = [p for folder in self.folders.values() for p in glob.glob(os.path.join(folder, pattern))]
        for path in stale:
            os.remove(path)
        return len(stale)

    def _write_part(self, which: Which, table: pa.Table, name: str | None = None) -> None:
        if table.num_rows == 0:
            return
        folder = self.folders[which]
        os.makedirs(folder, exist_ok=True)
        final = os.path.join(folder, name or f"part-{uuid.uuid4().hex}.parquet")
        temporary = os.path.join(folder, TMP_PREFIX + os.path.basename(final) + TMP_SUFFIX)
        pq.write_table(table, temporary)
        # Readers see a part file whole or not at all.
        os.replace(temporary, final)

    def write(self, rows: pa.Table, errors: pa.Table) -> None:
        self._write_part("errors", errors)
        self._write_part("images", rows)

    def read(self, which: Which = "images", columns: list[str] | None = None) -> pa.Table:
        parts = self._parts(which)
        if not parts:
            empty = existing_schema(which).empty_table() if which == "images" else ERRORS_SCHEMA.empty_table()
            return empty.select(columns) if columns else empty
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)

    def existing(self, which: Which = "images") -> pa.Table:
        return self.read(which, EXISTING_IMAGE_COLUMNS if which == "images" else EXISTING_ERROR_COLUMNS)

    def rows_for_keys(self, keys: pa.Table, columns: list[str]) -> pa.Table:
        parts = self._parts("images")
        if parts:  # every part has the table's schema (a new one means a rebuild)
            columns = [c for c in columns if c in pq.read_schema(parts[0]).names]
        rows = self.read("images", sorted(set(columns) | {"root", "path"}))
        return rows.filter(keys_in(rows, keys)).select(columns)

    def delete(self, keys: pa.Table, which: Which) -> None:
        """Rewrite each part file that holds one of the keys without those rows."""
        if keys.num_rows == 0:
            return
        for part in self._parts(which):
            part_keys = pq.read_table(part, columns=["root", "path"])
            doomed = keys_in(part_keys, keys)
            if not pc.any(doomed).as_py():
                continue
            kept = pq.read_table(part).filter(pc.invert(doomed))
            if kept.num_rows == 0:
                os.remove(part)
            else:
                self._write_part(which, kept, os.path.basename(part))

    def count_rows(self, which: Which = "images") -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self._parts(which))

    def drop(self) -> None:
        for which in self.folders:
            for part in self._parts(which):
                os.remove(part)

    def storage_bytes(self) -> int:
        return sum(folder_bytes(folder) for folder in self.folders.values())
