"""encoder.kind http: `embindex run` through a local `embindex serve` gives the local encoder's vectors, records
the files the server refuses as per-file errors, retries on 429, and needs the right key."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import lancedb
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.encode.models.http import base_url
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.runners.local import run_index
from pipeline.search.query import Index
from tests.conftest import HOSTILE, IMAGES, run_cli, write_config
from tests.serve.test_server import serve_config, serve_process

KEY_VARIABLE = "EMBINDEX_HTTP_TEST_KEY"
REFUSED = {"not_an_image.jpg": "not an image", "truncated_half.jpg": "truncated file"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[str]:
    """A server that takes one request of 16 images at a time: two overlapping requests get 429."""
    folder = tmp_path_factory.mktemp("http-server")
    config = serve_config(folder, tiny_models / "clip", decode_workers=2, max_queued_images=16,
                          api_key_env=KEY_VARIABLE)
    with serve_process(config, folder / "serve.log", {**os.environ, KEY_VARIABLE: "secret"}) as url:
        yield url


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the server refuses (the local header check lets them through)."""
    folder = tmp_path_factory.mktemp("bad")
    for name in REFUSED:
        shutil.copy(HOSTILE / name, folder / name)
    return folder


def _http_config(folder: Path, roots: list[str], url: str, **encoder: object) -> Path:
    return write_config(folder, roots, "clip", encoder={"kind": "http", "url": f"{url}/v1", "api_key_env": KEY_VARIABLE,
                                                         "request_images": 16, "request_concurrency": 1, **encoder})


def _tables(folder: Path) -> tuple:
    db = lancedb.connect(str(folder / "index"))
    return db.open_table("images").to_arrow().sort_by("path"), db.open_table("images_errors").to_arrow()


def test_run_through_serve_matches_the_local_encoder(tmp_path: Path, tiny_models: Path, server: str,
                                                      bad_files: Path) -> None:
    roots = [str(IMAGES), str(bad_files)]
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    env = {**os.environ, KEY_VARIABLE: "secret"}
    result = run_cli("run", str(_http_config(remote, roots, server)), env=env)
    assert result.returncode == 0, result.stderr
    assert "400 embedded, 2 errors" in result.stdout
    assert run_index(load_config(write_config(local, roots, str(tiny_models / "clip"))), progress=False).exit_code == 0

    (remote_rows, remote_errors), (local_rows, local_errors) = _tables(remote), _tables(local)
    assert remote_rows["path"].to_pylist() == local_rows["path"].to_pylist()
    assert remote_rows.num_rows == 400
    assert remote_rows["width"].to_pylist() == local_rows["width"].to_pylist()
    assert remote_rows["content_hash"].to_pylist() == local_rows["content_hash"].to_pylist()
    cosines = np.sum(np.stack(remote_rows["embedding"].to_numpy(zero_copy_only=False))
                     * np.stack(local_rows["embedding"].to_numpy(zero_copy_only=False)), axis=1)
    assert cosines.min() >= 0.999, cosines.min()
    errors = dict(zip(remote_errors["path"].to_pylist(), remote_errors["error"].to_pylist()))
    assert errors == REFUSED == dict(zip(local_errors["path"].to_pylist(), local_errors["error"].to_pylist()))

    os.environ[KEY_VARIABLE] = "secret"
    try:
        config = load_config(remote / "config.yaml")
        rerun = run_index(config, progress=False).report  # nothing changed: the server is not asked
        assert rerun["images_embedded"] == 0 and rerun["files_unchanged"] == 402 and not rerun["model_loaded"]
        assert rerun["fingerprint"]["kind"] == "http"
        hits = Index(config).search_text("a fish", k=3)  # text queries go to the server too
        assert hits.num_rows == 3
    finally:
        del os.environ[KEY_VARIABLE]


def test_429_is_retried_until_every_file_is_in(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sorted(IMAGES.iterdir())[:40]:
        shutil.copy(photo, photos / photo.name)
    monkeypatch.setenv(KEY_VARIABLE, "secret")
    config = load_config(_http_config(tmp_path, [str(photos)], server, request_images=10, request_concurrency=4,
                                      request_retries=20))
    before = _status_count(server, "429")
    report = run_index(config, progress=False).report
    assert report["images_embedded"] == 40 and not report["errors"]
    assert _status_count(server, "429") > before  # 4 requests of 10 images met a queue limit of 16


def _status_count(url: str, status: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'embindex_requests_total{{route="/v1/embeddings",status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_wrong_key_or_unknown_model_stops_the_run(tmp_path: Path, server: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "not-the-key")
    with pytest.raises(ModelLoadError, match="refused the API key"):
        run_index(load_config(_http_config(tmp_path, [str(IMAGES)], server)), progress=False)
    monkeypatch.setenv(KEY_VARIABLE, "secret")
    with pytest.raises(ConfigError, match="'no-such-model' is not served"):
        config = load_config(_http_config(tmp_path, [str(IMAGES)], server))
        config.encoder.model = "no-such-model"
        run_index(config, progress=False)


def test_unreachable_server_is_a_model_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "x")
    config = load_config(_http_config(tmp_path, [str(IMAGES)], "http://127.0.0.1:9", request_retries=1))
    with pytest.raises(ModelLoadError, match="could not reach the embedding server at http://127.0.0.1:9"):
        run_index(config, progress=False)  # the CLI's exit code 1


def test_http_config_errors_name_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, [str(IMAGES)], "clip", encoder={"kind": "http"})
    with pytest.raises(ConfigError, match="encoder.url: required"):
        load_config(config)
    with pytest.raises(ConfigError, match="encoder.url: expected an http"):
        load_config(config, ["encoder.url=ftp://host"])
    with pytest.raises(ConfigError, match="encoder.pyramid"):
        load_config(config, ["encoder.url=http://h:1", "encoder.pyramid=[[1,1],[2,2]]"])
    monkeypatch_free = load_config(config, ["encoder.url=http://h:1", "encoder.api_key_env=EMBINDEX_UNSET_VARIABLE"])
    from pipeline.encode.models.http import HttpEncoder

    with pytest.raises(ConfigError, match="EMBINDEX_UNSET_VARIABLE"):
        HttpEncoder(monkeypatch_free.encoder)


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/embeddings"])
def test_base_url_accepts_the_usual_forms(url: str) -> None:
    assert base_url(url) == "http://h:8000"
