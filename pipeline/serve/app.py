"""The HTTP routes: POST /v1/embeddings, GET /v1/models, /v1/health/ready, /v1/health/live, /metrics; search's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.serve.bodies import (
    CLIENT_GONE,
    Admission,
    ClientGone,
    check_key,
    error_response,
    read_body,
    unless_gone,
)
from pipeline.serve.errors import ApiError
from pipeline.serve.images import Decoded, Failed
from pipeline.serve.parse import EmbedRequest, parse_request
from pipeline.serve.responses import image_response, render, text_response
from pipeline.serve.search_routes import search_routes
from pipeline.serve.state import ServerState

log = logging.getLogger(__name__)


def _stack(decoded: list[Decoded], image_list: bool) -> np.ndarray | list[np.ndarray]:
    """One uint8 batch, or for a variable-resolution model the list of images at their own sizes."""
    if image_list:
        return [image for d in decoded for image in d.pixels]
    return decoded[0].pixels if len(decoded) == 1 else np.concatenate([d.pixels for d in decoded])


async def _embed_images(state: ServerState, request: EmbedRequest) -> bytes:
    if request.pyramid and state.batcher.image_list:
        raise ApiError(400, f"pyramid: model {state.model_name!r} takes images at their own resolution, not tiles",
                       "invalid_pyramid", "pyramid")
    started = time.perf_counter()
    results = await state.decoders.decode(request.items, request.max_image_pixels, request.pyramid)
    state.metrics.decode_seconds.observe(time.perf_counter() - started)
    for index, result in enumerate(results):
        if isinstance(result, Failed):
            raise ApiError(result.status, f"input[{index}]: {result.reason}", result.code, f"input[{index}]",
                           reason=result.reason)
    decoded: list[Decoded] = results  # type: ignore[assignment]
    stacked = await asyncio.to_thread(_stack, decoded, state.batcher.image_list)  # 4,096 tiles: 0.6 GB
    vectors = await state.batcher.embed_images(stacked)
    state.metrics.items.labels("image").inc(len(decoded))
    state.metrics.vectors.inc(len(vectors))
    return await asyncio.to_thread(
        lambda: render(image_response(state.model_name, decoded, vectors, request.encoding_format)))


async def _admitted_images(state: ServerState, request: EmbedRequest) -> bytes:
    """_embed_images within serve.max_queued_images (429 past it)."""
    if state.in_flight_images + len(request.items) > state.max_queued_images:
        raise ApiError(429, f"busy: {state.in_flight_images} images in flight; retry shortly", "server_busy")
    state.in_flight_images += len(request.items)
    state.metrics.queued_images.set(state.in_flight_images)
    try:
        return await _embed_images(state, request)
    finally:
        state.in_flight_images -= len(request.items)
        state.metrics.queued_images.set(state.in_flight_images)


async def _embed_texts(state: ServerState, request: EmbedRequest) -> bytes:
    if not state.embeds_text:
        raise ApiError(400, f"model {state.model_name!r} has no text tower: send images (data URIs)",
                       "text_not_supported", "input")
    vectors, n_tokens = await asyncio.gather(state.batcher.embed_texts(request.items),
                                             state.tokens.count(request.items))
    state.metrics.items.labels("text").inc(len(request.items))
    state.metrics.vectors.inc(len(vectors))
    return await asyncio.to_thread(
        lambda: render(text_response(state.model_name, vectors, n_tokens, request.encoding_format)))


async def _respond(request: Request, state: ServerState, admission: Admission) -> tuple[Response, str]:
    """The answer to POST /v1/embeddings and its kind (image, text, invalid); every step that reads the whole body
    or every input runs off the event loop, so /v1/health/live answers while a large request is handled."""
    kind = "invalid"
    try:
        check_key(request, state.api_key)
        body = await read_body(request, admission, state.max_body_bytes, state.body_timeout_s)
        parsed = await asyncio.to_thread(parse_request, body, state.limits, state.model_names, state.encoder.dim)
        kind = "image" if parsed.images else "text"
        work = _admitted_images(state, parsed) if parsed.images else _embed_texts(state, parsed)
        return Response(await unless_gone(request, work), media_type="application/json"), kind
    except ApiError as exc:
        return error_response(exc), kind
    except (ClientDisconnect, ClientGone):  # nobody to answer: not a fault, no traceback
        log.debug("the client went away before its answer (a %s request)", kind)
        return Response(status_code=CLIENT_GONE), kind
    except Exception:  # a server fault, never the client's input: logged with its traceback
        log.exception("embeddings request failed")
        return JSONResponse(ApiError(500, "internal server error", "internal_error").body(), 500), kind


def create_app(state: ServerState) -> Starlette:
    metrics = state.metrics

    async def embeddings(request: Request) -> Response:
        started, admission = time.perf_counter(), Admission(state.budget)
        try:
            response, kind = await _respond(request, state, admission)
        finally:
            admission.close()
        metrics.requests.labels("/v1/embeddings", str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.request_seconds.labels(kind).observe(time.perf_counter() - started)
        return response

    async def models(request: Request) -> Response:
        try:
            check_key(request, state.api_key)
        except ApiError as exc:
            return error_response(exc)
        fingerprint = state.encoder.fingerprint()
        entry = {
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "embindex",
            "root": fingerprint["model"],
            "embindex": {"dim": state.encoder.dim, "fingerprint": fingerprint, "max_items": state.limits.max_items,
                         "modalities": ["image", "text"] if state.embeds_text else ["image"],
                         "smoke_test": state.smoke_test},
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def ready(request: Request) -> Response:
        if not state.batcher.alive:
            return JSONResponse({"object": "health.response", "message": "the encoder thread has stopped"}, 503)
        return JSONResponse({"object": "health.response", "message": "Service is ready."})

    async def live(request: Request) -> Response:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return JSONResponse(ApiError(status, str(getattr(exc, "detail", exc)), "not_found" if status == 404
                                     else "invalid_request").body(), status)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.batcher.stop()
        state.decoders.close()
        state.tokens.close()
        if state.search is not None:
            state.search.close()

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/health/ready", ready, methods=["GET"]),
            Route("/v1/health/live", live, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            *search_routes(state),  # POST /v1/search, the thumbnail and image routes, the page at /
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
