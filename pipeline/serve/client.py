"""`embindex query --server`: the query sent to a running `embindex serve`, with the standard library alone."""

# No model, LanceDB or HTTP library is imported here (pyproject's import contracts hold it): the command's whole run
# is the interpreter, click, the config and one request, so a query answers in well under a second.

from __future__ import annotations

import base64
import json
import mimetypes
import os
import urllib.error
import urllib.request
from typing import Any

# What the server's hits add to the Index's columns: the command prints the columns alone, as a local query does.
LINK_FIELDS = ("thumbnail_url", "preview_url", "image_url", "tile_box")
# Whether a server answers at the config's serve address: on loopback an answer takes milliseconds and a closed port
# refuses at once; only a host that drops packets makes the command wait this long before searching locally.
PROBE_TIMEOUT_S = 0.5
# A query image not in the index is decoded and embedded by the server, behind other requests' batches.
SEARCH_TIMEOUT_S = 120.0
API_KEY_ENV = "EMBINDEX_API_KEY"  # the key's variable when no config names one (serve.api_key_env)


class ServerError(Exception):
    """The server refused the query (`status`: its HTTP status) or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def base_url(url: str) -> str:
    """`gpu-box:8000`, `http://gpu-box:8000/` or `.../v1` -> `http://gpu-box:8000`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


def address_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server bound to host:port at (a wildcard means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _call(url: str, method: str, payload: dict[str, Any] | None, api_key: str | None, timeout: float) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServerError(_message(exc), exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, unreachable, timed out, not JSON
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach {url}: {reason}") from None


def _message(exc: urllib.error.HTTPError) -> str:
    """The server's own message (`{"error": {"message"}}`, or search info's `message`), else the status line."""
    try:
        body = json.loads(exc.read())
    except (ValueError, OSError):
        return f"{exc.code} {exc.reason}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{exc.code} {exc.reason}"


def search(url: str, query: dict[str, Any], api_key: str | None, timeout: float = SEARCH_TIMEOUT_S) -> dict[str, Any]:
    """POST /v1/search: the server's answer (hits in `data`), or ServerError."""
    answer = _call(base_url(url) + "/v1/search", "POST", query, api_key, timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise ServerError(f"{url} did not answer as `embindex serve` does (no `data` list)")
    return answer


def api_key(variable: str | None) -> str | None:
    """The key to send: the value of `variable` (a config's serve.api_key_env), else of EMBINDEX_API_KEY."""
    return os.environ.get(variable or API_KEY_ENV) or None


def serves_index(url: str, uri: str, table: str, key: str | None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an `embindex serve` at url answers and searches the LanceDB table at uri (GET /v1/search)."""
    try:
        info = _call(base_url(url) + "/v1/search", "GET", None, key, timeout)
    except ServerError:
        return False
    if not isinstance(info, dict) or not info.get("available") or not isinstance(info.get("index"), dict):
        return False
    served_uri = info["index"].get("uri")
    return info["index"].get("table") == table and isinstance(served_uri, str) and (
        served_uri == uri or os.path.realpath(served_uri) == os.path.realpath(uri))


def image_query(path: str) -> dict[str, str]:
    """{"image": a data URI of the file's bytes}; the server decodes them as `embindex run` decodes the file."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ServerError(f"cannot read query image {path}: {exc.strerror or exc}", 400) from None
    kind = mimetypes.guess_type(path)[0] or ""
    kind = kind if kind.startswith("image/") else "image/x-unknown"  # a label only: the server reads the bytes
    return {"image": f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"}


def query_server(url: str, text: str | None, image_path: str | None, k: int, where: str | None,
                 key: str | None) -> tuple[list[dict[str, Any]], bool, bool]:
    """`embindex query` through the server: its hits as a local query gives them (the Index's columns, without the
    server's links), whether they name pyramid tiles, and whether the server's model is a smoke test."""
    payload: dict[str, Any] = {"text": text} if text is not None else image_query(image_path or "")
    answer = search(url, {**payload, "k": k, **({"where": where} if where else {})}, key)
    rows = [{name: value for name, value in hit.items() if name not in LINK_FIELDS} for hit in answer["data"]]
    return rows, bool(answer.get("tiles")), bool(answer.get("smoke_test"))
