"""The grouped encode stage: token-budget batches, halving on out-of-memory, and token pooling."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.encode.groups import embed_groups, plan_groups
from pipeline.encode.pooling import pool_tokens
from pipeline.encode.stream import EncodeTimer
from pipeline.records import DecodeResult, Embedded


class CountingEncoder:
    """An encoder of one vector per 28x28 patch (its mean colour), which runs out of memory past a
    token budget the way a GPU would: the grouping logic is tested without a model."""

    multivector, dim = True, 3

    def __init__(self, memory_tokens: int) -> None:
        self.memory_tokens, self.calls = memory_tokens, []

    def tokens_for(self, height: int, width: int) -> int:
        return (height // 28) * (width // 28)

    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens = [self.tokens_for(*image.shape[:2]) for image in images]
        self.calls.append(len(images))
        if len(images) * max(tokens) > self.memory_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = []
        for image in images:
            patches = image.float().unfold(0, 28, 28).unfold(1, 28, 28).mean(dim=(-1, -2)).reshape(-1, 3)
            out.append(torch.nn.functional.normalize(patches + 1, dim=-1))
        return out


def results(sizes: list[tuple[int, int]]) -> list[DecodeResult]:
    rng = np.random.default_rng(0)
    return [DecodeResult({"path": f"{i}.png", "size_bytes": i}, rng.integers(0, 255, (h, w, 3), np.uint8), i, w, h,
                         content_hash=f"h{i}") for i, (h, w) in enumerate(sizes)]


def test_groups_respect_count_and_padded_token_budget() -> None:
    tokens = [100, 700, 120, 690, 110, 300]
    groups = plan_groups(tokens, batch_size=2, max_batch_tokens=None)
    assert [sorted(tokens[i] for i in g) for g in groups] == [[100, 110], [120, 300], [690, 700]]
    groups = plan_groups(tokens, batch_size=8, max_batch_tokens=1000)
    assert all(len(g) * max(tokens[i] for i in g) <= 1000 or len(g) == 1 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert plan_groups([5000], 4, 1000) == [[0]]  # too big alone: still tried


def test_out_of_memory_halves_until_it_fits_and_fails_only_alone() -> None:
    sizes = [(28 * 4, 28 * 4)] * 6 + [(28 * 20, 28 * 20)]  # six 16-token images and one of 400 tokens
    encoder = CountingEncoder(memory_tokens=40)
    released: list[int] = []
    events = list(embed_groups(results(sizes), encoder, 8, None, released.append, EncodeTimer()))
    embedded = [item for event in events if isinstance(event, Embedded) for item in event.items]
    failed = [event for event in events if isinstance(event, DecodeResult)]
    assert len(embedded) == 6 and [f.key["path"] for f in failed] == ["6.png"]
    assert "out of GPU memory even alone (400 tokens)" in failed[0].error
    assert sorted(released) == list(range(7))  # every shared-memory slot is handed back
    vectors = [v for event in events if isinstance(event, Embedded) for v in event.vectors]
    assert all(v.shape == (16, 3) for v in vectors)


def test_vectors_do_not_depend_on_the_batch() -> None:
    sizes = [(56, 84), (112, 56), (28, 28), (84, 84)]
    alone = [list(embed_groups(results(sizes)[i:i + 1], CountingEncoder(10**6), 1, None, lambda s: None,
                               EncodeTimer()))[0] for i in range(4)]
    together = list(embed_groups(results(sizes), CountingEncoder(10**6), 4, None, lambda s: None, EncodeTimer()))
    by_path = {item.key["path"]: vector for event in together for item, vector in zip(event.items, event.vectors)}
    for event in alone:
        np.testing.assert_array_equal(event.vectors[0], by_path[event.items[0].key["path"]])


def test_pooling_keeps_unit_vectors_and_similar_tokens_together() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((10, 64))
    tokens = np.repeat(centres, 30, axis=0) + 0.05 * rng.standard_normal((300, 64))
    tokens = (tokens / np.linalg.norm(tokens, axis=1, keepdims=True)).astype(np.float32)
    pooled = pool_tokens(tokens, 30)
    assert pooled.shape == (10, 64) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    unit_centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert (pooled @ unit_centres.T).max(axis=1).min() > 0.99  # each pooled vector is one cluster's centre
    assert pool_tokens(tokens[:1], 3).shape == (1, 64)
