"""Pyramid tiles for any single-vector encoder: one vector for the whole image and one per grid cell."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from pipeline.config import parse_pyramid
from pipeline.decode.spec import InputSpec
from pipeline.decode.tiles import tile_count


class PyramidEncoder:
    """Wraps a fixed-size single-vector encoder; each file's tiles arrive stacked (tiles, H, W, 3) from
    the decode workers and leave as a (tiles, dim) multi-vector row, in pyramid_tiles' order."""

    multivector = True

    def __init__(self, base: Any, grids: list[list[int]], chunk: int) -> None:
        self.base, self.grids = base, parse_pyramid(grids)
        self.n_tiles, self.chunk = tile_count(self.grids), max(1, chunk)
        self.name, self.kind, self.dim = base.name, base.kind, base.dim
        self.device, self.dtype, self.smoke_test = base.device, base.dtype, getattr(base, "smoke_test", False)
        self._spec = dataclasses.replace(base.input_spec(), tiles=tuple(self.grids))

    def input_spec(self) -> InputSpec:
        return self._spec

    def tokens_for(self, height: int, width: int) -> int:
        return self.n_tiles

    def encode_image_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tiles of several files go through the base encoder in chunks of `chunk` tiles."""
        tiles = torch.cat(images) if images else torch.empty(0)
        vectors = torch.cat([self.base.encode_images(tiles[start:start + self.chunk])
                             for start in range(0, len(tiles), self.chunk)])
        return list(vectors.split(self.n_tiles))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.base.encode_texts(texts)

    def fingerprint(self) -> dict[str, Any]:
        return self.base.fingerprint()
