"""The encode stage for images of many sizes and multi-vector models: batches of similar token counts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.encode.flops import ImageFlops
from pipeline.encode.pooling import pool_tokens
from pipeline.encode.stream import EncodeTimer, pool_release
from pipeline.plan.reuse import VectorReuse
from pipeline.records import DecodeResult, Embedded

log = logging.getLogger(__name__)

# Decoded images are collected over this many batches before being sorted by token count: a wider
# window packs batches with less padding, at the cost of host memory (768-token images are ~1.8 MB).
WINDOW_BATCHES = 4


@dataclass
class _Waiting:
    result: DecodeResult
    pixels: torch.Tensor  # uint8 (H, W, 3), or (tiles, H, W, 3), copied out of shared memory
    tokens: int


def plan_groups(tokens: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Indices grouped by similar token count: at most batch_size images, and at most max_batch_tokens
    once padded to the group's longest (what the language model attends). A lone image always fits."""
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        fits = group is not None and len(group) < batch_size and (
            max_batch_tokens is None or (len(group) + 1) * tokens[index] <= max_batch_tokens)
        if fits:
            group.append(index)  # type: ignore[union-attr]
        else:
            groups.append([index])
    return groups


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class GroupEncoder:
    """Encode groups; on GPU out-of-memory halve the group and retry, so only an image that fails
    alone becomes an error."""

    def __init__(self, encoder: object, timer: EncodeTimer, pool_factor: int | None) -> None:
        self.encoder, self.timer, self.pool_factor = encoder, timer, pool_factor
        self.image_flops = ImageFlops(encoder)  # per image from its size (pyramid tiles: per tile), cached by size

    def encode(self, waiting: list[_Waiting]) -> Iterator[tuple[list[_Waiting], list[np.ndarray] | None, str | None]]:
        started = time.perf_counter()
        try:
            outputs = self.encoder.encode_image_list([w.pixels for w in waiting])  # type: ignore[attr-defined]
            vectors = [self._finish(out) for out in outputs]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.timer.encode_s += time.perf_counter() - started
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(waiting) == 1:
                tokens = waiting[0].tokens
                yield waiting, None, f"out of GPU memory even alone ({tokens} tokens)"
                return
            self.timer.oom_halvings += 1
            half = len(waiting) // 2
            log.warning("out of GPU memory on a batch of %d images: retrying as %d + %d", len(waiting), half,
                        len(waiting) - half)
            yield from self.encode(waiting[:half])
            yield from self.encode(waiting[half:])
            return
        self.timer.encode_s += time.perf_counter() - started
        self.timer.images += len(waiting)
        self.timer.flops += sum(self.image_flops(*w.pixels.shape[-3:-1]) or 0.0 for w in waiting)
        self.timer.batch_sizes.append(len(waiting))
        yield waiting, vectors, None

    def _finish(self, output: torch.Tensor) -> np.ndarray:
        vectors = output.to("cpu", torch.float32).numpy()
        if self.pool_factor and getattr(self.encoder, "multivector", False):
            vectors = pool_tokens(vectors, self.pool_factor)
        self.timer.vectors += len(vectors)
        return vectors


def embed_groups(
    results: Iterable[DecodeResult],
    encoder: object,
    batch_size: int,
    max_batch_tokens: int | None,
    release: Callable[[int | None], None],
    timer: EncodeTimer,
    reuse: VectorReuse | None = None,
    pool_factor: int | None = None,
) -> Iterator[DecodeResult | Embedded]:
    """Like stream.embed_stream, for encoders with `encode_image_list` (dynamic resolution, multi-vector
    or pyramid tiles). Single-vector encoders yield (n, dim) arrays, multi-vector ones a list of (n_i, dim)."""
    multivector = bool(getattr(encoder, "multivector", False))
    coder = GroupEncoder(encoder, timer, pool_factor)
    window: list[_Waiting] = []
    twins: dict[str, list[DecodeResult]] = {}  # content hash being encoded -> copies waiting for its vectors

    def embedded(items: list[DecodeResult], vectors: list[np.ndarray]) -> Embedded:
        return Embedded(items, vectors if multivector else np.concatenate(vectors))

    def flush() -> Iterator[DecodeResult | Embedded]:
        groups = plan_groups([w.tokens for w in window], batch_size, max_batch_tokens)
        for group in groups:
            for done, vectors, error in coder.encode([window[i] for i in group]):
                if error is not None:
                    for waiting in done:
                        waiting.result.error = error
                        yield waiting.result
                        for twin in twins.pop(waiting.result.content_hash, []):
                            twin.error = error
                            yield twin
                    continue
                yield embedded([w.result for w in done], vectors)  # type: ignore[arg-type]
                for waiting, vector in zip(done, vectors):  # type: ignore[arg-type]
                    item = waiting.result
                    if reuse is not None and reuse.may_repeat(item.key["size_bytes"]):
                        reuse.remember(item.content_hash, vector, item.width, item.height)
                    for twin in twins.pop(item.content_hash, []):
                        twin.width, twin.height = item.width, item.height
                        timer.reused += 1
                        yield embedded([twin], [vector])
        window.clear()

    waited = time.perf_counter()
    for result in results:
        timer.decode_wait_s += time.perf_counter() - waited
        timer.decode_s += result.decode_s
        known = reuse.lookup(result.content_hash) if reuse is not None else None
        if result.error is not None:
            yield result
        elif known is not None:
            pool_release(release, result)
            result.width, result.height = known.width, known.height
            timer.reused += 1
            yield embedded([result], [known.vector if multivector else known.vector.reshape(1, -1)])
        elif result.content_hash in twins:
            pool_release(release, result)
            twins[result.content_hash].append(result)
        else:
            if reuse is not None and reuse.may_repeat(result.key["size_bytes"]):
                twins[result.content_hash] = []
            pixels = torch.from_numpy(result.pixels.copy())
            pool_release(release, result)
            window.append(_Waiting(result, pixels, encoder.tokens_for(*pixels.shape[-3:-1])))  # type: ignore
            if len(window) >= WINDOW_BATCHES * batch_size:
                yield from flush()
        waited = time.perf_counter()
    yield from flush()
