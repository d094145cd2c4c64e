"""`embindex serve` under hostile requests (issue 16), through the CLI on 127.0.0.1: the byte budget for requests in
flight, text length and JSON shape limits, `model` of any JSON type, disconnects counted as 499 (never 500), and the
start-up warning for a server reachable beyond loopback without an API key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.probes import metric, raw_request, read_response, status_count, wait_for
from tests.serve.test_server import serve_config, serve_process

BODY_LIMIT = 1_000_000
BUDGET = 1_500_000  # one body of 1 MB in flight leaves room for 0.5 MB more
TEXT_LIMIT = 1000


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[dict]:
    """A server on 0.0.0.0 (reached through 127.0.0.1) without an API key, with small limits."""
    folder = tmp_path_factory.mktemp("hostile")
    config = serve_config(folder, tiny_models / "clip", decode_workers=1, batch_window_ms=0,
                          max_body_bytes=BODY_LIMIT, max_inflight_bytes=BUDGET, max_text_chars=TEXT_LIMIT)
    with serve_process(config, folder / "serve.log", args=("--host", "0.0.0.0")) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"url": url, "client": client, "log": folder / "serve.log"}


def inflight(server: dict) -> float:
    return metric(server["url"], "embindex_inflight_bytes")


def padded(size: int) -> bytes:
    """A valid text request of exactly `size` bytes."""
    head = b'{"input": "a cat", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def post(server: dict, content: bytes) -> httpx.Response:
    return server["client"].post("/v1/embeddings", content=content, headers={"Content-Type": "application/json"})


def test_serving_beyond_loopback_without_a_key_warns_at_start(hostile: dict) -> None:
    log = Path(hostile["log"]).read_text()
    assert "WARNING" in log and "SERVING ON 0.0.0.0 WITHOUT AN API KEY" in log and "serve.api_key_env" in log


@pytest.mark.parametrize("host, key, warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True), ("gpu-box.example", None, True),
    ("0.0.0.0", "a-key", False), ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False),
    ("[::1]", None, False), ("localhost", None, False),
])
def test_the_warning_is_for_non_loopback_hosts_without_a_key(host: str, key: str | None, warns: bool) -> None:
    from pipeline.serve.server import exposure_warning  # here: the module's other tests run without it

    assert (exposure_warning(host, key) is not None) is warns


def test_requests_past_the_byte_budget_get_429_until_it_is_given_back(hostile: dict) -> None:
    body = padded(BODY_LIMIT)
    held = raw_request(hostile["url"], len(body), body[:100])  # admitted from its Content-Length, half-sent
    wait_for(lambda: inflight(hostile) == BODY_LIMIT, "the held request's bytes admitted")
    refused = post(hostile, padded(600_000))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    error = refused.json()["error"]
    assert error["code"] == "server_busy" and "serve.max_inflight_bytes" in error["message"]
    assert set(error) == {"message", "type", "code", "param"}
    held.sendall(body[100:])
    status, _, reply = read_response(held)
    held.close()
    assert status == 200 and len(reply["data"]) == 1
    assert inflight(hostile) == 0
    assert post(hostile, padded(600_000)).status_code == 200


def test_a_chunked_body_is_admitted_as_it_arrives(hostile: dict) -> None:
    body = padded(BODY_LIMIT)
    held = raw_request(hostile["url"], len(body), body[:100])
    wait_for(lambda: inflight(hostile) == BODY_LIMIT, "the held request's bytes admitted")
    chunks = padded(700_000)
    streamed = hostile["client"].post("/v1/embeddings", content=iter([chunks[:350_000], chunks[350_000:]]))
    assert streamed.status_code == 429 and streamed.json()["error"]["code"] == "server_busy"
    held.close()
    wait_for(lambda: inflight(hostile) == 0, "the budget given back after the disconnect")


def test_the_budget_is_given_back_after_errors_and_disconnects(hostile: dict) -> None:
    gone_before = status_count(hostile["url"], 499)
    sock = raw_request(hostile["url"], BODY_LIMIT, b'{"input": "')
    wait_for(lambda: inflight(hostile) == BODY_LIMIT, "the half-sent request's bytes admitted")
    sock.close()
    wait_for(lambda: inflight(hostile) == 0, "the budget given back after the disconnect")
    wait_for(lambda: status_count(hostile["url"], 499) == gone_before + 1, "the disconnect counted as 499")
    broken = post(hostile, b"{" * (BODY_LIMIT - 10))
    assert broken.status_code == 400 and inflight(hostile) == 0


def test_a_text_over_max_text_chars_gets_400_naming_it(hostile: dict) -> None:
    assert hostile["client"].post("/v1/embeddings", json={"input": ["a cat", "y" * TEXT_LIMIT]}).status_code == 200
    response = hostile["client"].post("/v1/embeddings", json={"input": ["a cat", "y" * (TEXT_LIMIT + 1)]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "text_too_long" and error["param"] == "input[1]"
    assert "serve.max_text_chars" in error["message"]


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body, code", [
    (b"[" * 100_000 + b"]" * 100_000, "json_too_complex"),  # raised RecursionError: a 500
    (json.dumps({"input": "a cat", "x": nested(40)}).encode(), "json_too_deep"),
    (json.dumps({"input": "a cat", "x": [[]] * 20_000}).encode(), "json_too_complex"),  # 20,000 lists from 60 KB
    (json.dumps({"input": "a cat", **{f"k{i}": "" for i in range(11_000)}}).encode(), "json_too_complex"),
])
def test_json_too_deep_or_too_large_gets_400(hostile: dict, body: bytes, code: str) -> None:
    response = post(hostile, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code


def test_json_within_the_limits_is_served(hostile: dict) -> None:
    response = post(hostile, json.dumps({"input": "a cat", "x": nested(30), "y": [1] * 5000}).encode())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("model", [["clip"], {"id": "clip"}, 5, 1.5, True])
def test_a_model_that_is_not_a_string_gets_400(hostile: dict, model: object) -> None:
    response = hostile["client"].post("/v1/embeddings", json={"input": "a cat", "model": model})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_model" and error["param"] == "model"


def test_model_as_a_string_or_null_is_as_before(hostile: dict) -> None:
    client = hostile["client"]
    assert client.post("/v1/embeddings", json={"input": "a cat", "model": "clip"}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": "a cat", "model": None}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": "a cat", "model": "other"}).status_code == 404


def test_no_hostile_request_got_a_500_or_a_traceback(hostile: dict) -> None:
    assert status_count(hostile["url"], 500) == 0
    log = Path(hostile["log"]).read_text()
    assert "Traceback" not in log and " ERROR " not in log
