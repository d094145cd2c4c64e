"""`embindex serve` on 127.0.0.1 with the tiny CLIP: the NIM/OpenAI forms, pyramid tiles, every bad input's 4xx,
dynamic batching, and served vectors equal to the batch pipeline's."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import lancedb
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.encode.models.load import load_encoder
from pipeline.runners.local import run_index
from tests.conftest import HOSTILE, IMAGES, REPO, write_config

API_KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PHOTOS = sorted(IMAGES.iterdir())[:8]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_config(folder: Path, model: Path, **serve: object) -> Path:
    """A serve config in `folder` for `model` on the CPU (batch size 16) with these `serve` keys."""
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"model": str(model), "device": "cpu", "batch_size": 16},
                                      "serve": serve}))
    return config


@contextmanager
def serve_process(config: Path, log: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
                  ) -> Iterator[str]:
    """`embindex serve CONFIG` in a subprocess, as a user starts it; yields its URL once /v1/health/ready is 200."""
    port = free_port()
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(config), "--port", str(port),
                                    *args], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"embindex serve exited {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"embindex serve did not get ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def data_uri(path: Path) -> str:
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_uri(width: int = 16, height: int = 12) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def vectors(response: httpx.Response) -> np.ndarray:
    rows = []
    for entry in response.json()["data"]:
        value = entry["embedding"]
        rows.append(np.frombuffer(base64.b64decode(value), "<f4") if isinstance(value, str) else np.array(value))
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("serve")
    config = serve_config(folder, tiny_models / "clip", decode_workers=2, max_body_bytes=4_000_000,
                          batch_window_ms=50, api_key_env="EMBINDEX_TEST_KEY")
    env = {**os.environ, "EMBINDEX_TEST_KEY": API_KEY}
    with serve_process(config, folder / "serve.log", env) as url:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as client:
            yield {"url": url, "client": client, "model": str(tiny_models / "clip"), "log": folder / "serve.log"}


def embed(server: dict, **payload: object) -> httpx.Response:
    return server["client"].post("/v1/embeddings", json=payload)


def test_models_health_and_metrics(server: dict) -> None:
    client = server["client"]
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["clip"]
    assert models[0]["embindex"]["dim"] == 32 and models[0]["embindex"]["smoke_test"] is True
    assert client.get("/v1/health/ready").status_code == 200
    assert client.get("/v1/health/live").status_code == 200
    embed(server, input=png_uri())
    metrics = client.get("/metrics").text
    assert 'embindex_requests_total{route="/v1/embeddings",status="200"}' in metrics
    assert "embindex_batch_size_bucket" in metrics


def test_single_image_nim_form(server: dict) -> None:
    response = embed(server, input=data_uri(PHOTOS[0]), model="clip", request_type="query")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "clip"
    assert [(e["object"], e["index"]) for e in body["data"]] == [("embedding", 0)]
    assert body["usage"]["num_images"] == 1 and body["usage"]["num_patches"] == 1
    vector = vectors(response)[0]
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_bulk_images_float_and_base64_agree(server: dict) -> None:
    uris = [data_uri(p) for p in PHOTOS[:5]]
    as_float = embed(server, input=uris, request_type="bulk_image", model=server["model"])
    as_base64 = embed(server, input=uris, encoding_format="base64")
    assert as_float.status_code == as_base64.status_code == 200
    assert [e["index"] for e in as_float.json()["data"]] == [0, 1, 2, 3, 4]
    assert isinstance(as_base64.json()["data"][0]["embedding"], str)
    np.testing.assert_allclose(vectors(as_float), vectors(as_base64), atol=1e-6)
    one_by_one = np.stack([vectors(embed(server, input=uri))[0] for uri in uris[:2]])
    assert np.all(np.sum(one_by_one * vectors(as_float)[:2], axis=1) > 0.999)  # batching does not change vectors
    assert as_float.json()["usage"]["num_images"] == 5


def test_text_matches_the_local_text_tower(server: dict) -> None:
    texts = ["a dog on a beach", "a red car"]
    response = embed(server, input=texts, request_type="bulk_text")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 0
    config = load_config(write_config(Path(server["log"]).parent, str(IMAGES), server["model"]))
    local = load_encoder(config.encoder).encode_texts(texts)
    assert np.all(np.sum(local * vectors(response), axis=1) > 0.999)


def test_pyramid_gives_35_tiles_with_metadata(server: dict) -> None:
    photo = PHOTOS[1]
    response = embed(server, input=data_uri(photo), pyramid=[[1, 1], [3, 3], [5, 5]])
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 35 and response.json()["usage"]["num_patches"] == 35
    meta = [e["patch_metadata"] for e in data]
    assert [sum(m["level"] == level for m in meta) for level in range(3)] == [1, 9, 25]
    width, height = Image.open(photo).size
    assert meta[0]["box"] == [0, 0, width, height]
    finest = [m for m in meta if m["level"] == 2]
    assert sum((m["box"][2] - m["box"][0]) * (m["box"][3] - m["box"][1]) for m in finest) == width * height
    whole = vectors(embed(server, input=data_uri(photo)))[0]
    assert float(vectors(response)[0] @ whole) > 0.999  # the [1, 1] level is the image itself


def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start:start + 65536]


BAD_REQUESTS = {
    "invalid base64": ({"input": "data:image/png;base64,@@@not-base64@@@"}, 400, "invalid_base64"),
    "not an image": ({"input": data_uri(HOSTILE / "not_an_image.jpg")}, 422, "invalid_image"),
    "truncated image": ({"input": data_uri(HOSTILE / "truncated_half.jpg")}, 422, "invalid_image"),
    "too many pixels": ({"input": data_uri(HOSTILE / "decompression_bomb_400mpx.png")}, 422, "too_many_pixels"),
    "max_pixels below the image": ({"input": png_uri(), "max_pixels": 100}, 422, "too_many_pixels"),
    "too many items": ({"input": [png_uri()] * 65}, 400, "too_many_items"),
    "unknown model": ({"input": png_uri(), "model": "no-such-model"}, 404, "model_not_found"),
    "empty list": ({"input": []}, 400, "empty_input"),
    "empty string": ({"input": ""}, 400, "empty_input"),
    "no input": ({"model": "clip"}, 400, "empty_input"),
    "token arrays": ({"input": [[1, 2, 3]]}, 400, "invalid_input"),
    "a number": ({"input": 5}, 400, "invalid_input"),
    "mixed images and text": ({"input": [png_uri(), "a cat"]}, 400, "mixed_input"),
    "text before an image": ({"input": "lorem ipsum " + png_uri()}, 400, "invalid_input"),
    "data URI without base64": ({"input": "data:image/png,abc"}, 400, "invalid_data_uri"),
    "bad encoding_format": ({"input": png_uri(), "encoding_format": "int8"}, 400, "invalid_encoding_format"),
    "bad request_type": ({"input": png_uri(), "request_type": "images"}, 400, "invalid_request_type"),
    "texts as bulk_image": ({"input": ["a cat"], "request_type": "bulk_image"}, 400, "invalid_request_type"),
    "bad pyramid": ({"input": png_uri(), "pyramid": [[0, 3]]}, 400, "invalid_pyramid"),
    "pyramid on text": ({"input": "a cat", "pyramid": [[2, 2]]}, 400, "invalid_pyramid"),
    "bad max_pixels": ({"input": png_uri(), "max_pixels": "many"}, 400, "invalid_max_pixels"),
    "wrong dimensions": ({"input": png_uri(), "dimensions": 8}, 400, "invalid_dimensions"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_its_4xx(server: dict, name: str) -> None:
    payload, status, code = BAD_REQUESTS[name]
    response = embed(server, **payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_image_errors_carry_the_pipelines_reason(server: dict) -> None:
    error = embed(server, input=[png_uri(), data_uri(HOSTILE / "truncated_half.jpg")]).json()["error"]
    assert error["param"] == "input[1]" and error["reason"] == "truncated file"
    error = embed(server, input=data_uri(HOSTILE / "decompression_bomb_400mpx.png")).json()["error"]
    assert error["reason"] == "too many pixels: 400000000 > 100000000"


@pytest.mark.parametrize("body, headers", [
    (b"not json", {"Content-Type": "application/json"}),
    (b"[1, 2]", {"Content-Type": "application/json"}),
    (b"\xff\xfe", {"Content-Type": "application/json"}),
])
def test_malformed_bodies_get_400(server: dict, body: bytes, headers: dict) -> None:
    response = server["client"].post("/v1/embeddings", content=body, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_bodies_over_the_limit_get_413(server: dict) -> None:
    body = b'{"input": "' + b"A" * 5_000_000 + b'"}'
    declared = server["client"].post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    streamed = server["client"].post("/v1/embeddings", content=_chunks(body))  # chunked: no Content-Length
    assert streamed.status_code == 413
    assert server["client"].get("/v1/health/ready").status_code == 200


def test_api_key_is_required(server: dict) -> None:
    missing = httpx.post(f"{server['url']}/v1/embeddings", json={"input": png_uri()})
    wrong = httpx.post(f"{server['url']}/v1/embeddings", json={"input": png_uri()},
                       headers={"Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server['url']}/v1/models").status_code == 401
    assert httpx.get(f"{server['url']}/v1/health/ready").status_code == 200  # probes need no key


def test_unknown_routes_get_json_errors(server: dict) -> None:
    assert server["client"].get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert server["client"].get("/v1/embeddings").status_code == 405


def test_no_bad_input_ever_got_a_500(server: dict) -> None:
    metrics = server["client"].get("/metrics").text
    assert 'status="500"' not in metrics
    assert "Traceback" not in Path(server["log"]).read_text()


def _forward_passes(server: dict) -> float:
    for line in server["client"].get("/metrics").text.splitlines():
        if line.startswith('embindex_batch_size_count{kind="image"}'):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_requests_share_batches(server: dict) -> None:
    uris = [data_uri(p) for p in PHOTOS]
    before = _forward_passes(server)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: embed(server, input=uris[i % 8:i % 8 + 2]), range(0, 16, 2)))
    assert all(r.status_code == 200 for r in responses)
    assert _forward_passes(server) - before < len(responses)  # 8 requests, fewer forward passes


def test_served_vectors_equal_the_batch_pipelines(server: dict, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, str(IMAGES), server["model"]))
    config.input.root = [str(tmp_path / "photos")]
    (tmp_path / "photos").mkdir()
    for photo in PHOTOS:
        (tmp_path / "photos" / photo.name).write_bytes(photo.read_bytes())
    assert run_index(config, progress=False).report["images_embedded"] == len(PHOTOS)
    table = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow()
    indexed = dict(zip(table["path"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))))
    served = vectors(embed(server, input=[data_uri(p) for p in PHOTOS]))
    cosines = [float(indexed[p.name] @ v) for p, v in zip(PHOTOS, served)]
    assert min(cosines) >= 0.999, cosines


def test_bad_serve_config_exits_2(tmp_path: Path, tiny_models: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"model": str(tiny_models / "clip")}}))
    runner = CliRunner()
    result = runner.invoke(main, ["serve", str(config), "--set", "serve.max_items=0"])
    assert result.exit_code == 2 and "serve.max_items" in result.output
    result = runner.invoke(main, ["serve", str(config), "--set", "serve.api_key_env=EMBINDEX_NO_SUCH_VARIABLE"])
    assert result.exit_code == 2 and "EMBINDEX_NO_SUCH_VARIABLE" in result.output
    result = runner.invoke(main, ["serve", str(config), "--set", "serve.colour=blue"])
    assert result.exit_code == 2 and "serve.colour: unknown key" in result.output
