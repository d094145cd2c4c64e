"""An encoder behind a remote NIM/OpenAI-compatible /v1/embeddings endpoint (encoder.kind: http)."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import EncoderConfig
from pipeline.decode.spec import InputSpec
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


class RemoteError(RuntimeError):
    """The endpoint failed in a way no retry fixed: the run fails (exit 1), no file is blamed."""


@dataclass
class Refused:
    """The endpoint refused one input (a 4xx for a request of that input alone)."""

    status: int
    reason: str


def base_url(url: str) -> str:
    """http://host:8000, http://host:8000/v1 and http://host:8000/v1/embeddings all mean the same server."""
    url = url.rstrip("/")
    for suffix in ("/embeddings", "/v1"):
        url = url.removesuffix(suffix)
    return url


def _api_key(config: EncoderConfig) -> str | None:
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError(f"encoder.api_key_env: the environment variable {config.api_key_env} is not set (or empty)")
    return key


@dataclass
class HttpSource:
    """What describe_model knows of a remote encoder without asking it: enough to check the index's identity."""

    config: EncoderConfig
    offline: bool = False
    smoke_test: bool = False

    @property
    def name(self) -> str:
        return self.config.model

    @property
    def device(self) -> str:
        return base_url(self.config.url or "")

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "kind": "http", "url": self.device, "dtype": "float32"}


