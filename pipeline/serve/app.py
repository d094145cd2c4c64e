"""The HTTP routes: POST /v1/embeddings, GET /v1/models, /v1/health/ready, /v1/health/live and /metrics."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.encode.models.base import Encoder
from pipeline.serve.batching import Batcher
from pipeline.serve.errors import ApiError
from pipeline.serve.images import Decoded, DecodeWorkers, Failed
from pipeline.serve.metrics import Metrics
from pipeline.serve.parse import EmbedRequest, Limits, parse_request
from pipeline.serve.responses import image_response, text_response

log = logging.getLogger(__name__)


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from its Content-Length before reading, or as soon as it runs past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length: not a number ({declared!r})", "invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"the body is {int(declared)} bytes, at most {limit} (serve.max_body_bytes)",
                           "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over {limit} bytes (serve.max_body_bytes)", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _count_tokens(encoder: Encoder, texts: list[str]) -> int:
    tokenizer = getattr(encoder, "tokenizer", None)
    try:
        return sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])  # type: ignore[misc]
    except Exception:  # usage is informative only
        return 0


async def _embed_images(state: ServerState, request: EmbedRequest) -> dict[str, Any]:
    started = time.perf_counter()
    results = await state.decoders.decode(request.items, request.max_image_pixels, request.pyramid)
    state.metrics.decode_seconds.observe(time.perf_counter() - started)
    for index, result in enumerate(results):
        if isinstance(result, Failed):
            raise ApiError(result.status, f"input[{index}]: {result.reason}", result.code, f"input[{index}]",
                           reason=result.reason)
    decoded: list[Decoded] = results  # type: ignore[assignment]
    pixels = decoded[0].pixels if len(decoded) == 1 else np.concatenate([d.pixels for d in decoded])
    vectors = await state.batcher.embed_images(pixels)
    state.metrics.items.labels("image").inc(len(decoded))
    state.metrics.vectors.inc(len(vectors))
    return image_response(state.model_name, decoded, vectors, request.encoding_format)


async def _embed_texts(state: ServerState, request: EmbedRequest) -> dict[str, Any]:
    if not state.embeds_text:
        raise ApiError(400, f"model {state.model_name!r} has no text tower: send images (data URIs)",
                       "text_not_supported", "input")
    vectors = await state.batcher.embed_texts(request.items)
    state.metrics.items.labels("text").inc(len(request.items))
    state.metrics.vectors.inc(len(vectors))
    return text_response(state.model_name, vectors, _count_tokens(state.encoder, request.items),
                         request.encoding_format)


def create_app(state: ServerState) -> Starlette:
    metrics = state.metrics

    async def embeddings(request: Request) -> Response:
        started, kind, accepted = time.perf_counter(), "invalid", 0
        try:
            _check_key(request, state)
            body = await _read_body(request, state.max_body_bytes)
            parsed = parse_request(body, state.limits, state.model_names, state.encoder.dim)
            kind = "image" if parsed.images else "text"
            if parsed.images:
                if state.in_flight_images + len(parsed.items) > state.max_queued_images:
                    raise ApiError(429, f"busy: {state.in_flight_images} images in flight; retry shortly",
                                   "server_busy")
                accepted = len(parsed.items)
                state.in_flight_images += accepted
                metrics.queued_images.set(state.in_flight_images)
                payload = await _embed_images(state, parsed)
            else:
                payload = await _embed_texts(state, parsed)
            response: Response = JSONResponse(payload)
        except ApiError as exc:
            response = JSONResponse(exc.body(), exc.status, headers={"Retry-After": "1"} if exc.status == 429
                                    else {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        except Exception:  # a server fault, never the client's input: logged with its traceback
            log.exception("embeddings request failed")
            response = JSONResponse(ApiError(500, "internal server error", "internal_error").body(), 500)
        finally:
            if accepted:
                state.in_flight_images -= accepted
                metrics.queued_images.set(state.in_flight_images)
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
