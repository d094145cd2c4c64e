"""Probes for the hostile-use tests: raw HTTP requests held half-sent, /metrics values, waiting on a response."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll `check` (a request to the server) until it holds; the timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.02)


def metric(url: str, sample: str) -> float:
    """One sample of GET /metrics, e.g. 'embindex_inflight_bytes'; 0 when it is not there."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def status_count(url: str, status: int) -> float:
    return metric(url, f'embindex_requests_total{{route="/v1/embeddings",status="{status}"}}')


def raw_request(url: str, length: int, first: bytes) -> socket.socket:
    """A POST /v1/embeddings declaring `length` body bytes of which only `first` is sent (yet)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")
    sock.sendall(head.encode() + first)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of the answer on `sock`."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(body) if body else None


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (a read returns end of file)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Gate:
    """Holds each call of `func` until the test lets one through: work that is slow by construction."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.entered = threading.Semaphore(0)  # one release per call that reached the gate
        self.passes = threading.Semaphore(0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.release()
        if not self.passes.acquire(timeout=120):
            raise RuntimeError("the test never let this call through")
        return self.func(*args, **kwargs)

    def open(self, calls: int = 16) -> None:
        for _ in range(calls):
            self.passes.release()
