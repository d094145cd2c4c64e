"""Shape embeddings into the NIM / OpenAI response: data entries, base64 or float vectors, usage, patch metadata."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from pipeline.serve.images import Decoded


def _vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's convention: little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def image_response(model: str, decoded: list[Decoded], vectors: np.ndarray, encoding_format: str) -> dict[str, Any]:
    """One entry per vector: per image, or per pyramid tile with `patch_metadata` naming its cell."""
    data: list[dict[str, Any]] = []
    row = 0
    for index, image in enumerate(decoded):
        if image.tiles is None:
            data.append({"object": "embedding", "index": index, "embedding": _vector(vectors[row], encoding_format)})
            row += 1
            continue
        for tile in image.tiles:
            left, top, right, bottom = tile.box
            data.append({
                "object": "embedding", "index": index, "embedding": _vector(vectors[row], encoding_format),
                "patch_metadata": {"input_index": index, "level": tile.level, "row": tile.row, "col": tile.col,
                                   "box": [left, top, right, bottom], "image_width": image.width,
                                   "image_height": image.height},
            })
            row += 1
    return {"object": "list", "model": model, "data": data,
            "usage": {"prompt_tokens": 0, "total_tokens": 0, "num_images": len(decoded), "num_patches": row}}


def text_response(model: str, vectors: np.ndarray, n_tokens: int, encoding_format: str) -> dict[str, Any]:
    data = [{"object": "embedding", "index": index, "embedding": _vector(vector, encoding_format)}
            for index, vector in enumerate(vectors)]
    return {"object": "list", "model": model, "data": data,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "num_images": 0, "num_patches": 0}}
