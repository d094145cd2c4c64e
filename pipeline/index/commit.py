"""Collect results into shards and commit each to every sink; the primary sink is written last."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.index.schema import DEEPSTACK, error_rows, image_rows, is_multivector, unpack_deepstack, vector_field
from pipeline.index.sinks.base import Sink
from pipeline.records import DecodeResult, Embedded

log = logging.getLogger(__name__)

IMAGE_META = ("path", "root", "size_bytes", "mtime_ns", "content_hash", "width", "height")
ERROR_META = ("path", "root", "size_bytes", "mtime_ns", "error", "attempts")


class ShardCommitter:
    """A shard is done when its rows are in every sink. Secondary sinks are written first and the
    primary (the one the next run plans against) last, so a kill in between only leaves rows the
    next run treats as pending and rewrites."""

    def __init__(self, sinks: list[Sink], schema: pa.Schema, model: str, shard_size: int,
                 row_extras: Callable[[DecodeResult], dict[str, Any]] | None = None) -> None:
        """`row_extras(item)` gives the values of the schema's extra columns (pyramid tiles, grid sizes)."""
        self.sinks, self.schema, self.model, self.shard_size = sinks, schema, model, shard_size
        self.multivector, self.row_extras = is_multivector(schema), row_extras
        self._extra_names = [f.name for f in schema if f.name not in (*IMAGE_META, "model", "embedding",
                                                                        "n_vectors", DEEPSTACK, "indexed_at")]
        # Qwen3-VL feature rows arrive packed with their DeepStack layers (index.schema.DEEPSTACK)
        self._deepstack = DEEPSTACK in schema.names
        self._images: dict[str, list[Any]] = {
            name: [] for name in (*IMAGE_META, *self._extra_names, *([DEEPSTACK] if self._deepstack else []))}
        self._vectors: list[np.ndarray] = []  # (n, dim) per event, or one (n_i, dim) per row (multi-vector)
        self._errors: dict[str, list[Any]] = {name: [] for name in ERROR_META}
        self._flipped: dict[str, list[dict[str, str]]] = {"images": [], "errors": []}
        self.write_s = 0.0
        self.shards = 0
        self.rows_written = 0
        self.errors_written = 0
        self.error_reasons: dict[str, int] = {}

    @property
    def _buffered(self) -> int:
        return len(self._images["path"]) + len(self._errors["path"])

    def add(self, event: DecodeResult | Embedded) -> None:
        """Buffer one event's rows; commit each time a shard's worth is buffered, mid-batch if need be, so
        every shard but the last holds exactly `shard_size` files (a batch of 64 with shard_size 50: 50 + 14)."""
        if isinstance(event, Embedded) and self._buffered + len(event.items) > self.shard_size:
            room = self.shard_size - self._buffered
            self.add(Embedded(event.items[:room], event.vectors[:room]))
            self.add(Embedded(event.items[room:], event.vectors[room:]))
            return
        if isinstance(event, Embedded):
            for item in event.items:
                key = item.key
                for name, value in (("path", key["path"]), ("root", key["root"]), ("size_bytes", key["size_bytes"]),
                                    ("mtime_ns", key["mtime_ns"]), ("content_hash", item.content_hash),
                                    ("width", item.width), ("height", item.height)):
                    self._images[name].append(value)
                if self._extra_names:
                    extras = item.extras if item.extras is not None else self.row_extras(item)  # type: ignore[misc]
                    for name in self._extra_names:
                        self._images[name].append(extras[name])
                if key["was_in"] == "errors":
                    self._flipped["errors"].append({"root": key["root"], "path": key["path"]})
            if self._deepstack:
                self._add_deepstack(event.vectors)  # type: ignore[arg-type]
            elif self.multivector:
                self._vectors.extend(event.vectors)
            else:
                self._vectors.append(event.vectors)
        else:
            key = event.key
            reason = event.error or "unknown error"
            for name, value in (("path", key["path"]), ("root", key["root"]), ("size_bytes", key["size_bytes"]),
                                ("mtime_ns", key["mtime_ns"]), ("error", reason), ("attempts", key["attempts"] + 1)):
                self._errors[name].append(value)
            self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1
            if key["was_in"] == "images":
                self._flipped["images"].append({"root": key["root"], "path": key["path"]})
        if self._buffered >= self.shard_size:
            self.commit()

    def _add_deepstack(self, packed_rows: list[np.ndarray]) -> None:
        """Split each packed row into its embedding and DeepStack layers, kept as float16 as stored (a row of a
        2B model's 1,024 image tokens is 16 MiB so, 32 MiB in float32)."""
        dim = vector_field(self.schema).list_size
        for packed in packed_rows:
            embedding, layers = unpack_deepstack(np.asarray(packed, np.float16), dim)
            self._vectors.append(embedding)
            self._images[DEEPSTACK].append(layers)

    def commit(self) -> None:
        if self._buffered == 0:
            return
        started = time.perf_counter()
        if self.multivector:
            vectors: np.ndarray | list[np.ndarray] = self._vectors
        else:
            dim = self.schema.field("embedding").type.list_size
            vectors = np.concatenate(self._vectors) if self._vectors else np.zeros((0, dim), np.float32)
        rows = image_rows(self._images, vectors, self.model, self.schema)
        errors = error_rows(self._errors)
        for sink in [*self.sinks[1:], self.sinks[0]]:
            for which, keys in self._flipped.items():  # a file moved between images and images_errors
                if keys:
                    sink.delete(pa.Table.from_pylist(keys), which)
            sink.write(rows, errors)
        self.shards += 1
        self.rows_written += rows.num_rows
        self.errors_written += errors.num_rows
        log.debug("committed shard %d: %d rows, %d errors", self.shards, rows.num_rows, errors.num_rows)
        for column in (*self._images.values(), *self._errors.values(), self._vectors, *self._flipped.values()):
            column.clear()
        self.write_s += time.perf_counter() - started
