"""Request images (base64 data URIs) -> the encoder's uint8 pixels, whole or as pyramid tiles, in worker processes."""

# The decode is the batch pipeline's own (pipeline.decode.image), so a served vector equals the indexed one. It runs
# in processes, not threads: on 16 cores threads reached 712 images/s against 1,392 for processes (the GIL).

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from pipeline.config import DecodeConfig
from pipeline.decode import capture, reasons
from pipeline.decode.image import decode_file
from pipeline.decode.limits import prepare_decode_process
from pipeline.decode.spec import InputSpec
from pipeline.decode.tiles import Tile, pyramid_tiles
from pipeline.errors import DecodeError

log = logging.getLogger(__name__)

TASK_IMAGES = 4  # images per task sent to a decode process
DEFAULT_MAX_WORKER_MB = DecodeConfig().max_worker_mb  # decode.max_worker_mb's default (limits.py)


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 (n, H, W, 3): one image, or its pyramid tiles
    width: int  # the original's, after EXIF orientation
    height: int
    tiles: list[Tile] | None
    said: str = ""  # what libtiff or PIL wrote while decoding it (the server's debug log)


@dataclass
class Failed:
    status: int
    code: str
    reason: str  # as `embindex run` records it in images_errors
    said: str = ""


_SPEC: InputSpec | None = None  # set once per worker process
_JPEG_DRAFT = True


def _init_worker(spec: InputSpec, jpeg_draft: bool, max_worker_mb: int | None = None) -> None:
    """Each decode process as the batch pool's: stderr captured, memory bounded (limits.py)."""
    global _SPEC, _JPEG_DRAFT
    _SPEC, _JPEG_DRAFT = spec, jpeg_draft
    prepare_decode_process(max_worker_mb)
    capture.take()  # start-up chatter is no request's


def _ping() -> None:
    """A no-op task: makes the pool start its processes before the first request."""


def decode_input(uri: str, max_image_pixels: int, grids: list[tuple[int, int]] | None) -> Decoded | Failed:
    """One data URI -> pixels, or why not (runs in a worker process; never raises for bad input)."""
    spec = _SPEC
    assert spec is not None, "decode_input runs in a pool started by DecodeWorkers"
    try:
        data = base64.b64decode(uri.partition(",")[2], validate=True)
    except (binascii.Error, ValueError) as exc:
        return Failed(400, "invalid_base64", f"invalid base64: {exc}")
    try:
        if grids:  # the batch pipeline's own pyramid path (encoder.pyramid): the same tiles, the same pixels
            tiled = dataclasses.replace(spec, tiles=tuple(grids))
            decoded = decode_file("<request>", tiled, max_image_pixels, _JPEG_DRAFT, data=data)
            tiles = pyramid_tiles(decoded.width, decoded.height, grids)
            return Decoded(decoded.pixels, decoded.width, decoded.height, tiles)
        decoded = decode_file("<request>", spec, max_image_pixels, _JPEG_DRAFT, data=data)
        return Decoded(decoded.pixels[None], decoded.width, decoded.height, None)
    except DecodeError as exc:
        reason = str(exc)
        code = "too_many_pixels" if reason.startswith("too many pixels") else "invalid_image"
        return Failed(422, code, reason)


def decode_inputs(uris: list[str], max_image_pixels: int,
                  grids: list[tuple[int, int]] | None) -> list[Decoded | Failed]:
    """A task of several data URIs (fewer round trips to the server process)."""
    results = []
    for uri in uris:
        result = decode_input(uri, max_image_pixels, grids)
        result.said = capture.take()
        results.append(result)
    return results


class DecodeWorkers:
    """A process pool for request images; a pool broken by a crashing decoder is replaced."""

    def __init__(self, spec: InputSpec, workers: int, jpeg_draft: bool, timeout_s: float,
                 max_worker_mb: int | None = DEFAULT_MAX_WORKER_MB) -> None:
        self.spec, self.workers, self.jpeg_draft, self.timeout_s = spec, workers, jpeg_draft, timeout_s
        self.max_worker_mb = max_worker_mb
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn: the server process holds CUDA and threads; never fork it
        pool = ProcessPoolExecutor(self.workers, mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(self.spec, self.jpeg_draft, self.max_worker_mb))
        for future in [pool.submit(_ping) for _ in range(self.workers)]:
            future.result()
        return pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                log.warning("a decode process died; starting a new pool")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()

    async def _run(self, uris: list[str], max_image_pixels: int,
                   grids: list[tuple[int, int]] | None) -> list[Decoded | Failed]:
        pool = self._pool
        try:
            future = pool.submit(decode_inputs, uris, max_image_pixels, grids)
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s * len(uris))
        except BrokenProcessPool:
            await asyncio.to_thread(self._replace, pool)
            raise
        except asyncio.TimeoutError:
            return [Failed(422, "timeout", reasons.timed_out(self.timeout_s))] * len(uris)

    async def decode(self, uris: list[str], max_image_pixels: int,
                     grids: list[tuple[int, int]] | None) -> list[Decoded | Failed]:
        """Every image of a request, in tasks of up to TASK_IMAGES: fewer round trips through the pool's
        threads, which share the server's one GIL (with the 0.5 ms switch interval this took an H100 load test
        from 589 to 1,348 images/s, docs/benchmarks.md). A crash breaks every task in flight: each of its
        images is then tried alone on the new pool, so only an image that crashes it twice is refused."""
        chunks = [uris[start:start + TASK_IMAGES] for start in range(0, len(uris), TASK_IMAGES)]

        async def chunk_results(chunk: list[str]) -> list[Decoded | Failed]:
            try:
                return await self._run(chunk, max_image_pixels, grids)
            except BrokenProcessPool:
                pass
            results: list[Decoded | Failed] = []
            for uri in chunk:
                try:
                    results += await self._run([uri], max_image_pixels, grids)
                except BrokenProcessPool:
                    results.append(Failed(422, "decoder_crashed", reasons.crashed()))
            return results

        results = [result for chunk in await asyncio.gather(*map(chunk_results, chunks)) for result in chunk]
        for result in results:
            if result.said:
                log.debug("a request image: the decoder said: %s", result.said)
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
