"""Read and check an embeddings request (NIM and OpenAI forms) before any image is decoded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import parse_pyramid
from pipeline.decode.tiles import tile_count
from pipeline.serve.errors import ApiError

REQUEST_TYPES = ("query", "passage", "bulk_image", "bulk_text")
IMAGE_PREFIX = "data:image/"


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_vectors: int
    max_image_pixels: int


@dataclass
class EmbedRequest:
    items: list[str]  # data URIs (images) or texts
    images: bool
    encoding_format: str  # float | base64
    pyramid: list[tuple[int, int]] | None
    max_image_pixels: int


def _is_image(item: str) -> bool:
    return item[:11].lower() == IMAGE_PREFIX


def _check_image(index: int, item: str) -> None:
    header, comma, _ = item[:256].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ApiError(400, f"input[{index}]: expected a base64 data URI such as data:image/png;base64,...",
                       "invalid_data_uri", f"input[{index}]")


def _items(raw: Any) -> list[str]:
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ApiError(400, "input: expected a string or a list of strings", "invalid_input", "input")
    if not items or any(item == "" for item in items):
        raise ApiError(400, "input: empty input (give at least one non-empty string)", "empty_input", "input")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(400, f"input[{index}]: expected a string (a text or an image data URI; token arrays "
                                "are not supported)", "invalid_input", f"input[{index}]")
    return items


def _kind(items: list[str], request_type: str | None) -> bool:
    """True for images, False for texts; mixed requests are refused (one model pass per request kind)."""
    flags = [_is_image(item) for item in items]
    for index, (item, flag) in enumerate(zip(items, flags)):
        if not flag and "data:image/" in item[:4096]:
            raise ApiError(400, f"input[{index}]: a text and an image in one item are not supported; send the "
                                "data URI alone (AIPerf: --synthetic-input-tokens-mean 0)", "invalid_input",
                           f"input[{index}]")
    images = all(flags)
    if any(flags) and not images:
        raise ApiError(400, "input: mixes images and texts; send them in separate requests", "mixed_input", "input")
    if request_type == "bulk_text" and images:
        raise ApiError(400, "request_type bulk_text: the input holds images", "invalid_request_type", "request_type")
    if request_type == "bulk_image" and not images:
        raise ApiError(400, "request_type bulk_image: the input holds texts (images are data URIs "
                            "data:image/png;base64,...)", "invalid_request_type", "request_type")
    return images


def parse_request(body: bytes, limits: Limits, model_names: set[str], dim: int) -> EmbedRequest:
    """The request, checked; ApiError (400 / 404) names what is wrong."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object with an `input` field", "invalid_json")
    model = payload.get("model")
    if model is not None and model not in model_names:
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {sorted(model_names)}",
                       "model_not_found", "model")
    if "input" not in payload:
        raise ApiError(400, "input: required", "empty_input", "input")
    items = _items(payload["input"])
    if len(items) > limits.max_items:
        raise ApiError(400, f"input: {len(items)} items, at most {limits.max_items} per request", "too_many_items",
                       "input")
    request_type = payload.get("request_type")
    if request_type is not None and request_type not in REQUEST_TYPES:
        raise ApiError(400, f"request_type: expected one of {list(REQUEST_TYPES)} (got {request_type!r})",
                       "invalid_request_type", "request_type")
    images = _kind(items, request_type)
    if images:
        for index, item in enumerate(items):
            _check_image(index, item)
    encoding_format = payload.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, f"encoding_format: expected 'float' or 'base64' (got {encoding_format!r})",
                       "invalid_encoding_format", "encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise ApiError(400, f"dimensions: this model gives {dim}-dimensional vectors (got {dimensions!r})",
                       "invalid_dimensions", "dimensions")
    pyramid = None
    if payload.get("pyramid") is not None:
        if not images:
            raise ApiError(400, "pyramid: applies to images only", "invalid_pyramid", "pyramid")
        try:
            pyramid = parse_pyramid(payload["pyramid"])
        except ValueError as exc:
            raise ApiError(400, f"pyramid: {exc}", "invalid_pyramid", "pyramid") from None
        vectors = tile_count(pyramid) * len(items)
        if vectors > limits.max_vectors:
            raise ApiError(400, f"pyramid: {vectors} vectors for {len(items)} images, at most {limits.max_vectors} "
                                "per request", "too_many_vectors", "pyramid")
    max_pixels = payload.get("max_pixels")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ApiError(400, f"max_pixels: expected a whole number >= 1 (got {max_pixels!r})", "invalid_max_pixels",
                       "max_pixels")
    pixel_limit = min(limits.max_image_pixels, max_pixels or limits.max_image_pixels)
    return EmbedRequest(items, images, encoding_format, pyramid, pixel_limit)
