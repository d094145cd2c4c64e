"""POST /v1/search and the image routes over a small index: the local API's results, self-matches, filters, every bad
request's 4xx, signed thumbnail links, nothing served outside the index, and a server that has no index yet."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

import pipeline.serve.searcher as searcher_module
from pipeline.config import load_config
from pipeline.search.query import Index
from pipeline.serve.client import LINK_FIELDS
from pipeline.serve.server import build_state
from pipeline.serve.thumbnails import THUMBNAIL_SIZES
from tests.conftest import HOSTILE, IMAGES, run_cli, write_config
from tests.serve.conftest import (
    ADDED_LATER,
    HOSTILE_INDEXED,
    PHOTOS,
    SEARCH_KEY,
    SEARCH_KEY_ENV,
    build_with_key,
    in_process_server,
)
from tests.serve.test_server import data_uri, free_port, png_uri


def search(server: dict, **body: object) -> httpx.Response:
    return server["client"].post("/v1/search", json=body)


def hits(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["data"]


def columns(hit: dict) -> dict:
    return {name: value for name, value in hit.items() if name not in LINK_FIELDS}


def test_text_search_gives_k_ranked_hits_with_links(search_server: dict) -> None:
    response = search(search_server, text="a dog on a beach", k=5)
    answer = response.json()
    assert answer["model"] == "clip" and answer["smoke_test"] is True and answer["tiles"] is False
    found = hits(response)
    assert [h["rank"] for h in found] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in found]
    assert scores == sorted(scores, reverse=True)
    for hit in found:
        link = urlsplit(hit["thumbnail_url"])
        params = parse_qs(link.query)
        assert link.path == "/v1/thumbnails" and params["path"] == [hit["path"]] and params["root"] == [hit["root"]]
        assert params["size"] == ["256"] and "sig" in params and "exp" in params  # the server has a key: signed
        assert all(SEARCH_KEY not in str(value) for value in hit.values())  # links carry no key


def test_results_equal_the_local_api(search_server: dict) -> None:
    index = Index.open(search_server["config"])
    local = index.search_text("a red car", k=8).to_pylist()
    served = [columns(h) for h in hits(search(search_server, text="a red car", k=8))]
    assert [h["path"] for h in served] == [h["path"] for h in local]
    assert [h["score"] for h in served] == pytest.approx([h["score"] for h in local], abs=1e-6)
    assert served[0].keys() == local[0].keys()
    vector = np.random.default_rng(1).normal(size=32).astype(np.float32)
    by_vector = hits(search(search_server, vector=vector.tolist(), k=6))
    as_base64 = hits(search(search_server, vector=base64.b64encode(vector.astype("<f4").tobytes()).decode(), k=6))
    local = index.search_vector(vector, k=6).to_pylist()
    assert [h["path"] for h in by_vector] == [h["path"] for h in as_base64] == [h["path"] for h in local]


def test_an_indexed_image_finds_itself_first(search_server: dict) -> None:
    for photo in PHOTOS[:3]:
        found = hits(search(search_server, image=data_uri(photo), k=3))
        assert found[0]["path"] == photo.name and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # Other bytes of the same picture (a PNG of it) are decoded and embedded: still the original first.
    buffer = io.BytesIO()
    Image.open(PHOTOS[4]).save(buffer, "PNG")
    found = hits(search(search_server, image="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()))
    assert found[0]["path"] == PHOTOS[4].name and found[0]["score"] > 0.99


def test_more_like_this_by_an_indexed_path(search_server: dict) -> None:
    found = hits(search(search_server, path=PHOTOS[5].name, k=4))
    assert found[0]["path"] == PHOTOS[5].name and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    sub = sorted(IMAGES.iterdir())[201].name
    found = hits(search(search_server, path=f"sub/{sub}", root=search_server["root"], k=1))
    assert found[0]["path"] == f"sub/{sub}"
    missing = search(search_server, path=ADDED_LATER)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_where_filters_the_hits(search_server: dict) -> None:
    wide = hits(search(search_server, text="a cat", k=50, where="width > 400"))
    assert wide and all(h["width"] > 400 for h in wide)
    below = hits(search(search_server, text="a cat", k=50, where="path LIKE 'sub/%'"))
    assert len(below) == 2 and all(h["path"].startswith("sub/") for h in below)


BAD_SEARCHES = {
    "no query": ({"k": 3}, 400, "invalid_query"),
    "two queries": ({"text": "a", "path": "b.jpg"}, 400, "invalid_query"),
    "empty text": ({"text": "  "}, 400, "invalid_query"),
    "text too long": ({"text": "x" * 20000}, 400, "text_too_long"),
    "k zero": ({"text": "a", "k": 0}, 400, "invalid_k"),
    "k too large": ({"text": "a", "k": 1001}, 400, "invalid_k"),
    "k a string": ({"text": "a", "k": "5"}, 400, "invalid_k"),
    "where not a string": ({"text": "a", "where": 5}, 400, "invalid_where"),
    "where of no column": ({"text": "a", "where": "no_such_column > 1"}, 400, "invalid_where"),
    "where not SQL": ({"text": "a", "where": "width >"}, 400, "invalid_where"),
    "vector of the wrong size": ({"vector": [0.1] * 31}, 400, "invalid_vector"),
    "vector of text": ({"vector": ["a"] * 32}, 400, "invalid_vector"),
    "vector of zeros": ({"vector": [0] * 32}, 400, "invalid_vector"),
    "vector not base64": ({"vector": "@@"}, 400, "invalid_vector"),
    "image not a data URI": ({"image": "https://example.com/cat.jpg"}, 400, "invalid_data_uri"),
    "image invalid base64": ({"image": "data:image/png;base64,@@@"}, 400, "invalid_base64"),
    "image not an image": ({"image": "data:image/png;base64," + base64.b64encode(b"hello").decode()}, 422,
                           "invalid_image"),
    "image too many pixels": ({"image": data_uri(HOSTILE / "decompression_bomb_400mpx.png")}, 422, "too_many_pixels"),
    "path absolute": ({"path": "/etc/passwd"}, 400, "invalid_path"),
    "path up": ({"path": "../photos/x.jpg"}, 400, "invalid_path"),
    "path not indexed": ({"path": "notes.txt"}, 404, "not_found"),
    "root not a string": ({"path": "a.jpg", "root": 5}, 400, "invalid_path"),
}


@pytest.mark.parametrize("name", list(BAD_SEARCHES))
def test_bad_searches_get_their_4xx(search_server: dict, name: str) -> None:
    body, status, code = BAD_SEARCHES[name]
    response = search(search_server, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"{\"text\": ", b"\xff\xfe\x00"])
def test_malformed_search_bodies_get_400(search_server: dict, body: bytes) -> None:
    response = search_server["client"].post("/v1/search", content=body)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_search_needs_the_key(search_server: dict) -> None:
    url = search_server["url"]
    for response in (httpx.post(f"{url}/v1/search", json={"text": "a"}), httpx.get(f"{url}/v1/search"),
                     httpx.post(f"{url}/v1/search", json={"text": "a"}, headers={"Authorization": "Bearer wrong"})):
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    info = search_server["client"].get("/v1/search").json()
    assert info["available"] is True and info["index"]["rows"] == 33 and info["index"]["table"] == "images"
    assert httpx.get(f"{url}/").status_code == 200  # the page itself asks for the key


def test_thumbnails_come_from_signed_links_and_the_cache(search_server: dict) -> None:
    hit = hits(search(search_server, path=PHOTOS[6].name, k=1))[0]
    url = search_server["url"]
    thumbnail = httpx.get(url + hit["thumbnail_url"])  # no key: the link's signature admits it
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumbnail.content))
    assert max(image.size) == THUMBNAIL_SIZES[0] or max(image.size) == max(hit["width"], hit["height"])
    assert abs(image.width / image.height - hit["width"] / hit["height"]) < 0.02
    assert "private" in thumbnail.headers["cache-control"]
    cache = search_server["state"].search.thumbnails
    cached = len(cache)
    again = httpx.get(url + hit["thumbnail_url"], headers={"If-None-Match": thumbnail.headers["etag"]})
    assert again.status_code == 304
    assert httpx.get(url + hit["thumbnail_url"]).content == thumbnail.content and len(cache) == cached
    preview = httpx.get(url + hit["preview_url"])
    assert preview.status_code == 200 and len(cache) == cached + 1
    original = httpx.get(url + hit["image_url"])
    assert original.status_code == 200 and original.content == PHOTOS[6].read_bytes()
    assert original.headers["content-security-policy"] == "sandbox"


def test_links_open_their_own_image_only(search_server: dict) -> None:
    hit = hits(search(search_server, path=PHOTOS[7].name, k=1))[0]
    url = search_server["url"]
    link = urlsplit(hit["thumbnail_url"])
    params = {name: values[0] for name, values in parse_qs(link.query).items()}
    for changed in ({"path": PHOTOS[8].name}, {"exp": str(int(params["exp"]) + 3600)}, {"sig": "A" * 22},
                    {"exp": "1"}, {"sig": ""}):
        response = httpx.get(f"{url}/v1/thumbnails", params={**params, **changed})
        assert response.status_code == 401, changed


@pytest.mark.parametrize("query", [
    {"path": "../../../../etc/passwd"}, {"path": "/etc/passwd"}, {"path": "notes.txt"}, {"path": ADDED_LATER},
    {"path": "sub/../notes.txt"}, {"path": "passwd", "root": "/etc"}, {"path": PHOTOS[0].name, "root": "/tmp"},
    {"path": "x\0.jpg"},
])
def test_nothing_outside_the_index_is_served(search_server: dict, query: dict) -> None:
    for route in ("/v1/thumbnails", "/v1/images"):
        response = search_server["client"].get(route, params=query)
        assert response.status_code == 404, (route, query, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_every_indexed_hostile_file_gets_a_thumbnail(search_server: dict) -> None:
    for name in HOSTILE_INDEXED:
        hit = hits(search(search_server, path=name, k=1))[0]
        response = search_server["client"].get(hit["thumbnail_url"])
        assert response.status_code == 200, (name, response.text)
        image = Image.open(io.BytesIO(response.content))
        assert image.mode == "RGB" and max(image.size) <= THUMBNAIL_SIZES[0]
        assert (image.width >= image.height) == (hit["width"] >= hit["height"]), name  # upright, as indexed


def test_the_page_and_its_files(search_server: dict) -> None:
    url = search_server["url"]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "/static/search.js" in page.text
    assert httpx.get(f"{url}/static/search.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{url}/static/style.css").status_code == 200
    for missing in ("/static/app.py", "/static/../app.py", "/static/%2e%2e%2fapp.py"):
        assert httpx.get(url + missing).status_code == 404
    metrics = search_server["client"].get("/metrics").text
    assert 'embindex_requests_total{route="/v1/search",status="200"}' in metrics
    assert 'embindex_requests_total{route="/v1/thumbnails",status="404"}' in metrics


def test_a_server_without_an_index_embeds_and_finds_the_index_once_built(
        tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in PHOTOS[:3]:
        (photos / path.name).write_bytes(path.read_bytes())
    config = write_config(tmp_path, str(photos), str(tiny_models / "clip"),
                          serve={"decode_workers": 1, "api_key_env": SEARCH_KEY_ENV})
    raw = yaml.safe_load(config.read_text())
    raw["encoder"]["device"] = "cpu"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(searcher_module, "REOPEN_S", 0.0)  # look for the index at every request
    state = build_with_key(config)
    headers = {"Authorization": f"Bearer {SEARCH_KEY}"}
    with in_process_server(state, free_port()) as url, httpx.Client(base_url=url, headers=headers,
                                                                   timeout=60) as client:
        info = client.get("/v1/search")
        assert info.status_code == 503 and info.json()["available"] is False
        assert "run `embindex run` first" in info.json()["message"]
        refused = client.post("/v1/search", json={"text": "a dog"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "search_unavailable"
        assert client.get("/v1/thumbnails", params={"path": PHOTOS[0].name}).status_code == 503
        assert client.post("/v1/embeddings", json={"input": png_uri()}).status_code == 200
        assert run_cli("run", str(config), "--quiet").returncode == 0
        found = client.post("/v1/search", json={"path": PHOTOS[1].name, "k": 3})
        assert found.status_code == 200 and found.json()["data"][0]["path"] == PHOTOS[1].name


def test_an_index_of_another_model_is_not_searched(search_index: dict, tiny_models: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(search_index["config"].read_text())
    raw["encoder"]["model"] = str(tiny_models / "siglip")
    raw["input"]["root"] = search_index["root"]
    raw["output"] = {"lancedb": {"uri": str(search_index["folder"] / "index"), "table": "images"}}
    raw["run"]["report_dir"] = str(tmp_path / "runs")
    raw["serve"] = {"decode_workers": 1}
    config = tmp_path / "siglip.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True))
    state = build_state(load_config(config))
    with in_process_server(state, free_port()) as url:
        info = httpx.get(f"{url}/v1/search", timeout=60)
        assert info.status_code == 503 and "built with another model" in info.json()["message"]
        assert httpx.post(f"{url}/v1/search", json={"text": "a"}, timeout=60).status_code == 503
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a dog"}, timeout=60).status_code == 200
