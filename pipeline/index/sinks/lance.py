"""The LanceDB sink: tables `images` and `images_errors`, upserted with merge_insert on (root, path)."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from pipeline.index.schema import ERRORS_SCHEMA, KEY_COLUMNS, images_schema
from pipeline.index.sinks.base import (
    EXISTING_ERROR_COLUMNS,
    EXISTING_IMAGE_COLUMNS,
    Which,
    existing_schema,
    folder_bytes,
)

DELETE_CHUNK = 512  # keys per delete predicate: keeps the SQL text small


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def key_predicates(keys: pa.Table) -> list[str]:
    """SQL predicates matching exactly these (root, path) keys, a chunk of paths per root."""
    by_root: dict[str, list[str]] = {}
    for root, path in zip(keys["root"].to_pylist(), keys["path"].to_pylist()):
        by_root.setdefault(root, []).append(path)
    predicates = []
    for root, paths in by_root.items():
        for start in range(0, len(paths), DELETE_CHUNK):
            chunk = ", ".join(sql_string(p) for p in paths[start:start + DELETE_CHUNK])
            predicates.append(f"root = {sql_string(root)} AND path IN ({chunk})")
    return predicates


class LanceSink:
    name = "lancedb"

    def __init__(self, uri: str, table: str) -> None:
        import lancedb  # lazily: the GPU benchmark machines run without it

        self.uri = uri
        self.table_names = {"images": table, "errors": f"{table}_errors"}
        self._db = lancedb.connect(uri)

    def _table(self, which: Which, create_with: pa.Schema | None = None) -> Any | None:
        name = self.table_names[which]
        try:
            return self._db.open_table(name)
        except (ValueError, FileNotFoundError):
            if create_with is None:
                return None
            return self._db.create_table(name, schema=create_with, exist_ok=True)

    def _upsert(self, which: Which, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        table = self._table(which, create_with=rows.schema)
        (table.merge_insert(KEY_COLUMNS).when_matched_update_all().when_not_matched_insert_all().execute(rows))

    def write(self, rows: pa.Table, errors: pa.Table) -> None:
        self._upsert("errors", errors)
        self._upsert("images", rows)

    def existing(self, which: Which = "images") -> pa.Table:
        columns = EXISTING_IMAGE_COLUMNS if which == "images" else EXISTING_ERROR_COLUMNS
        table = self._table(which)
        if table is None:
            return existing_schema(which).empty_table()
        return table.search().select(columns).limit(None).to_arrow().select(columns)

    def rows_for_keys(self, keys: pa.Table, columns: list[str]) -> pa.Table:
        table = self._table("images")
        if table is None or keys.num_rows == 0:
            known = images_schema(1)
            return pa.schema([known.field(c) for c in columns if c in known.names]).empty_table()
        columns = [c for c in columns if c in table.schema.names]
        parts = [table.search().where(p).select(columns).limit(None).to_arrow() for p in key_predicates(keys)]
        return pa.concat_tables(parts).select(columns)

    def delete(self, keys: pa.Table, which: Which) -> None:
        table = self._table(which)
        if table is None or keys.num_rows == 0:
            return
        for predicate in key_predicates(keys):
            table.delete(predicate)

    def read(self, which: Which = "images") -> pa.Table:
        table = self._table(which)
        return existing_schema(which).empty_table() if table is None else table.to_arrow()

    # -- versions: every run that changes the tables is tagged with its run id ---------------
    def versions(self) -> dict[str, int]:
        return {which: (t.version if (t := self._table(which)) is not None else 0) for which in self.table_names}

    def tag(self, name: str) -> None:
        for which in self.table_names:
            # An empty errors table is still part of the state a rollback returns to.
            table = self._table(which, create_with=ERRORS_SCHEMA)
            table.tags.create(name, table.version)

    def tags(self) -> dict[str, dict[str, Any]]:
        """run id -> {version, timestamp} of the images table."""
        table = self._table("images")
        if table is None:
            return {}
        stamps = {v["version"]: v["timestamp"] for v in table.list_versions()}
        return {name: {"version": info["version"], "timestamp": stamps.get(info["version"])}
                for name, info in table.tags.list().items()}

    def restore(self, name: str) -> None:
        """Make the tagged state the latest version of both tables (older versions are kept)."""
        for which in self.table_names:
            table = self._table(which)
            if table is not None and name in table.tags.list():
                table.restore(name)

    def count_rows(self, which: Which = "images") -> int:
        table = self._table(which)
        return 0 if table is None else table.count_rows()

    def drop(self) -> None:
        for name in self.table_names.values():
            try:
                self._db.drop_table(name)
            except (ValueError, FileNotFoundError):
                pass

    def storage_bytes(self) -> int:
        return sum(folder_bytes(os.path.join(self.uri, f"{name}.lance")) for name in self.table_names.values())
