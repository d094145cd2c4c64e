"""Whether an index exists on disk yet, told without importing LanceDB or creating anything."""

from __future__ import annotations

from pathlib import Path


def missing_table(uri: str, table: str) -> str | None:
    """Why a local LanceDB table cannot be searched (it was never written), else None. Remote URIs
    (s3://...) are not checked here: opening the table tells."""
    if "://" in uri or (Path(uri) / f"{table}.lance").is_dir():
        return None
    return f"no index at {uri} (table {table!r}): run `embindex run` first"
