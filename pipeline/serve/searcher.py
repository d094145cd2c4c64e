"""The index behind /v1/search and the image routes: opened at start-up (again once it appears), read on threads."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from pipeline.config import Config, parse_pyramid
from pipeline.errors import ConfigError
from pipeline.index.schema import vectors_of
from pipeline.index.sinks.lance import sql_string
from pipeline.search.query import Index, QueryError
from pipeline.serve.errors import ApiError
from pipeline.serve.links import Links
from pipeline.serve.thumbnails import ThumbnailCache

log = logging.getLogger(__name__)
T = TypeVar("T")

# Searches, lookups and thumbnail renders run on these threads, never on the event loop. They spend their time in
# LanceDB's and PIL's C code, which releases the GIL: 4 threads are 2 per core of the 2-core machines this runs on.
SEARCH_THREADS = 4
# An index that is missing (or of another model) is looked for again at most this often: a server started before
# the first `embindex run` serves search within 5 s of the run's first commit.
REOPEN_S = 5.0
# The lookup table handle checks for new versions this often: a run's commit is visible to lookups within 1 s.
READ_CONSISTENCY = timedelta(seconds=1)
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
# Found rows are remembered this long: without a scalar index on `path`, a lookup scans the column (60-90 ms at 1M
# rows on 2 cores), and a page shows 24 thumbnails at a time, again at each visit. A row deleted by a run may be
# served for this long after.
ROW_TTL_S = 60.0
MAX_REMEMBERED_ROWS = 4096


class Row(NamedTuple):
    """An indexed image as the image routes need it."""

    root: str
    path: str
    file: str  # root/path on this machine


def checked_path(path: str, param: str = "path") -> str:
    """A path as the index stores it (POSIX, relative to its root), or 400: nothing absolute, no `..`, no NUL."""
    parts = PurePosixPath(path).parts
    if not path or len(path) > MAX_PATH_CHARS or "\0" in path or path.startswith("/") or ".." in parts:
        raise ApiError(400, f"{param}: expected a path relative to its root as the index stores it (got {path!r})",
                       "invalid_path", param)
    return path


class SearchService:
    """The config's index, for one server: the `Index` for searches, a LanceDB table for lookups by path or content
    hash, the thumbnail cache and the link signer. Without an index, `unavailable` says why (503)."""

    def __init__(self, config: Config, links: Links) -> None:
        self.config, self.links = config, links
        self.grids = parse_pyramid(config.encoder.pyramid) if config.encoder.pyramid else None
        self.thumbnails = ThumbnailCache()
        self.pool = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="search")
        self.unavailable: str | None = "not opened yet"
        self._index: Index | None = None
        self._table: Any = None
        self._lock = threading.Lock()
        self._opened_at = float("-inf")
        self._found: dict[tuple[str | None, str], tuple[Row, float]] = {}  # (root, path) -> (row, when found)
        self._open()

    # -- the index ------------------------------------------------------------------------
    def _open(self) -> None:
        self._opened_at = time.monotonic()
        lance = self.config.output.lancedb
        try:
            if lance is None:
                raise ConfigError("the config has no output.lancedb, the table search reads")
            index = Index(self.config)
            import lancedb

            table = lancedb.connect(lance.uri, read_consistency_interval=READ_CONSISTENCY).open_table(lance.table)
        except (QueryError, ConfigError, ValueError, FileNotFoundError) as exc:
            if self.unavailable != str(exc):  # no index yet is an embeddings-only server; another model is a mistake
                log.log(logging.INFO if isinstance(exc, QueryError) else logging.WARNING, "search is unavailable: %s",
                        exc)
            self.unavailable = str(exc)
            return
        self._index, self._table, self.unavailable = index, table, None
        log.info("searching %s (table %r): %d images", lance.uri, lance.table, table.count_rows())

    def index(self) -> Index:
        """The open Index, or 503 saying why there is none (tried again every REOPEN_S)."""
        with self._lock:
            if self._index is None and time.monotonic() - self._opened_at >= REOPEN_S:
                self._open()
            if self._index is None:
                raise ApiError(503, f"search is unavailable: {self.unavailable}", "search_unavailable")
            return self._index

    def table(self) -> Any:
        self.index()
        return self._table

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """func(*args) on the search threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- searches and lookups (on the search threads) -------------------------------------
    def search(self, vector: np.ndarray, k: int, where: str | None, modality: str = "image") -> pa.Table:
        """Index.search_vector; `modality` "text" for a text's vector (search.text_* settings, as search_text)."""
        try:
            return self.index().search_vector(vector, k, where, modality=modality)  # type: ignore[arg-type]
        except QueryError as exc:
            message = str(exc)
            if message.startswith("search failed"):  # LanceDB refused the filter
                raise ApiError(400, f"where: {message}", "invalid_where", "where") from None
            raise ApiError(503, f"search is unavailable: {message}", "search_unavailable") from None

    def _rows(self, predicate: str, columns: list[str], limit: int = 1) -> pa.Table:
        return self.table().search().where(predicate).select(columns).limit(limit).to_arrow()

    def _query_vector(self, embedding: pa.ChunkedArray) -> np.ndarray:
        """A stored row's vector as a query: a pyramid row's whole-image tile (level 0), as Index.search_image does."""
        vector = vectors_of(embedding)[0]
        if self.config.encoder.pyramid:
            vector = vector[0]
        return np.asarray(vector, dtype=np.float32)

    def stored_vector(self, root: str | None, path: str) -> np.ndarray:
        """The indexed vector of (root, path), for "more like this"; 404 if the index does not hold it."""
        predicate = f"path = {sql_string(checked_path(path))}" + (f" AND root = {sql_string(root)}" if root else "")
        rows = self._rows(predicate, ["embedding"])
        if not rows.num_rows:
            raise ApiError(404, f"path: {path!r} is not in the index", "not_found", "path")
        return self._query_vector(rows["embedding"])

    def vector_by_hash(self, content_hash: str) -> np.ndarray | None:
        """The stored vector of an indexed image with these very bytes (its BLAKE2b-128), as `embindex run` reuses
        one: a query image that is indexed gets exactly its own vector, with no decode or forward pass."""
        rows = self._rows(f"content_hash = {sql_string(content_hash)}", ["embedding"])
        return self._query_vector(rows["embedding"]) if rows.num_rows else None

    def find_row(self, root: str | None, path: str) -> Row | None:
        """The indexed image at (root, path) and its file here, or None: the image routes serve nothing else."""
        try:
            checked_path(path)
        except ApiError:  # absolute, `..`: not a path the index can hold
            return None
        with self._lock:
            found = self._found.get((root, path))
        if found is not None and time.monotonic() - found[1] < ROW_TTL_S:
            return found[0]
        predicate = f"path = {sql_string(path)}" + (f" AND root = {sql_string(root)}" if root else "")
        rows = self._rows(predicate, ["root", "path"]).to_pylist()
        if not rows:
            return None
        row = Row(rows[0]["root"], rows[0]["path"], os.path.join(rows[0]["root"], *PurePosixPath(path).parts))
        with self._lock:
            if len(self._found) >= MAX_REMEMBERED_ROWS:
                self._found.pop(next(iter(self._found)))  # the oldest found
            self._found[(root, path)] = (row, time.monotonic())
        return row

    def info(self) -> dict[str, Any]:
        """GET /v1/search: whether search works here, and on which index."""
        lance = self.config.output.lancedb
        where = {"uri": lance.uri, "table": lance.table} if lance is not None else None
        try:
            rows = self.table().count_rows()
        except ApiError as exc:
            return {"object": "search.info", "available": False, "message": exc.message, "index": where}
        return {"object": "search.info", "available": True, "message": None, "index": {**where, "rows": rows},
                "pyramid": self.config.encoder.pyramid}


def file_state(row: Row) -> os.stat_result | None:
    """The indexed file's stat now, or None when it is gone (or no longer a regular file)."""
    try:
        state = os.stat(row.file)
    except OSError:
        return None
    return state if stat.S_ISREG(state.st_mode) else None
