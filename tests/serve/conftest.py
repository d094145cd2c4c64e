"""A searchable server for the search tests: a small index of sample and hostile photos, served in this process."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from pipeline.config import load_config
from pipeline.serve.app import create_app
from pipeline.serve.server import build_state
from pipeline.serve.state import ServerState
from tests.conftest import HOSTILE, IMAGES, run_cli, write_config
from tests.serve.probes import wait_for
from tests.serve.test_server import free_port

SEARCH_KEY = "search-test-key"
SEARCH_KEY_ENV = "EMBINDEX_SEARCH_TEST_KEY"
PHOTOS = sorted(IMAGES.iterdir())[::16][:24]  # 24 of the 400 sample photos, across their classes
# Indexed files a thumbnail must survive: CMYK, 16-bit, TIFF, animation, palette transparency, EXIF rotation, and a
# name that needs escaping in a URL and in HTML.
HOSTILE_INDEXED = ["cmyk.jpg", "gray16.png", "lzw.tiff", "animated.gif", "palette_transparent.png",
                   "exif_orientation_6.jpg", "name with spaces & ünïcödé.jpg"]
ADDED_LATER = "added-after-the-run.jpg"  # on disk under the root, never indexed


@contextmanager
def in_process_server(state: ServerState, port: int) -> Iterator[str]:
    """create_app(state) under uvicorn on 127.0.0.1:port in a thread of this process; yields its URL once it listens."""
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-search", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn started")
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def build_with_key(config: Path) -> ServerState:
    """build_state with the API key's variable set for the moment it is read."""
    os.environ[SEARCH_KEY_ENV] = SEARCH_KEY
    try:
        return build_state(load_config(config))
    finally:
        del os.environ[SEARCH_KEY_ENV]


@pytest.fixture(scope="session")
def search_index(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> dict:
    """A folder of 33 images (24 photos, 2 in sub/, the hostile ones above) indexed with the tiny CLIP; its config
    names the port the search server listens on, so `embindex query CONFIG` finds it."""
    folder = tmp_path_factory.mktemp("search")
    photos = folder / "photos"
    (photos / "sub").mkdir(parents=True)
    for path in PHOTOS:
        shutil.copy(path, photos / path.name)
    for path in sorted(IMAGES.iterdir())[1:400:200]:
        shutil.copy(path, photos / "sub" / path.name)
    for name in HOSTILE_INDEXED:
        shutil.copy(HOSTILE / name, photos / name)
    (photos / "notes.txt").write_text("not an image: never indexed\n")
    config = write_config(folder, str(photos), str(tiny_models / "clip"),
                          serve={"port": free_port(), "api_key_env": SEARCH_KEY_ENV, "decode_workers": 1,
                                 "batch_window_ms": 0})
    raw = yaml.safe_load(config.read_text())
    raw["encoder"]["device"] = "cpu"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True))
    done = run_cli("run", str(config), "--quiet")
    assert done.returncode == 0, done.stderr
    shutil.copy(PHOTOS[0], photos / ADDED_LATER)
    return {"config": config, "root": str(photos), "folder": folder}


@pytest.fixture(scope="session")
def search_server(search_index: dict) -> Iterator[dict]:
    """`embindex serve` of the index above (API key required), in this process: url, an authorised client, state."""
    state = build_with_key(search_index["config"])
    with in_process_server(state, state.search.config.serve.port) as url:
        headers = {"Authorization": f"Bearer {SEARCH_KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            yield {**search_index, "url": url, "client": client, "state": state}
