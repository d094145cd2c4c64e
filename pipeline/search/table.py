"""The searched LanceDB table, opened once and moved to its latest committed version before each search."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.index.ann import vector_index_type
from pipeline.index.schema import is_multivector

RECENT_NS = 1_000_000_000  # a folder changed this recently may change again within the same mtime tick


class QueryError(Exception):
    """A query that cannot run: no index, empty table, unreadable query image."""


@dataclass(frozen=True)
class TableState:
    """What a search needs to know about one version of the table, read once per version."""

    version: int
    rows: int
    index_type: str | None  # the vector index (IVF_PQ, IVF_SQ...), None: exact search
    multivector: bool
    tiles: bool  # pyramid-tile rows: say which tile matched


class SearchTable:
    """One connection and table handle for the life of an `Index`. Opening the table for each query cost
    ~20 ms of a 47 ms search at 1M rows (issue 21). Each call into LanceDB's synchronous API costs 0.25-0.35 ms
    on this 2-core machine (`checkout_latest`, `version`: 5 % of a 13 ms search together), so a local table is
    asked for its latest version only when its `_versions` folder changed (a stat, ~5 us) or changed within
    the last second (a commit in the same clock tick as the last look leaves the same mtime); a remote table
    every time. Every search still sees what the last run committed. The table's facts (row count, index) are
    re-read only when its version changes."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri, self.name = uri, name
        self._lock = threading.Lock()  # the server searches from several threads
        self.table = self._open()
        self._state: TableState | None = None
        self._versions = None if "://" in uri else Path(uri) / f"{name}.lance" / "_versions"
        self._seen_mtime_ns: int | None = None

    def reopen(self) -> Any:
        """A handle of its own on the same table (a background reader moves it to another version)."""
        return self._open()

    def _open(self) -> Any:
        import lancedb

        try:
            return lancedb.connect(self.uri).open_table(self.name)
        except (ValueError, FileNotFoundError):
            raise QueryError(f"no index at {self.uri} (table {self.name!r}): run `embindex run` first") from None

    def current(self) -> TableState:
        """Move to the latest committed version; its facts, read again only if the version changed."""
        state = self._state
        if state is None or self._may_have_changed():
            self.table.checkout_latest()
            version = self.table.version
        else:
            version = state.version
        if state is None or state.version != version:
            with self._lock:
                state = self._read_state(version)
                self._state = state
        if state.rows == 0:
            raise QueryError(f"the index at {self.uri} is empty: no image has been embedded yet")
        return state

    def _may_have_changed(self) -> bool:
        if self._versions is None:
            return True
        try:
            mtime_ns = os.stat(self._versions).st_mtime_ns
        except OSError:  # dropped: the search will fail and renew()
            return True
        changed = mtime_ns != self._seen_mtime_ns or time.time_ns() - mtime_ns < RECENT_NS
        self._seen_mtime_ns = mtime_ns
        return changed

    def renew(self) -> TableState:
        """After a failed read: a fresh handle. A --rebuild drops the table and writes it anew, and a handle
        opened before keeps the old version, whose files are gone (checkout_latest does not go back)."""
        with self._lock:
            self.table = self._open()
            self._state = None
            self._seen_mtime_ns = None
        return self.current()

    def _read_state(self, version: int) -> TableState:
        schema = self.table.schema
        return TableState(version=version, rows=self.table.count_rows(), index_type=vector_index_type(self.table),
                          multivector=is_multivector(schema), tiles="tiles" in schema.names)
