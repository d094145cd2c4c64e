"""The encode stage: decoded pixels -> batches in pinned memory -> vectors, one batch in flight on the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.decode.nvjpeg import GpuBatch
from pipeline.encode.flops import ImageFlops
from pipeline.encode.models.base import Encoder
from pipeline.plan.reuse import VectorReuse
from pipeline.records import DecodeResult, Embedded

POLL_S = 0.0002  # a forward pass of 256 images takes 30-120 ms on an H100: a 0.2 ms poll costs nothing


class HostCopy:
    """Vectors on their way to the host: the copy is queued behind the forward pass at once, and the
    wait polls instead of blocking in CUDA, whose wait spins a core the decode workers need."""

    def __init__(self, vectors: torch.Tensor) -> None:
        if vectors.device.type != "cuda":  # CPU, or MPS (which copies synchronously)
            self._host, self._done = vectors.to("cpu", torch.float32), None
            return
        self._host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        self._host.copy_(vectors, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> np.ndarray:
        while self._done is not None and not self._done.query():
            time.sleep(POLL_S)
        return self._host.numpy()


@dataclass
class EncodeTimer:
    encode_s: float = 0.0  # main-thread seconds in the encoder, waits for the GPU included
    decode_wait_s: float = 0.0  # main-thread seconds waiting for decoded images
    first_wait_s: float | None = None  # of which, for the first (decode workers starting up)
    decode_s: float = 0.0  # worker seconds spent decoding, summed over workers
    images: int = 0  # images given to the encoder
    vectors: int = 0  # vectors the encoder gave for them (multi-vector: tokens kept)
    oom_halvings: int = 0  # batches split in two after the GPU ran out of memory (grouped encode stage)
    reused: int = 0  # images whose vector came from identical bytes instead
    gpu_decoded: int = 0  # images decoded by the GPU JPEG path
    batch_sizes: list[int] = field(default_factory=list)
    flops: float = 0.0  # model FLOPs of the images encoded (encode/flops.py); 0 for an encoder it does not count


def embed_stream(
    results: Iterable[DecodeResult],
    encoder: Encoder,
    batch_size: int,
    release: Callable[[int | None], None],
    timer: EncodeTimer,
    reuse: VectorReuse | None = None,
) -> Iterator[DecodeResult | Embedded]:
    """Yield each failed DecodeResult as it comes and an Embedded per batch.

    Bytes already embedded (in the index, or earlier this run) are not encoded again: their
    vector is reused, and a copy that arrives while its twin is still in a batch waits for it.

    Two pinned buffers alternate: while the GPU works on one batch, the next fills the other.
    A buffer is refilled only after the batch that used it has been copied back, which also
    guarantees its non-blocking host-to-device copy has finished.
    """
    height, width, channels = encoder.input_spec().output_shape
    image_flops = ImageFlops(encoder)(height, width) or 0.0  # one size: counted once
    pin = encoder.device.type == "cuda"
    buffers = [torch.empty((batch_size, height, width, channels), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    # Filled through NumPy views: a plain memcpy, where torch's copy_ would wake its CPU thread pool
    # for every image and steal cores from the decode workers.
    staging = [buffer.numpy() for buffer in buffers]
    fill, count, items = 0, 0, []
    in_flight: tuple[HostCopy, list[DecodeResult]] | None = None
    waiting: dict[str, list[DecodeResult]] = {}  # content hash in a batch -> copies waiting for its vector

    def reused(result: DecodeResult, vector: np.ndarray, width: int, height: int) -> Embedded:
        result.width, result.height = width, height
        timer.reused += 1
        return Embedded([result], vector[None, :])

    def launch() -> tuple[HostCopy, list[DecodeResult]]:
        started = time.perf_counter()
        vectors = HostCopy(encoder.encode_images(buffers[fill][:count]))
        timer.encode_s += time.perf_counter() - started
        timer.batch_sizes.append(count)
        return vectors, items

    def finish(batch: tuple[HostCopy, list[DecodeResult]]) -> Iterator[Embedded]:
        started = time.perf_counter()
        vectors = batch[0].wait()
        timer.encode_s += time.perf_counter() - started
        timer.images += len(batch[1])
        timer.flops += len(batch[1]) * image_flops
        yield Embedded(batch[1], vectors)
        for item, vector in zip(batch[1], vectors):
            if reuse is not None and reuse.may_repeat(item.key["size_bytes"]):
                reuse.remember(item.content_hash, vector, item.width, item.height)
            for twin in waiting.pop(item.content_hash, []):
                yield reused(twin, vector, item.width, item.height)

    def launch_gpu(batch: GpuBatch, keep: list[int]) -> tuple[HostCopy, list[DecodeResult]]:
        if batch.ready is not None:
            torch.cuda.current_stream().wait_event(batch.ready)  # decoded on the feed's stream
            batch.pixels.record_stream(torch.cuda.current_stream())
        pixels = batch.pixels if len(keep) == len(batch.items) else batch.pixels[keep]
        started = time.perf_counter()
        vectors = HostCopy(encoder.encode_images(pixels))
        timer.encode_s += time.perf_counter() - started
        timer.batch_sizes.append(len(keep))
        return vectors, [batch.items[i] for i in keep]

    def needs_encoding(item: DecodeResult) -> Iterator[Embedded]:
        """Reuse or park an item whose bytes are known or in a batch already; else mark it new."""
        known = reuse.lookup(item.content_hash) if reuse is not None else None
        if known is not None:
            yield reused(item, known.vector, known.width, known.height)
        elif item.content_hash in waiting:
            waiting[item.content_hash].append(item)
        else:
            if reuse is not None and reuse.may_repeat(item.key["size_bytes"]):
                waiting[item.content_hash] = []
            item.needs_encoding = True

    waited = time.perf_counter()
    for result in results:
        waited_s = time.perf_counter() - waited
        timer.decode_wait_s += waited_s
        if timer.first_wait_s is None:
            timer.first_wait_s = waited_s
        timer.decode_s += result.decode_s
        if isinstance(result, GpuBatch):
            timer.gpu_decoded += len(result.items)
            for item in result.items:
                yield from needs_encoding(item)
            keep = [i for i, item in enumerate(result.items) if item.needs_encoding]
            if keep:
                launched = launch_gpu(result, keep)
                if in_flight is not None:
                    yield from finish(in_flight)
                in_flight = launched
            waited = time.perf_counter()
            continue
        known = reuse.lookup(result.content_hash) if reuse is not None else None
        if result.error is not None:
            yield result
        elif known is not None:
            pool_release(release, result)
            yield reused(result, known.vector, known.width, known.height)
        elif result.content_hash in waiting:
            pool_release(release, result)
            waiting[result.content_hash].append(result)
        else:
            if reuse is not None and reuse.may_repeat(result.key["size_bytes"]):
                waiting[result.content_hash] = []
            staging[fill][count] = result.pixels
            pool_release(release, result)
            items.append(result)
            count += 1
            if count == batch_size:
                launched = launch()
                if in_flight is not None:
                    yield from finish(in_flight)
                in_flight, fill, count, items = launched, fill ^ 1, 0, []
        waited = time.perf_counter()
    if count:
        launched = launch()
        if in_flight is not None:
            yield from finish(in_flight)
        in_flight = launched
    if in_flight is not None:
        yield from finish(in_flight)


def pool_release(release: Callable[[int | None], None], result: DecodeResult) -> None:
    """Hand a result's shared-memory slot back when its pixels are not needed."""
    release(result.slot)
    result.pixels, result.slot = None, None
