"""Pyramid tiles (as in NVIDIA NIM's image-embedding API): the whole image plus every cell of each grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.decode import InputSpec, prepare_image


@dataclass(frozen=True)
class Tile:
    level: int  # index into the pyramid's grids; [1, 1] is the whole image
    row: int
    col: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the upright original's pixels


def parse_pyramid(levels: object) -> list[tuple[int, int]]:
    """[[1, 1], [3, 3], [5, 5]] -> [(1, 1), (3, 3), (5, 5)]; ValueError says what is wrong."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError("pyramid must be a non-empty list of [rows, cols] grids, e.g. [[1, 1], [3, 3]]")
    grids = []
    for grid in levels:
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 for n in grid)):
            raise ValueError(f"pyramid grid {grid!r}: expected [rows, cols], each an integer from 1 to 16")
        grids.append((int(grid[0]), int(grid[1])))
    return grids


def pyramid_tiles(width: int, height: int, grids: list[tuple[int, int]]) -> list[Tile]:
    """Every cell of every grid, level by level, row-major; cell edges are rounded to whole pixels so
    neighbouring tiles share their edges and together cover the image exactly."""
    tiles = []
    for level, (rows, cols) in enumerate(grids):
        xs = np.linspace(0, width, cols + 1).round().astype(int)
        ys = np.linspace(0, height, rows + 1).round().astype(int)
        for row in range(rows):
            for col in range(cols):
                box = (int(xs[col]), int(ys[row]), max(int(xs[col + 1]), int(xs[col]) + 1),
                       max(int(ys[row + 1]), int(ys[row]) + 1))
                tiles.append(Tile(level, row, col, box))
    return tiles


def tile_pixels(image: Image.Image, tiles: list[Tile], spec: InputSpec,
                original_width: int | None = None) -> np.ndarray:
    """A loaded, upright PIL image -> (len(tiles), H, W, 3) uint8, each tile prepared as a whole image.
    Boxes are in the original's pixels: a draft-decoded (smaller) image has them scaled to its size."""
    scale = image.width / original_width if original_width else 1.0
    crops = [image.crop(tuple(round(edge * scale) for edge in tile.box)) if scale != 1.0 else image.crop(tile.box)
             for tile in tiles]
    return np.stack([prepare_image(crop, spec) for crop in crops])


def tile_count(grids: list[tuple[int, int]]) -> int:
    return sum(rows * cols for rows, cols in grids)
