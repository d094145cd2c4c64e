"""Search a built index by text, image or vector: the `embindex query` command and the Python API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from pipeline.ann import has_vector_index
from pipeline.config import Config, ConfigError, load_config
from pipeline.decode import DecodeError, decode_file, prepare_image
from pipeline.encoders import describe_model, load_encoder
from pipeline.encoders.base import Encoder
from pipeline.identity import check_identity
from pipeline.sinks.lance import sql_string

RESULT_COLUMNS = ["path", "root", "size_bytes", "mtime_ns", "width", "height", "content_hash"]


class QueryError(Exception):
    """A query that cannot run: no index, empty table, unreadable query image."""


class Index:
    """A built index, opened read-only from its config. Every search sees the last committed state."""

    def __init__(self, config: Config) -> None:
        if config.output.lancedb is None:
            raise ConfigError("output.lancedb: searching needs the LanceDB sink")
        self.config = config
        self._encoder: Encoder | None = None
        self._described = describe_model(config.encoder)
        check_identity(config, self._described.identity(), rebuild=False)  # exit 2 on another model

    @classmethod
    def open(cls, config_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Index:
        return cls(load_config(config_path, overrides))

    # -- the table ------------------------------------------------------------------------
    def _table(self) -> Any:
        import lancedb

        uri, name = self.config.output.lancedb.uri, self.config.output.lancedb.table
        try:
            table = lancedb.connect(uri).open_table(name)
        except (ValueError, FileNotFoundError):
            raise QueryError(f"no index at {uri} (table {name!r}): run `embindex run` first") from None
        if table.count_rows() == 0:
            raise QueryError(f"the index at {uri} is empty: no image has been embedded yet")
        return table

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.config.encoder, self._described)
        return self._encoder

    # -- searches -------------------------------------------------------------------------
    def search_vector(self, vector: np.ndarray | list[float], k: int = 10, where: str | None = None) -> pa.Table:
        """Top-k rows by cosine similarity: rank, score (cosine), then the row's columns."""
        table = self._table()
        query = table.search(np.asarray(vector, dtype=np.float32), vector_column_name="embedding")
        query = query.distance_type("cosine").select([*RESULT_COLUMNS, "_distance"]).limit(k)
        if has_vector_index(table):  # below search.ann_min_rows there is none and search is exact
            search = self.config.search
            query = query.nprobes(search.nprobes).ef(search.ef)
            if search.refine_factor:
                query = query.refine_factor(search.refine_factor)
        if where:
            query = query.where(where, prefilter=True)
        try:
            hits = query.to_arrow()
        except Exception as exc:  # a bad --where: LanceDB raises its own error types
            raise QueryError(f"search failed: {str(exc).splitlines()[0]}") from None
        scores = pc.subtract(pa.scalar(1.0, pa.float32()), pc.cast(hits["_distance"], pa.float32()))
        ranks = pa.array(range(1, hits.num_rows + 1), pa.int32())
        return pa.table({"rank": ranks, "score": scores, **{c: hits[c] for c in RESULT_COLUMNS}})

    def search_text(self, text: str, k: int = 10, where: str | None = None) -> pa.Table:
        return self.search_vector(self.encoder.encode_texts([text])[0], k, where)

    def search_image(self, image: str | os.PathLike[str] | Image.Image, k: int = 10,
                     where: str | None = None) -> pa.Table:
        """By a file (an indexed, unchanged file reuses its stored vector) or a PIL image."""
        vector = self._stored_vector(Path(image)) if not isinstance(image, Image.Image) else None
        return self.search_vector(vector if vector is not None else self.image_vector(image), k, where)

    def image_vector(self, image: str | os.PathLike[str] | Image.Image) -> np.ndarray:
        """Embed one image exactly as `embindex run` would."""
        import torch

        spec = self.encoder.input_spec()
        if isinstance(image, Image.Image):
            pixels = prepare_image(ImageOps.exif_transpose(image), spec)
        else:
            try:
                pixels = decode_file(str(image), spec, self.config.decode.max_image_pixels).pixels
            except DecodeError as exc:
                raise QueryError(f"cannot read query image {image}: {exc}") from None
        return self.encoder.encode_images(torch.from_numpy(np.ascontiguousarray(pixels).copy())[None]).cpu().numpy()[0]

    def _stored_vector(self, path: Path) -> np.ndarray | None:
        """The indexed vector of this very file, if it is indexed and unchanged (no encode needed)."""
        try:
            stat = path.resolve().stat()
        except OSError:
            raise QueryError(f"cannot read query image {path}: no such file") from None
        for root in self.config.input.root:
            try:
                relative = path.resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                continue
            rows = (self._table().search().where(f"root = {sql_string(root)} AND path = {sql_string(relative)}")
                    .select(["size_bytes", "mtime_ns", "embedding"]).limit(1).to_arrow())
            if rows.num_rows and rows["size_bytes"][0].as_py() == stat.st_size \
                    and rows["mtime_ns"][0].as_py() == stat.st_mtime_ns:
                return np.asarray(rows["embedding"][0].as_py(), dtype=np.float32)
        return None