def _reason(response: Any) -> str:
    """The readable reason of a refusal: embindex serve's `reason`, else the error message, else the status."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        fallback = f"refused by the server (HTTP {response.status_code})"
        return str(error.get("reason") or error.get("message") or fallback)
    if isinstance(error, str):
        return error
    return f"refused by the server (HTTP {response.status_code})"


class _Endpoint:
    """An HTTP client for one server whose requests are retried with exponential backoff on 429, 5xx and
    connection errors."""

    def __init__(self, config: EncoderConfig, url: str) -> None:
        try:
            import httpx
        except ImportError:
            raise ConfigError("encoder.kind: 'http' needs the [serve] extra: pip install 'embindex[serve]'") from None
        self.url, self.retries, self._httpx = url, config.request_retries, httpx
        key = _api_key(config)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=config.request_timeout_s,
                                   limits=httpx.Limits(max_connections=config.request_concurrency + 2))

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else None
        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, path, content=body, headers=headers)
            except self._httpx.TransportError as exc:
                problem, wait_s = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}: {_reason(response)}"
                retry_after = response.headers.get("retry-after", "")
                wait_s = min(float(retry_after), 60.0) if retry_after.isdigit() else None
            if attempt == self.retries:
                raise RemoteError(f"{method} {self.url}{path} failed {attempt + 1} times, last: {problem}")
            wait_s = wait_s if wait_s is not None else min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s %s: %s; retrying in %.1f s", method, path, problem, wait_s)
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


class HttpEncoder:
    """The Encoder protocol over an endpoint: it embeds files' bytes and texts; the server decodes."""

    kind = "http"
    multivector = False
    remote = True

    def __init__(self, config: EncoderConfig) -> None:
        self.config, self.url = config, base_url(config.url or "")
        self.name, self.device, self.dtype = config.model, self.url, "float32"
        self.endpoint = _Endpoint(config, self.url)
        entry = self._model_entry()
        extra = entry.get("embindex") or {}
        self.server = extra.get("fingerprint") or {"id": entry.get("id"), "owned_by": entry.get("owned_by")}
        self.smoke_test = bool(extra.get("smoke_test", False))
        self.encoding_format = "base64" if extra else "float"  # base64 where the server is known to take it
        self.dim = int(extra.get("dim") or self._probe_dim())
        if self.smoke_test:
            log.warning("SMOKE TEST: the server at %s serves a random-weight model; its embeddings are meaningless",
                        self.url)
        log.info("using %s at %s: %d-dimensional", self.name, self.url, self.dim)

    # -- set-up -------------------------------------------------------------------------
    def _model_entry(self) -> dict[str, Any]:
        from pipeline.errors import ModelLoadError

        try:
            response = self.endpoint.request("GET", "/v1/models")
        except RemoteError as exc:
            raise ModelLoadError(f"could not reach the embedding server at {self.url} ({exc}). Start it "
                                 "(`embindex serve CONFIG`) or fix encoder.url") from None
        if response.status_code in (401, 403):
            raise ModelLoadError(f"the embedding server at {self.url} refused the API key (HTTP "
                                 f"{response.status_code}); check encoder.api_key_env")
        if response.status_code != 200:
            raise ModelLoadError(f"GET {self.url}/v1/models answered HTTP {response.status_code}: {_reason(response)}")
        entries = response.json().get("data") or []
        ids = [entry.get("id") for entry in entries]
        for entry in entries:
            if self.name in (entry.get("id"), entry.get("root")):
                return entry
        raise ConfigError(f"encoder.model: {self.name!r} is not served at {self.url} (it serves {ids})")

    def _probe_dim(self) -> int:
        """A server that does not say its dimension: embed one 8x8 PNG."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, "PNG")
        result = self.embed_uris(["data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()])
        if isinstance(result, Refused):
            raise RemoteError(f"the server refused a probe image: {result.reason}")
        return int(result.shape[1])

    # -- requests -----------------------------------------------------------------------
    def _vectors(self, response: Any, n: int) -> np.ndarray:
        data = sorted(response.json().get("data") or [], key=lambda entry: entry.get("index", 0))
        if len(data) != n:
            raise RemoteError(f"the server returned {len(data)} vectors for {n} inputs")
        rows = [np.frombuffer(base64.b64decode(e["embedding"]), "<f4") if isinstance(e["embedding"], str)
                else np.asarray(e["embedding"], np.float32) for e in data]
        vectors = np.stack(rows).astype(np.float32)
        # Vectors are stored L2-normalised whatever the server sends.
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def embed(self, inputs: list[str], request_type: str) -> np.ndarray | Refused:
        """Vectors for these inputs, or the server's refusal (a 4xx); RemoteError when it keeps failing."""
        payload = {"model": self.name, "input": inputs, "request_type": request_type,
                   "encoding_format": self.encoding_format}
        response = self.endpoint.request("POST", "/v1/embeddings", json.dumps(payload).encode())
        if response.status_code == 200:
            return self._vectors(response, len(inputs))
        if response.status_code in (401, 403):
            raise RemoteError(f"the server refused the API key (HTTP {response.status_code}); check "
                              "encoder.api_key_env")
        if response.status_code == 404:
            raise RemoteError(f"POST {self.url}/v1/embeddings: HTTP 404: {_reason(response)}")
        return Refused(response.status_code, _reason(response))

    def embed_uris(self, uris: list[str]) -> np.ndarray | Refused:
        return self.embed(uris, "bulk_image")

    # -- the Encoder protocol -------------------------------------------------------------
    def input_spec(self) -> InputSpec:
        """The remote model's input as embindex serve describes it (else a nominal 224 square). Nothing is
        decoded here: the run's layout code only asks whether the input has a fixed size (it has)."""
        preprocess = self.server.get("preprocess") or {}
        size = tuple(preprocess.get("size") or (224, 224))
        crop = tuple(preprocess["crop"]) if preprocess.get("crop") else None
        return InputSpec("shortest_edge" if crop else "exact", size, crop)  # type: ignore[arg-type]

    def encode_images(self, pixels: Any) -> Any:
        raise NotImplementedError("an http encoder embeds files, not pixels: query by text, or by an indexed file")

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), self.config.request_images):
            result = self.embed(texts[start:start + self.config.request_images], "bulk_text")
            if isinstance(result, Refused):
                raise RemoteError(f"the server refused the texts: {result.reason}")
            chunks.append(result)
        return np.concatenate(chunks)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.name, "kind": "http", "url": self.url, "dtype": "float32", "dim": self.dim,
                "server": self.server}

    def close(self) -> None:
        self.endpoint.close()


def describe_http(config: EncoderConfig) -> HttpSource:
    return HttpSource(config)
