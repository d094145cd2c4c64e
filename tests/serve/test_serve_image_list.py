"""`embindex serve` with a variable-resolution single-vector model (tiny Qwen3-VL-Embedding): text queries take
the query recipe, images of different sizes keep them, and the vectors equal the encoder's own."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import torch

from pipeline.config import EncoderConfig
from pipeline.decode.image import decode_file
from pipeline.encode.models.load import load_encoder
from tests.conftest import IMAGES
from tests.serve.test_server import API_KEY, HEADERS, data_uri, serve_config, serve_process, vectors


def test_a_variable_resolution_model_serves_texts_and_images_at_their_own_sizes(tmp_path: Path,
                                                                                tiny_models: Path) -> None:
    model = tiny_models / "qwen3_vl_embedding"
    photos = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:3]
    config = serve_config(tmp_path, model, decode_workers=1, batch_window_ms=20, api_key_env="EMBINDEX_TEST_KEY")
    encoder = load_encoder(EncoderConfig(model=str(model), device="cpu"))
    decoded = [decode_file(str(p), encoder.input_spec(), 10**8) for p in photos]
    assert len({d.pixels.shape for d in decoded}) > 1, "the photos keep different sizes"
    want_images = torch.cat(encoder.encode_image_list([torch.from_numpy(d.pixels.copy()) for d in decoded])).numpy()
    texts = ["a red car", "two dogs on a beach"]
    want_texts = encoder.encode_texts(texts)
    env = {**os.environ, "EMBINDEX_TEST_KEY": API_KEY}
    with serve_process(config, tmp_path / "serve.log", env) as url, \
            httpx.Client(base_url=url, headers=HEADERS, timeout=120) as client:
        got_images = vectors(client.post("/v1/embeddings", json={"input": [data_uri(p) for p in photos],
                                                                  "model": str(model)}))
        got_texts = vectors(client.post("/v1/embeddings", json={"input": texts, "model": str(model)}))
        tiles = client.post("/v1/embeddings", json={"input": [data_uri(photos[0])], "model": str(model),
                                                    "pyramid": [[1, 1], [2, 2]]})
    assert np.min(np.sum(got_images * want_images, axis=1)) >= 0.9999
    assert np.min(np.sum(got_texts * want_texts, axis=1)) >= 0.9999
    assert tiles.status_code == 400 and tiles.json()["error"]["code"] == "invalid_pyramid"
