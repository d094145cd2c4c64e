"""The records that travel between stages: a file to decode, a decoded file, an embedded batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A file to decode: (caller's key, path, hashes that need no decode), optionally a 4th element: True =
# decode on the CPU even where the GPU could take the file (it failed there)
Item = tuple[Any, ...]


@dataclass
class DecodeResult:
    """One file after the decode stage: pixels in shared memory, JPEG bytes for the GPU, a reuse, or an error."""

    key: Any  # the caller's handle for the file
    pixels: np.ndarray | None  # a view into shared memory; valid until release(slot)
    slot: int | None  # the shared-memory region holding its pixels (its task's other results share it)
    width: int = 0
    height: int = 0
    content_hash: str | None = None
    error: str | None = None
    decode_s: float = 0.0
    reused: bool = False  # the bytes hash to a known vector: read and hashed, not decoded
    needs_encoding: bool = False  # set by the encode stage for GPU-decoded items it will encode
    # A JPEG the GPU decoder takes: read, hashed and probed, not decoded; a view into the decode pool's shared
    # memory (`slot` held until the GPU has read it), or bytes.
    jpeg: bytes | bytearray | np.ndarray | None = None
    orientation: int = 1  # its EXIF orientation (width and height are already upright)
    path: str | None = None  # set on `jpeg` results, so a file the GPU rejects can go back to a worker
    # The row's extra columns (pyramid tiles, image_grid_thw) where computed elsewhere: by a Ray embed actor, or
    # copied from the indexed row of identical bytes; None: the committer asks the encoder (layout.row_extras).
    extras: dict[str, Any] | None = None


@dataclass
class Embedded:
    """A batch after the encode stage: the files' metadata and their vectors, ready to commit."""

    items: list[DecodeResult]  # metadata only: their pixels were copied out and released
    vectors: np.ndarray | list[np.ndarray]  # (len(items), dim) float32, or one (n_i, dim) per item (multi-vector)
