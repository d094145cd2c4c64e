"""Walk the input roots, streaming, and list image files as (root, path, size_bytes, mtime_ns)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa

log = logging.getLogger(__name__)

SCAN_SCHEMA = pa.schema(
    [
        ("root", pa.string()),
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)


class FileRecord(NamedTuple):
    root: str
    path: str  # POSIX, relative to root
    size_bytes: int
    mtime_ns: int


def _walk(
    root: str,
    folder: str,
    prefix: str,
    extensions: frozenset[str],
    include_hidden: bool,
    follow_symlinks: bool,
    visited: set[tuple[int, int]],
) -> Iterator[FileRecord]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc)
        return
    for entry in entries:
        if not include_hidden and entry.name.startswith("."):
            continue
        if entry.is_symlink() and not follow_symlinks:
            continue
        rel = prefix + entry.name
        try:
            if entry.is_dir(follow_symlinks=follow_symlinks):
                stat = entry.stat(follow_symlinks=follow_symlinks)
                # A folder reached twice (a symlink loop or two links to one place) is walked once.
                key = (stat.st_dev, stat.st_ino)
                if key in visited:
                    continue
                visited.add(key)
                yield from _walk(
                    root, entry.path, rel + "/", extensions, include_hidden, follow_symlinks, visited
                )
            elif entry.is_file(follow_symlinks=follow_symlinks):
                if os.path.splitext(entry.name)[1][1:].lower() not in extensions:
                    continue
                stat = entry.stat(follow_symlinks=follow_symlinks)
                yield FileRecord(root, rel, stat.st_size, stat.st_mtime_ns)
        except OSError as exc:  # a broken link or a file removed while we look
            log.warning("skipping %s: %s", entry.path, exc)


def scan_roots(
    roots: list[str],
    extensions: list[str],
    include_hidden: bool = False,
    follow_symlinks: bool = False,
) -> Iterator[FileRecord]:
    """Yield every image file under the roots, sorted within each folder, one record at a time."""
    wanted = frozenset(e.lower().lstrip(".") for e in extensions)
    for root in roots:
        stat = os.stat(root)
        visited = {(stat.st_dev, stat.st_ino)}
        yield from _walk(root, root, "", wanted, include_hidden, follow_symlinks, visited)


def scan_table(
    roots: list[str],
    extensions: list[str],
    include_hidden: bool = False,
    follow_symlinks: bool = False,
    chunk_rows: int = 65_536,
) -> pa.Table:
    """The scan as one Arrow table, built in chunks so no list of a million records is ever held."""
    batches: list[pa.RecordBatch] = []
    chunk: list[FileRecord] = []

    def flush() -> None:
        if chunk:
            columns = list(zip(*chunk))
            batches.append(pa.RecordBatch.from_arrays([pa.array(c) for c in columns], schema=SCAN_SCHEMA))
            chunk.clear()

    for record in scan_roots(roots, extensions, include_hidden, follow_symlinks):
        chunk.append(record)
        if len(chunk) >= chunk_rows:
            flush()
    flush()
    return pa.Table.from_batches(batches, schema=SCAN_SCHEMA)
