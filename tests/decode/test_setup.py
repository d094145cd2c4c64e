"""The decode pool started before the weights load: its prediction of the input policy is the loaded model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.decode.setup import decode_setup, early_pool, gpu_workers
from pipeline.encode.layout import is_grouped, wrap_encoder
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from tests.conftest import IMAGES, write_config


@pytest.mark.parametrize("model", ["clip", "siglip", "dinov2"])
def test_the_early_pool_has_the_loaded_models_setup(tiny_models: Path, tmp_path: Path, model: str) -> None:
    config = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / model)))
    described = describe_model(config.encoder)
    setup, pool = early_pool(config, described, 400)
    with pool:
        encoder = wrap_encoder(load_encoder(config.encoder, described), config.encoder)
        assert setup == decode_setup(config, encoder.input_spec(), encoder.device, is_grouped(encoder), 400)


def test_no_early_pool_where_the_model_decides_the_input(tiny_models: Path, tmp_path: Path) -> None:
    tiles = {"pyramid": [[1, 1], [2, 2]]}
    pyramid = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / "clip"), encoder=tiles))
    assert early_pool(pyramid, describe_model(pyramid.encoder), 400) is None
    vlm = load_config(write_config(tmp_path, str(IMAGES), str(tiny_models / "colqwen2_5")))
    assert early_pool(vlm, describe_model(vlm.encoder), 400) is None


def test_gpu_decode_leaves_cores_to_the_main_process() -> None:
    assert [gpu_workers(n) for n in (1, 2, 4, 16, 64)] == [1, 1, 3, 13, 52]
