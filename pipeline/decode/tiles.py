"""Pyramid tiles (as in NVIDIA NIM's image-embedding API): the whole image plus every cell of each grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    level: int  # index into the pyramid's grids; [1, 1] is the whole image
    row: int
    col: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the upright original's pixels


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


def tile_count(grids: list[tuple[int, int]]) -> int:
    return sum(rows * cols for rows, cols in grids)
