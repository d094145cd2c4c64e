"""Search over HTTP: POST/GET /v1/search, the thumbnail and image routes of indexed files, and the page at /."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import mimetypes
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.decode.image import content_hash
from pipeline.serve.bodies import (
    CLIENT_GONE,
    Admission,
    ClientGone,
    check_key,
    error_response,
    has_key,
    read_body,
    unless_gone,
)
from pipeline.serve.errors import ApiError
from pipeline.serve.images import Failed
from pipeline.serve.links import LINK_TTL_S
from pipeline.serve.search_api import SearchRequest, parse_search, search_answer
from pipeline.serve.searcher import Row, SearchService, file_state
from pipeline.serve.state import ServerState
from pipeline.serve.thumbnails import THUMBNAIL_SIZES, CacheKey, ThumbnailError, render_thumbnail

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]

# The page: plain HTML, CSS and JS shipped in the package (pipeline/serve/page), no build step.
ASSETS = {"index.html": "text/html; charset=utf-8", "search.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# The page runs its own script only and talks to this server only: a file name that holds markup stays text.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}
# Images: cached by the browser as long as their signed link lives; a file served as is runs nothing.
IMAGE_HEADERS = {"Cache-Control": f"private, max-age={LINK_TTL_S}", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "sandbox"}


def _service(state: ServerState) -> SearchService:
    if state.search is None:
        raise ApiError(503, "search is unavailable: this server was started without an index", "search_unavailable")
    return state.search


def _hash_of(uri: str) -> str:
    try:
        return content_hash(base64.b64decode(uri.partition(",")[2], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"image: invalid base64: {exc}", "invalid_base64", "image") from None


async def _embed_image(state: ServerState, uri: str) -> np.ndarray:
    """A query image not in the index, decoded and embedded as /v1/embeddings does (its processes, its batches)."""
    if state.in_flight_images + 1 > state.max_queued_images:
        raise ApiError(429, f"busy: {state.in_flight_images} images in flight; retry shortly", "server_busy")
    state.in_flight_images += 1
    try:
        result = (await state.decoders.decode([uri], state.limits.max_image_pixels, None))[0]
        if isinstance(result, Failed):
            raise ApiError(result.status, f"image: {result.reason}", result.code, "image", reason=result.reason)
        pixels = list(result.pixels) if state.batcher.image_list else result.pixels
        return (await state.batcher.embed_images(pixels))[0]
    finally:
        state.in_flight_images -= 1


async def _query_vector(state: ServerState, service: SearchService, request: SearchRequest) -> np.ndarray:
    if request.vector is not None:
        return request.vector
    if request.path is not None:
        return await service.run(service.stored_vector, request.root, request.path)
    if request.text is not None:
        if not state.embeds_text:
            raise ApiError(400, f"model {state.model_name!r} has no text tower: search by image", "text_not_supported",
                           "text")
        return (await state.batcher.embed_texts([request.text]))[0]
    assert request.image is not None
    stored = await service.run(service.vector_by_hash, await service.run(_hash_of, request.image))
    return stored if stored is not None else await _embed_image(state, request.image)


async def _search(request: Request, state: ServerState, admission: Admission) -> Response:
    check_key(request, state.api_key)
    service = _service(state)
    body = await read_body(request, admission, state.max_body_bytes, state.body_timeout_s)
    parsed = await asyncio.to_thread(parse_search, body, state.limits.max_text_chars, state.encoder.dim)
    await service.run(service.index)  # 503 before any encoding when there is no index

    async def work() -> bytes:
        vector = await _query_vector(state, service, parsed)
        started = time.perf_counter()
        modality = "text" if parsed.kind == "text" else "image"
        hits = await service.run(service.search, vector, parsed.k, parsed.where, modality)
        search_ms = (time.perf_counter() - started) * 1000
        return await service.run(lambda: json.dumps(search_answer(
            hits, parsed, service.links, service.grids, state.model_name, state.smoke_test, search_ms),
            ensure_ascii=False, allow_nan=False).encode())

    return Response(await unless_gone(request, work()), media_type="application/json")


async def _indexed_file(request: Request, state: ServerState) -> tuple[Row, Any]:
    """The indexed image a thumbnail or image URL names, with its file's stat: 401 without the key or a valid signed
    link, 404 for anything the index does not hold (or whose file is gone)."""
    service = _service(state)
    query = request.query_params
    if not (has_key(request, state.api_key) or service.links.verify(query)):
        raise ApiError(401, "missing or wrong API key, or an expired link: send `Authorization: Bearer <key>` or "
                            "search again for fresh links", "invalid_api_key")
    path = query.get("path")
    if not path:
        raise ApiError(400, "path: required (a path as the index stores it)", "invalid_path", "path")
    row = await service.run(service.find_row, query.get("root"), path)
    if row is None:
        raise ApiError(404, f"path: {path!r} is not in the index", "not_found", "path")
    stat = await service.run(file_state, row)  # a stat may wait on a network file system: not on the loop
    if stat is None:
        raise ApiError(404, f"path: {path!r} is indexed but its file is gone; the next run removes it", "not_found",
                       "path")
    return row, stat


async def _thumbnail(request: Request, state: ServerState) -> Response:
    size_text = request.query_params.get("size", str(THUMBNAIL_SIZES[0]))
    if size_text not in {str(size) for size in THUMBNAIL_SIZES}:
        raise ApiError(400, f"size: expected one of {list(THUMBNAIL_SIZES)} (got {size_text!r})", "invalid_size",
                       "size")
    row, stat = await _indexed_file(request, state)
    service = _service(state)
    key = CacheKey(row.file, int(size_text), stat.st_mtime_ns, stat.st_size)
    etag = '"' + hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={**IMAGE_HEADERS, "ETag": etag})
    data = service.thumbnails.get(key)
    if data is None:
        try:
            data = await service.run(render_thumbnail, row.file, key.size, state.limits.max_image_pixels)
        except ThumbnailError as exc:
            raise ApiError(422, f"path: {row.path!r}: {exc}", "invalid_image", "path", reason=str(exc)) from None
        service.thumbnails.put(key, data)
    return Response(data, media_type="image/jpeg", headers={**IMAGE_HEADERS, "ETag": etag})


async def _image(request: Request, state: ServerState) -> Response:
    row, stat = await _indexed_file(request, state)
    media_type = mimetypes.guess_type(row.file)[0] or "application/octet-stream"
    return FileResponse(row.file, headers=IMAGE_HEADERS, media_type=media_type, stat_result=stat,
                        filename=PurePosixPath(row.path).name, content_disposition_type="inline")


def _counted(state: ServerState, route: str, handler: Callable[[Request], Awaitable[Response]]) -> Handler:
    """The handler with the embeddings route's conventions: ApiError -> its JSON error, a client that left -> 499
    (counted, never sent), anything else -> a logged 500; every status counted in /metrics."""

    async def counted(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except (ClientDisconnect, ClientGone):
            log.debug("the client went away before its answer (%s)", route)
            response = Response(status_code=CLIENT_GONE)
        except Exception:
            log.exception("%s request failed", route)
            response = JSONResponse(ApiError(500, "internal server error", "internal_error").body(), 500)
        state.metrics.requests.labels(route, str(response.status_code)).inc()
        if route == "/v1/search" and request.method == "POST" and response.status_code == 200:
            state.metrics.request_seconds.labels("search").observe(time.perf_counter() - started)
        return response

    return counted


def search_routes(state: ServerState) -> list[Route]:
    page = resources.files("pipeline.serve") / "page"
    assets = {name: (page / name).read_bytes() for name in ASSETS}

    async def search(request: Request) -> Response:
        admission = Admission(state.budget)
        try:
            return await _search(request, state, admission)
        finally:
            admission.close()

    async def info(request: Request) -> Response:
        check_key(request, state.api_key)
        service = _service(state)
        answer = await service.run(service.info)
        answer |= {"model": state.model_name, "smoke_test": state.smoke_test,
                   "modalities": ["image", "text"] if state.embeds_text else ["image"]}
        return JSONResponse(answer, 200 if answer["available"] else 503)

    async def asset(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in assets:
            raise ApiError(404, f"no such file: /static/{name}", "not_found")
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    return [
        Route("/v1/search", _counted(state, "/v1/search", search), methods=["POST"]),
        Route("/v1/search", _counted(state, "/v1/search", info), methods=["GET"]),
        Route("/v1/thumbnails", _counted(state, "/v1/thumbnails", lambda r: _thumbnail(r, state)), methods=["GET"]),
        Route("/v1/images", _counted(state, "/v1/images", lambda r: _image(r, state)), methods=["GET"]),
        Route("/", _counted(state, "/", asset), methods=["GET"]),
        Route("/static/{name}", _counted(state, "/static", asset), methods=["GET"]),
    ]
