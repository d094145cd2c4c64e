"""The encode stage: decoded pixels -> batches in pinned memory -> vectors, one batch in flight on the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.encoders.base import Encoder
from pipeline.workers import DecodeResult


@dataclass
class Embedded:
    items: list[DecodeResult]  # metadata only: their pixels were copied out and released
    vectors: np.ndarray  # (len(items), dim) float32


@dataclass
class EncodeTimer:
    encode_s: float = 0.0  # main-thread seconds in the encoder, waits for the GPU included
    decode_wait_s: float = 0.0  # main-thread seconds waiting for decoded images
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def embed_stream(
    results: Iterable[DecodeResult],
    encoder: Encoder,
    batch_size: int,
    release: Callable[[int | None], None],
    timer: EncodeTimer,
) -> Iterator[DecodeResult | Embedded]:
    """Yield each failed DecodeResult as it comes and an Embedded per batch.

    Two pinned buffers alternate: while the GPU works on one batch, the next fills the other.
    A buffer is refilled only after the batch that used it has been copied back, which also
    guarantees its non-blocking host-to-device copy has finished.
    """
    height, width, channels = encoder.input_spec().output_shape
    pin = encoder.device.type == "cuda"
    buffers = [torch.empty((batch_size, height, width, channels), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    # Filled through NumPy views: a plain memcpy, where torch's copy_ would wake its CPU thread pool
    # for every image and steal cores from the decode workers.
    staging = [buffer.numpy() for buffer in buffers]
    fill, count, items = 0, 0, []
    in_flight: tuple[torch.Tensor, list[DecodeResult]] | None = None

    def launch() -> tuple[torch.Tensor, list[DecodeResult]]:
        started = time.perf_counter()
        vectors = encoder.encode_images(buffers[fill][:count])
        timer.encode_s += time.perf_counter() - started
        timer.batch_sizes.append(count)
        return vectors, items

    def finish(batch: tuple[torch.Tensor, list[DecodeResult]]) -> Embedded:
        started = time.perf_counter()
        vectors = batch[0].to("cpu", torch.float32).numpy()
        timer.encode_s += time.perf_counter() - started
        timer.images += len(batch[1])
        return Embedded(batch[1], vectors)

    waited = time.perf_counter()
    for result in results:
        timer.decode_wait_s += time.perf_counter() - waited
        if result.error is not None:
            yield result
        else:
            staging[fill][count] = result.pixels
            release(result.slot)
            result.pixels, result.slot = None, None
            items.append(result)
            count += 1
            if count == batch_size:
                launched = launch()
                if in_flight is not None:
                    yield finish(in_flight)
                in_flight, fill, count, items = launched, fill ^ 1, 0, []
        waited = time.perf_counter()
    if count:
        launched = launch()
        if in_flight is not None:
            yield finish(in_flight)
        in_flight = launched
    if in_flight is not None:
        yield finish(in_flight)
