"""The HTTP routes: POST /v1/embeddings, GET /v1/models, /v1/health/ready, /v1/health/live and /metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Gauge
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.encode.models.base import Encoder
from pipeline.serve.batching import Batcher
from pipeline.serve.errors import ApiError
from pipeline.serve.images import Decoded, DecodeWorkers, Failed
from pipeline.serve.metrics import Metrics
from pipeline.serve.parse import EmbedRequest, Limits, parse_request
from pipeline.serve.responses import TokenCounter, image_response, render, text_response

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's status for a client that closed its connection first; counted, never sent


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


class ByteBudget:
    """Request bytes admitted and not yet answered, over all requests (touched on the event loop only)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit, self.used, self.gauge = limit, 0, gauge

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise ApiError(429, f"busy: {self.used} bytes of requests in flight, {n} more would pass "
                                f"{self.limit} (serve.max_inflight_bytes); retry shortly", "server_busy")
        self.used += n
        self.gauge.set(self.used)

    def give(self, n: int) -> None:
        self.used -= n
        self.gauge.set(self.used)


class Admission:
    """One request's share of the budget: taken before its body is read, given back when it ends, however."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.held += n

    def close(self) -> None:
        self.budget.give(self.held)
        self.held = 0


@dataclass
class ServerState:
    encoder: Encoder
    batcher: Batcher
    decoders: DecodeWorkers
    metrics: Metrics
    model_name: str  # the id served in /v1/models
    model_names: set[str]  # ids a request may name: the served id and encoder.model as configured
    limits: Limits
    max_body_bytes: int
    max_queued_images: int
    api_key: str | None
    budget: ByteBudget
    tokens: TokenCounter
    body_timeout_s: float
    in_flight_images: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def embeds_text(self) -> bool:
        return getattr(self.encoder, "tokenizer", None) is not None


def _check_key(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "invalid_api_key")


def _declared_length(request: Request, limit: int) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise ApiError(400, f"Content-Length: not a number ({declared!r})", "invalid_request")
    if int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes, at most {limit} (serve.max_body_bytes)",
                       "body_too_large")
    return int(declared)


async def _receive(request: Request, limit: int, admission: Admission, declared: int | None) -> bytearray:
    """The body's chunks into one buffer: of the declared size at once (appending reallocated and copied the
    buffer ~50 times for 60 MB, on the event loop), else joined at the end, each chunk admitted as it arrives."""
    if declared is None:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is over {limit} bytes (serve.max_body_bytes)", "body_too_large")
            admission.take(len(chunk))
            chunks.append(chunk)
        return bytearray().join(chunks)
    body, size = bytearray(declared), 0
    with memoryview(body) as view:
        async for chunk in request.stream():  # h11 holds the body to its Content-Length
            view[size:size + len(chunk)] = chunk
            size += len(chunk)
    return body


async def _read_body(request: Request, state: ServerState, admission: Admission) -> bytearray:
    """The body, admitted to the byte budget from its Content-Length before it is read (a chunked one as it
    arrives); 413 past serve.max_body_bytes, 408 when it is not all there within serve.body_timeout_s."""
    declared = _declared_length(request, state.max_body_bytes)
    admission.take(declared or 0)
    try:
        return await asyncio.wait_for(_receive(request, state.max_body_bytes, admission, declared),
                                      state.body_timeout_s)
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11; a distinct class on 3.10
        raise ApiError(408, f"the body did not arrive within {state.body_timeout_s:g} s (serve.body_timeout_s)",
                       "body_timeout") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read: the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """work's result; if the client leaves first, work is cancelled (its images and rows dropped), ClientGone."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
    if gone:
        await asyncio.gather(task, return_exceptions=True)  # its finally blocks give back what it held
        raise ClientGone
    return task.result()


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


def _error_response(exc: ApiError) -> Response:
    headers = {429: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"},
               408: {"Connection": "close"}}.get(exc.status)  # 408: the half-sent body's connection is freed
    return JSONResponse(exc.body(), exc.status, headers=headers)


async def _respond(request: Request, state: ServerState, admission: Admission) -> tuple[Response, str]:
    """The answer to POST /v1/embeddings and its kind (image, text, invalid); every step that reads the whole body
    or every input runs off the event loop, so /v1/health/live answers while a large request is handled."""
    kind = "invalid"
    try:
        _check_key(request, state)
        body = await _read_body(request, state, admission)
        parsed = await asyncio.to_thread(parse_request, body, state.limits, state.model_names, state.encoder.dim)
        kind = "image" if parsed.images else "text"
        work = _admitted_images(state, parsed) if parsed.images else _embed_texts(state, parsed)
        return Response(await _unless_gone(request, work), media_type="application/json"), kind
    except ApiError as exc:
        return _error_response(exc), kind
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
            _check_key(request, state)
        except ApiError as exc:
            return JSONResponse(exc.body(), exc.status, headers={"WWW-Authenticate": "Bearer"})
        fingerprint = state.encoder.fingerprint()
        entry = {
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "embindex",
            "root": fingerprint["model"],
            "embindex": {"dim": state.encoder.dim, "fingerprint": fingerprint, "max_items": state.limits.max_items,
                         "modalities": ["image", "text"] if state.embeds_text else ["image"],
                         "smoke_test": bool(getattr(state.encoder, "smoke_test", False))},
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

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/health/ready", ready, methods=["GET"]),
            Route("/v1/health/live", live, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
