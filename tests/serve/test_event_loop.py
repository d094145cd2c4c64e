"""The event loop stays free (issue 16), on the real ASGI server (uvicorn, 127.0.0.1) in this process so a test can
hold a step: while a request is parsed, tokenized or rendered, /v1/health/live answers; a client that leaves while
its request is encoded is counted as 499 and logged at debug level; a half-sent body gets 408 and its connection
is closed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

import pipeline.serve.app as app_module
from pipeline.config import load_config
from pipeline.serve.app import create_app
from pipeline.serve.server import build_state
from tests.serve.probes import (
    Gate,
    closed_by_server,
    metric,
    raw_request,
    read_response,
    status_count,
    wait_for,
)
from tests.serve.test_server import free_port, png_uri

IMAGE_REQUEST = {"input": [png_uri(), png_uri(40, 30)]}
TEXT_REQUEST = {"input": ["a dog on a beach", "a red car"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("event-loop")
    (folder / "serve.yaml").write_text(yaml.safe_dump({
        "encoder": {"model": str(tiny_models / "clip"), "device": "cpu", "batch_size": 16},
        "serve": {"decode_workers": 1, "batch_window_ms": 0},
    }))
    state = build_state(load_config(folder / "serve.yaml", require_input=False))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=free_port(), log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn started")
    assert server.started, "uvicorn did not start"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "state": state}
    server.should_exit = True
    thread.join(30)


def live_answers(served: dict) -> bool:
    """GET /v1/health/live; 10 s only bounds a failing test (a free loop answers in milliseconds)."""
    return httpx.get(f"{served['url']}/v1/health/live", timeout=10).status_code == 200


@pytest.mark.parametrize("step, payload", [
    ("parse_request", IMAGE_REQUEST),  # json and the input checks: a 60 MB body held the loop ~0.3 s
    ("image_response", IMAGE_REQUEST),  # vectors to JSON
    ("text_response", TEXT_REQUEST),
])
def test_live_answers_while_a_step_of_a_request_is_held(served: dict, monkeypatch: pytest.MonkeyPatch, step: str,
                                                        payload: dict) -> None:
    gate = Gate(getattr(app_module, step))
    monkeypatch.setattr(app_module, step, gate)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(served["client"].post, "/v1/embeddings", json=payload)
        try:
            assert gate.entered.acquire(timeout=60), f"the request never reached {step}"
            assert live_answers(served)
            assert not pending.done()  # the request is still held in its step
        finally:
            gate.open()
        assert pending.result().status_code == 200


def test_live_answers_while_texts_are_tokenized(served: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tokenizer call (the encoder's, the usage count's) is held until live has answered."""
    tokenizer_class = type(served["state"].encoder.tokenizer)
    gate = Gate(tokenizer_class.__call__)
    monkeypatch.setattr(tokenizer_class, "__call__", lambda self, *args, **kwargs: gate(self, *args, **kwargs))
    held = 0
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(served["client"].post, "/v1/embeddings", json=TEXT_REQUEST)
        try:
            while not pending.done():
                if gate.entered.acquire(timeout=0.05):
                    assert live_answers(served), "live did not answer while a tokenizer call was held"
                    held += 1
                    gate.passes.release()
        finally:
            gate.open()
        assert pending.result().status_code == 200
    assert held >= 2  # the encoder's tokenizer and the usage count's


def test_a_client_that_leaves_mid_request_is_499_at_debug_level(served: dict, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline.serve")
    tokenizer_class = type(served["state"].encoder.tokenizer)
    gate = Gate(tokenizer_class.__call__)
    monkeypatch.setattr(tokenizer_class, "__call__", lambda self, *args, **kwargs: gate(self, *args, **kwargs))
    gone_before = status_count(served["url"], 499)
    body = b'{"input": ["a dog that leaves"]}'
    sock = raw_request(served["url"], len(body), body)
    try:
        assert gate.entered.acquire(timeout=60), "the request was never tokenized"
        sock.close()
        wait_for(lambda: status_count(served["url"], 499) == gone_before + 1, "the disconnect counted as 499")
    finally:
        gate.open()
    assert status_count(served["url"], 500) == 0
    assert [r for r in caplog.records if "went away" in r.getMessage() and r.levelno == logging.DEBUG]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert live_answers(served) and served["client"].post("/v1/embeddings", json=TEXT_REQUEST).status_code == 200


def test_a_body_not_sent_in_time_gets_408_and_its_connection_closed(served: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(served["state"], "body_timeout_s", 0.5)
    sock = raw_request(served["url"], 1000, b'{"input": "')
    status, headers, reply = read_response(sock)
    assert status == 408 and reply["error"]["code"] == "body_timeout", reply
    assert "serve.body_timeout_s" in reply["error"]["message"] and headers["connection"] == "close"
    assert closed_by_server(sock)
    sock.close()
    assert metric(served["url"], "embindex_inflight_bytes") == 0
