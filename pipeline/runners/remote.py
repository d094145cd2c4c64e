"""Index through a remote embedding endpoint (encoder.kind: http): the files' bytes go out in bulk requests."""

# Files are read and hashed here and their original bytes sent as data URIs; the server decodes them exactly
# as `embindex run` does. Yields the events the committer takes: an `Embedded` per answered request and a
# `DecodeResult` with `.error` per file the server (or the local header check) refused. A 4xx for a bulk
# request is retried file by file, so exactly the bad file becomes an error row.

from __future__ import annotations

import base64
import collections
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.decode.image import ORIENTATION_TAG, content_hash, read_file
from pipeline.encode.models.http import HttpEncoder, Refused
from pipeline.encode.stream import EncodeTimer
from pipeline.errors import DecodeError
from pipeline.plan.reuse import VectorReuse
from pipeline.records import DecodeResult, Embedded, Item

log = logging.getLogger(__name__)

MIME = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
SHRINK_SIDE = 4096  # a file over the upload budget is re-encoded at most this many pixels on its long side
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _File:
    result: DecodeResult  # key, width, height, content_hash; error set when refused locally
    uri: str | None = None
    read_s: float = 0.0


def _header(data: bytes, max_image_pixels: int) -> tuple[str, int, int]:
    """(mime subtype, width, height after EXIF orientation) from the header; (jpeg, 0, 0) when PIL cannot tell
    (the server then gives the reason). Too many pixels is refused here: a bomb is never uploaded."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "jpeg", 0, 0
    if image.width * image.height > max_image_pixels:
        raise DecodeError(f"too many pixels: {image.width * image.height} > {max_image_pixels}")
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1) if image.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    except Exception:  # a broken EXIF block: the server decides
        orientation = 1
    width, height = (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size
    return MIME.get(image.format or "", "png"), width, height


def _shrink(data: bytes, max_bytes: int) -> bytes:
    """Re-encode an image too large to upload: upright, long side <= SHRINK_SIDE, JPEG, under max_bytes."""
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (SHRINK_SIDE, SHRINK_SIDE))
        image = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:
        raise DecodeError(f"cannot shrink for upload: {type(exc).__name__}: {exc}") from None
    side, quality = SHRINK_SIDE, 95
    while True:
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        if buffer.tell() <= max_bytes or side < 256:
            return buffer.getvalue()
        side, quality = side // 2, max(80, quality - 5)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """pool.map that reads at most `ahead` items ahead of the consumer (a million files are never all queued)."""
    pending: collections.deque[Future[R]] = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class RemoteStream:
    """Stands where the decode pool and the encode stage stand for local models."""

    def __init__(self, encoder: HttpEncoder, readers: int, reuse: VectorReuse, timer: EncodeTimer,
                 max_image_pixels: int) -> None:
        self.encoder, self.reuse, self.timer = encoder, reuse, timer
        self.readers, self.max_image_pixels = max(1, readers), max_image_pixels
        config = encoder.config
        self.per_request, self.concurrency = config.request_images, config.request_concurrency
        self.max_request_bytes = config.request_max_bytes
        self.max_file_bytes = config.request_max_bytes * 3 // 4 - 4096  # base64 grows bytes by 4/3

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def release(self, slot: int | None) -> None:
        """No shared memory here (the DecodePool interface)."""

    # -- reading (reader threads) ---------------------------------------------------------------
    def _read(self, item: Item) -> _File:
        started = time.perf_counter()
        key, path, known_hashes = item
        try:
            data = read_file(path)
            digest = content_hash(data)
            if known_hashes and digest in known_hashes:
                return _File(DecodeResult(key, None, None, content_hash=digest, reused=True))
            subtype, width, height = _header(data, self.max_image_pixels)
            if len(data) > self.max_file_bytes:
                log.info("%s: %d bytes, over the upload budget: sent downscaled", path, len(data))
                data, subtype = _shrink(data, self.max_file_bytes), "jpeg"
        except DecodeError as exc:
            return _File(DecodeResult(key, None, None, error=str(exc)))
        uri = f"data:image/{subtype};base64,{base64.b64encode(data).decode('ascii')}"
        result = DecodeResult(key, None, None, width, height, digest)
        return _File(result, uri, time.perf_counter() - started)

    # -- sending (request threads) -------------------------------------------------------------
    def _send(self, files: list[_File]) -> list[tuple[_File, np.ndarray | str]]:
        """(file, vector or refusal reason) per file; a refused bulk request is retried file by file."""
        answer = self.encoder.embed_uris([f.uri for f in files])  # type: ignore[misc]
        if not isinstance(answer, Refused):
            return list(zip(files, answer))
        if len(files) == 1:
            return [(files[0], answer.reason)]
        log.info("a bulk request of %d files was refused (%s); sending them one by one", len(files), answer.reason)
        return [pair for file in files for pair in self._send([file])]

    # -- the stream ----------------------------------------------------------------------------
    def imap(self, items: Iterable[Item]) -> Iterator[DecodeResult | Embedded]:
        waiting: dict[str, list[DecodeResult]] = {}  # content hash in flight -> identical files waiting for it
        in_flight: set[Future[list[tuple[_File, Any]]]] = set()
        bulk: list[_File] = []
        bulk_bytes = 0
        with ThreadPoolExecutor(self.readers, thread_name_prefix="remote-read") as readers, \
                ThreadPoolExecutor(self.concurrency, thread_name_prefix="remote-send") as senders:

            def submit() -> None:
                nonlocal bulk, bulk_bytes
                in_flight.add(senders.submit(self._send, bulk))
                bulk, bulk_bytes = [], 0

            waited = time.perf_counter()
            for file in _bounded_map(readers, self._read, items, self.readers * 4):
                self.timer.decode_wait_s += time.perf_counter() - waited
                self.timer.decode_s += file.read_s
                result = file.result
                known = self.reuse.lookup(result.content_hash) if result.error is None else None
                if result.error is not None:
                    yield result
                elif known is not None:
                    result.width, result.height = known.width, known.height
                    self.timer.reused += 1
                    yield Embedded([result], known.vector[None, :])
                elif result.content_hash in waiting:
                    waiting[result.content_hash].append(result)
                else:
                    if self.reuse.may_repeat(result.key["size_bytes"]):
                        waiting[result.content_hash] = []
                    if bulk and bulk_bytes + len(file.uri or "") > self.max_request_bytes:
                        submit()
                    bulk.append(file)
                    bulk_bytes += len(file.uri or "")
                    if len(bulk) >= self.per_request:
                        submit()
                yield from self._collect(in_flight, waiting, block=len(in_flight) >= 2 * self.concurrency)
                waited = time.perf_counter()
            if bulk:
                submit()
            while in_flight:
                yield from self._collect(in_flight, waiting, block=True)

    def _collect(self, in_flight: set[Future[Any]], waiting: dict[str, list[DecodeResult]],
                 block: bool) -> Iterator[DecodeResult | Embedded]:
        started = time.perf_counter()
        done, _ = wait(in_flight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        self.timer.encode_s += time.perf_counter() - started
        for future in done:
            in_flight.discard(future)
            answered = future.result()  # RemoteError: the run fails, as for a dead GPU
            embedded = [(file.result, vector) for file, vector in answered if not isinstance(vector, str)]
            if embedded:
                self.timer.images += len(embedded)
                self.timer.batch_sizes.append(len(embedded))
                yield Embedded([item for item, _ in embedded], np.stack([vector for _, vector in embedded]))
            for file, vector in answered:
                result = file.result
                if isinstance(vector, str):
                    result.error = vector
                    yield result
                elif self.reuse.may_repeat(result.key["size_bytes"]):
                    self.reuse.remember(result.content_hash, vector, result.width, result.height)
                for twin in waiting.pop(result.content_hash, []):
                    if isinstance(vector, str):
                        twin.error = vector
                        yield twin
                    else:
                        twin.width, twin.height = result.width, result.height
                        self.timer.reused += 1
                        yield Embedded([twin], vector[None, :])
