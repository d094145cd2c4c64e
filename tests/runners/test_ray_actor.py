"""The Ray embed actor in this process: decoded blocks in, the grouped stage's halving and pooling, rows out."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import EncoderConfig
from pipeline.encode.models.source import describe_model
from pipeline.encode.pooling import pool_tokens
from pipeline.index.schema import is_multivector
from tests.conftest import IMAGES
from tests.runners.test_ray import TEST_ENV

ray = pytest.importorskip("ray")

QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 12544}


@pytest.fixture(scope="module")
def in_process_ray() -> object:
    """Ray's key-value store, which the actor and the decode tasks use, without a cluster's worker processes."""
    if ray.is_initialized():  # the Ray tests' module cluster
        yield ray
        return
    saved = {key: os.environ.get(key) for key in TEST_ENV}
    os.environ.update(TEST_ENV)
    ray.init(num_cpus=1, object_store_memory=100 * 1024 * 1024, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _decoded_batch(settings: EncoderConfig, files: list[Path], run_key: str) -> dict[str, np.ndarray]:
    """A block of the plan through the decode task's own function, as Ray hands it to the actor."""
    from pipeline.encode.layout import decode_spec
    from pipeline.runners.ray_stages import decode_block

    block = pa.table({"root": [str(IMAGES)] * len(files), "path": [f.name for f in files],
                      "size_bytes": [f.stat().st_size for f in files], "mtime_ns": [0] * len(files),
                      "attempts": [0] * len(files), "was_in": pa.array([None] * len(files), pa.string()),
                      "known_hashes": pa.array([None] * len(files), pa.list_(pa.string()))})
    spec = decode_spec(describe_model(settings), settings)
    return decode_block(block, spec, 100_000_000, True, 30.0, run_key)


def _actor(tiny_models: Path, run_key: str, **encoder: object) -> object:
    from pipeline.runners.ray_actor import EmbedActor

    settings = {"model": str(tiny_models / "colqwen2_5"), "device": "cpu", "batch_size": 4, **QWEN_PIXELS, **encoder}
    return EmbedActor(EncoderConfig(**settings).model_dump(), run_key, 8)


def test_the_actor_halves_a_group_out_of_memory_and_fails_only_an_image_alone(in_process_ray: object,
                                                                              tiny_models: Path) -> None:
    actor = _actor(tiny_models, "halving")
    files = sorted(IMAGES.iterdir())[:6]
    batch = _decoded_batch(actor.settings, files, "halving")
    tokens = [actor.encoder.tokens_for(*pixels.shape[:2]) for pixels in batch["pixels"]]
    largest = int(np.argmax(tokens))
    forward, too_big = actor.encoder.encode_image_list, torch.from_numpy(batch["pixels"][largest].copy())

    def small_memory(images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Room for two images at a time, and never for the largest one."""
        if len(images) > 2 or any(torch.equal(image, too_big) for image in images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(images)

    actor.encoder.encode_image_list = small_memory
    out = actor(batch)

    assert out["error"][largest] == f"out of GPU memory even alone ({tokens[largest]} tokens)"
    assert not out["encoded"][largest] and out["encoded"].sum() == 5
    # Each row carries its share of the call's halvings (4 -> 2 + 2 for one group of four, ...): they add up.
    assert round(out["oom_halvings"].sum()) >= 2 and len(set(out["oom_halvings"])) == 1
    for row in range(6):
        if row != largest:  # the prompt's tokens too: more vectors than image tokens
            assert out["embedding"][row].dtype == np.float16 and len(out["embedding"][row]) >= tokens[row]
    assert out["embedding"][largest].shape == (0, 128)


def test_the_actor_pools_tokens_as_the_local_stage_does(in_process_ray: object, tiny_models: Path) -> None:
    files = sorted(IMAGES.iterdir())[:3]
    plain, pooled = _actor(tiny_models, "plain"), _actor(tiny_models, "pooled", pool_factor=2)
    batch = _decoded_batch(plain.settings, files, "plain")
    unpooled, out = plain(batch), pooled(batch)
    for row in range(3):
        expected = pool_tokens(unpooled["embedding"][row].astype(np.float32), 2)
        assert out["embedding"][row].shape == expected.shape
        cosine = (out["embedding"][row].astype(np.float32) * expected).sum(-1) / np.linalg.norm(expected, axis=-1)
        assert cosine.min() >= 0.999
    # The layout the driver reads from Ray's key-value store: the multi-vector row schema, the actor's fingerprint.
    from ray.experimental.internal_kv import _internal_kv_get

    from pipeline.runners.ray_actor import layout_key
    from pipeline.runners.ray_stages import KV_NAMESPACE

    layout = pickle.loads(_internal_kv_get(layout_key("pooled"), namespace=KV_NAMESPACE))
    assert layout.multivector and is_multivector(layout.schema) and layout.fingerprint == pooled.encoder.fingerprint()
