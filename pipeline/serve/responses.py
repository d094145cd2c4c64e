"""Shape embeddings into the NIM / OpenAI response: data entries, base64 or float vectors, usage, patch metadata."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.serve.images import Decoded

log = logging.getLogger(__name__)


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


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def render(payload: dict[str, Any]) -> bytes:
    """The payload as JSON, one data entry per json call: one call for a whole reply of 4,096 768-d vectors would
    hold the GIL (and the event loop) for ~1 s; an entry takes well under 1 ms."""
    fields = []
    for key, value in payload.items():
        encoded = b"[" + b",".join(map(_dumps, value)) + b"]" if key == "data" else _dumps(value)
        fields.append(_dumps(key) + b":" + encoded)
    return b"{" + b",".join(fields) + b"}"


class TokenCounter:
    """usage.prompt_tokens, counted on a thread of its own with a copy of the tokenizer: counting on the event
    loop froze /v1/health/live for 22 s (four 1 MB texts), and a fast tokenizer called from the encoder thread
    and another at once can fail ("Already borrowed")."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokens")

    def _count(self, texts: list[str]) -> int:
        try:
            return sum(len(ids) for ids in self._tokenizer(texts, truncation=True)["input_ids"])  # type: ignore[misc]
        except Exception:  # usage is informative only
            log.debug("counting tokens failed", exc_info=True)
            return 0

    async def count(self, texts: list[str]) -> int:
        if self._tokenizer is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._count, texts)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
