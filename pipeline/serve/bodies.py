"""Request plumbing every route shares: the API key check, the byte budget, reading a body within it, JSON errors."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Coroutine
from typing import Any, TypeVar

from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.serve.errors import ApiError

T = TypeVar("T")
CLIENT_GONE = 499  # nginx's status for a client that closed its connection first; counted, never sent


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read: the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
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


def has_key(request: Request, api_key: str | None) -> bool:
    """True when no key is configured or the request's `Authorization: Bearer` header carries it."""
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def check_key(request: Request, api_key: str | None) -> None:
    if not has_key(request, api_key):
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


async def read_body(request: Request, admission: Admission, max_body_bytes: int, timeout_s: float) -> bytearray:
    """The body, admitted to the byte budget from its Content-Length before it is read (a chunked one as it
    arrives); 413 past serve.max_body_bytes, 408 when it is not all there within serve.body_timeout_s."""
    declared = _declared_length(request, max_body_bytes)
    admission.take(declared or 0)
    try:
        return await asyncio.wait_for(_receive(request, max_body_bytes, admission, declared), timeout_s)
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11; a distinct class on 3.10
        raise ApiError(408, f"the body did not arrive within {timeout_s:g} s (serve.body_timeout_s)",
                       "body_timeout") from None


def error_response(exc: ApiError) -> Response:
    headers = {429: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"},
               408: {"Connection": "close"}}.get(exc.status)  # 408: the half-sent body's connection is freed
    return JSONResponse(exc.body(), exc.status, headers=headers)
