"""The /v1/search request and answer: one query (text, image, vector or an indexed path), k and where; the hits."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode.tiles import pyramid_tiles
from pipeline.serve.errors import ApiError
from pipeline.serve.links import Links
from pipeline.serve.parse import load_json
from pipeline.serve.searcher import checked_path
from pipeline.serve.thumbnails import THUMBNAIL_SIZES

QUERY_KINDS = ("text", "image", "vector", "path")
DEFAULT_K = 10
# Results per request: the page asks for 12 to 96; 1,000 hits are ~500 KB of JSON with their links.
MAX_K = 1000
MAX_WHERE_CHARS = 4096


@dataclass
class SearchRequest:
    kind: str  # one of QUERY_KINDS
    text: str | None = None
    image: str | None = None  # a data URI
    vector: np.ndarray | None = None
    path: str | None = None  # an indexed image ("more like this"), with its root if the index has several
    root: str | None = None
    k: int = DEFAULT_K
    where: str | None = None


def _bad(message: str, code: str, param: str) -> ApiError:
    return ApiError(400, message, code, param)


def _vector(value: Any, dim: int) -> np.ndarray:
    """A list of dim numbers, or dim little-endian float32 in base64 (the form /v1/embeddings answers with)."""
    if isinstance(value, str):
        try:
            vector = np.frombuffer(base64.b64decode(value, validate=True), "<f4").astype(np.float32)
        except (binascii.Error, ValueError):
            raise _bad("vector: a string must be base64 of little-endian float32 values", "invalid_vector",
                       "vector") from None
    elif isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        vector = np.asarray(value, dtype=np.float32)
    else:
        raise _bad("vector: expected a list of numbers (one vector) or a base64 string", "invalid_vector", "vector")
    if vector.shape != (dim,):
        raise _bad(f"vector: expected {dim} values, the index's dimension (got {vector.size})", "invalid_vector",
                   "vector")
    if not np.isfinite(vector).all() or not np.any(vector):
        raise _bad("vector: expected finite values, not all zero", "invalid_vector", "vector")
    return vector


def _query(request: SearchRequest, payload: dict[str, Any], max_text_chars: int, dim: int) -> None:
    value = payload[request.kind]
    if request.kind == "vector":
        request.vector = _vector(value, dim)
        return
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{request.kind}: expected a non-empty string", "invalid_query", request.kind)
    if request.kind == "text":
        if len(value) > max_text_chars:
            raise _bad(f"text: {len(value)} characters, at most {max_text_chars} (serve.max_text_chars)",
                       "text_too_long", "text")
        request.text = value
    elif request.kind == "image":
        header, comma, _ = value[:256].partition(",")
        if not header.lower().startswith("data:image/") or not comma or not header.lower().endswith(";base64"):
            raise _bad("image: expected a base64 data URI such as data:image/jpeg;base64,...", "invalid_data_uri",
                       "image")
        request.image = value
    else:
        request.path = checked_path(value)
        root = payload.get("root")
        if root is not None and not isinstance(root, str):
            raise _bad("root: expected a string, the root folder the path is relative to", "invalid_path", "root")
        request.root = root or None


def parse_search(body: bytearray, max_text_chars: int, dim: int) -> SearchRequest:
    """The request, checked; ApiError (400) names what is wrong. Empties `body` (see parse.load_json)."""
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object such as {\"text\": \"a dog\", \"k\": 10}", "invalid_json")
    given = [kind for kind in QUERY_KINDS if payload.get(kind) is not None]
    if len(given) != 1:
        raise _bad(f"give exactly one of text, image (a data URI), vector or path (got {given or 'none'})",
                   "invalid_query", "text")
    request = SearchRequest(given[0])
    _query(request, payload, max_text_chars, dim)
    k = payload.get("k", DEFAULT_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise _bad(f"k: expected a whole number from 1 to {MAX_K} (got {k!r})", "invalid_k", "k")
    request.k = k
    where = payload.get("where")
    if where is not None and (not isinstance(where, str) or len(where) > MAX_WHERE_CHARS):
        raise _bad(f"where: expected an SQL filter of at most {MAX_WHERE_CHARS} characters, e.g. \"width > 400\"",
                   "invalid_where", "where")
    request.where = (where.strip() or None) if where is not None else None
    return request


def _tile_box(row: dict[str, Any], grids: list[tuple[int, int]]) -> list[int] | None:
    """The best-matching tile's (left, top, right, bottom) in the upright original's pixels."""
    level, tile_row, tile_col = row["tile_level"], row["tile_row"], row["tile_col"]
    if level is None or not 0 <= level < len(grids) or not row.get("width") or not row.get("height"):
        return None
    offset = sum(rows * cols for rows, cols in grids[:level]) + tile_row * grids[level][1] + tile_col
    return list(pyramid_tiles(row["width"], row["height"], grids)[offset].box)


def search_answer(hits: pa.Table, request: SearchRequest, links: Links, grids: list[tuple[int, int]] | None,
                  model: str, smoke_test: bool, search_ms: float) -> dict[str, Any]:
    """The JSON answer: per hit the Index's columns (rank, score, path, root, ..., tile_* on pyramid indexes), then
    its links (relative to the server) and, on pyramid indexes, the matching tile's box (client.LINK_FIELDS)."""
    tiles = "tile_level" in hits.column_names
    data = []
    for row in hits.to_pylist():
        root, path = row["root"], row["path"]
        entry = {**row, "thumbnail_url": links.thumbnail(root, path, THUMBNAIL_SIZES[0]),
                 "preview_url": links.thumbnail(root, path, THUMBNAIL_SIZES[-1]), "image_url": links.image(root, path)}
        if tiles and grids:
            entry["tile_box"] = _tile_box(row, grids)
        data.append(entry)
    return {"object": "list", "model": model, "smoke_test": smoke_test, "tiles": tiles,
            "query": {"kind": request.kind, "k": request.k, "where": request.where},
            "data": data, "usage": {"search_ms": round(search_ms, 2)}}
