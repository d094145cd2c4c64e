"""Read and check an embeddings request (NIM and OpenAI forms) before any image is decoded."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from pipeline.config import parse_pyramid
from pipeline.decode.tiles import tile_count
from pipeline.serve.errors import ApiError

REQUEST_TYPES = ("query", "passage", "bulk_image", "bulk_text")
IMAGE_PREFIX = "data:image/"
# A request is 3 levels deep (object > pyramid > grid); 100,000 levels made json raise RecursionError (a 500).
MAX_JSON_DEPTH = 32
# Brackets, commas and colons outside strings, and strings: a request of 64 inputs and a pyramid has ~200.
# 60 MB of `[],` would be 20 M lists, ~1.5 GB of Python objects from one admitted body.
MAX_JSON_VALUES = 10_000
# Strings longer than this are decoded as they are, not scanned by json, which held the GIL (and so the event
# loop) for 300 ms on a 60 MB data URI on 2 cores; a decode is a copy (~10 ms). Raw control characters in them are
# let through: in a data URI the base64 check refuses them, and no text is allowed this long.
LONG_STRING_BYTES = 1 << 20
_BRACKETS = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_vectors: int
    max_image_pixels: int
    max_text_chars: int


@dataclass
class EmbedRequest:
    items: list[str]  # data URIs (images) or texts
    images: bool
    encoding_format: str  # float | base64
    pyramid: list[tuple[int, int]] | None
    max_image_pixels: int


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, f"the body is not valid JSON: {message}", "invalid_json")


def _too_complex(message: str, code: str = "json_too_complex") -> ApiError:
    return ApiError(400, f"the body's JSON is refused: {message}", code)


def _closing_quote(body: bytearray, start: int) -> int:
    """The index of the quote that closes the string opening at body[start]: the next one not escaped."""
    close = body.find(b'"', start + 1)
    while close > 0:
        backslashes = 0
        while body[close - 1 - backslashes] == 0x5C:  # the opening quote ends the walk
            backslashes += 1
        if backslashes % 2 == 0:
            return close
        close = body.find(b'"', close + 1)
    raise _invalid_json(f"unterminated string starting at byte {start}")


def _string(body: bytearray, view: memoryview, start: int, close: int) -> str:
    """The value of the JSON string body[start:close + 1] (both quotes included)."""
    if close - start > LONG_STRING_BYTES and body.find(b"\\", start, close) < 0:
        return str(view[start + 1:close], "utf-8")
    return scanstring(str(view[start:close + 1], "utf-8"), 1, True)[0]  # json's own: escapes, control characters


def _cut_strings(body: bytearray) -> tuple[str, list[str]]:
    """The body with its n-th string replaced by "n" (a skeleton of a few hundred characters), and the strings.
    Works on the bytes, a string at a time: no step holds the GIL longer than one string's copy."""
    parts, strings, end = [], [], 0
    with memoryview(body) as view:
        while (start := body.find(b'"', end)) >= 0:
            if len(strings) == MAX_JSON_VALUES:
                raise _too_complex(f"more than {MAX_JSON_VALUES} strings")
            close = _closing_quote(body, start)
            parts += [str(view[end:start], "utf-8"), f'"{len(strings)}"']
            strings.append(_string(body, view, start, close))
            end = close + 1
        parts.append(str(view[end:], "utf-8"))
    return "".join(parts), strings


def _utf8(body: bytearray) -> bytearray:
    """The body in UTF-8, as json.loads reads bytes (UTF-16 and UTF-32 are transcoded, a BOM dropped)."""
    encoding = json.detect_encoding(body)
    if encoding == "utf-8":
        return body
    if encoding == "utf-8-sig":
        return body[3:]
    return bytearray(body.decode(encoding).encode())


def _check_shape(skeleton: str) -> None:
    """Refuse more than MAX_JSON_VALUES values and nesting deeper than MAX_JSON_DEPTH before json builds them."""
    marks = sum(skeleton.count(mark) for mark in "[]{},:")
    if marks > MAX_JSON_VALUES:
        raise _too_complex(f"{marks} brackets, commas and colons, at most {MAX_JSON_VALUES}")
    depth = deepest = 0
    for bracket in _BRACKETS.finditer(skeleton):
        depth += 1 if bracket.group() in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise _too_complex(f"nested {deepest} levels deep, at most {MAX_JSON_DEPTH}", "json_too_deep")


def _restore(node: Any, strings: list[str]) -> Any:
    """The skeleton's values with each "n" back to the n-th string (depth checked: recursion is bounded)."""
    if isinstance(node, str):
        return strings[int(node)]
    if isinstance(node, list):
        return [_restore(value, strings) for value in node]
    if isinstance(node, dict):
        return {strings[int(key)]: _restore(value, strings) for key, value in node.items()}
    return node


def load_json(body: bytearray) -> Any:
    """The body's JSON, built in steps that each hold the GIL briefly, its size and depth checked first.
    Empties `body` once its strings are out: the request then holds one copy of its bytes, not two."""
    try:
        skeleton, strings = _cut_strings(_utf8(body))
    except json.JSONDecodeError as exc:
        raise _invalid_json(exc.msg) from None
    except UnicodeDecodeError as exc:
        raise _invalid_json(str(exc)) from None
    body.clear()
    _check_shape(skeleton)
    try:
        return _restore(json.loads(skeleton), strings)
    except json.JSONDecodeError as exc:  # its position would be the skeleton's, not the body's
        raise _invalid_json(exc.msg) from None
    except ValueError as exc:  # a number of over 4,300 digits
        raise _invalid_json(str(exc)) from None


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


def _check_model(model: Any, model_names: set[str]) -> None:
    if model is None:
        return
    if not isinstance(model, str):  # a list or an object used to reach the set lookup: TypeError, a 500
        raise ApiError(400, f"model: expected a string, the id of GET /v1/models (got {type(model).__name__})",
                       "invalid_model", "model")
    if model not in model_names:
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {sorted(model_names)}",
                       "model_not_found", "model")


def _check_texts(items: list[str], max_chars: int) -> None:
    """Texts up to max_chars: the tokenizer reads all of a text before it truncates to the model's context."""
    for index, item in enumerate(items):
        if len(item) > max_chars:
            raise ApiError(400, f"input[{index}]: {len(item)} characters, at most {max_chars} per text "
                                "(serve.max_text_chars)", "text_too_long", f"input[{index}]")


def _pyramid(payload: dict[str, Any], images: bool, n_items: int, limits: Limits) -> list[tuple[int, int]] | None:
    if payload.get("pyramid") is None:
        return None
    if not images:
        raise ApiError(400, "pyramid: applies to images only", "invalid_pyramid", "pyramid")
    try:
        pyramid = parse_pyramid(payload["pyramid"])
    except ValueError as exc:
        raise ApiError(400, f"pyramid: {exc}", "invalid_pyramid", "pyramid") from None
    vectors = tile_count(pyramid) * n_items
    if vectors > limits.max_vectors:
        raise ApiError(400, f"pyramid: {vectors} vectors for {n_items} images, at most {limits.max_vectors} "
                            "per request", "too_many_vectors", "pyramid")
    return pyramid


def _output_options(payload: dict[str, Any], dim: int) -> str:
    """encoding_format, checked with `dimensions` (which only may repeat the model's own)."""
    encoding_format = payload.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, f"encoding_format: expected 'float' or 'base64' (got {encoding_format!r})",
                       "invalid_encoding_format", "encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise ApiError(400, f"dimensions: this model gives {dim}-dimensional vectors (got {dimensions!r})",
                       "invalid_dimensions", "dimensions")
    return encoding_format


def _pixel_limit(payload: dict[str, Any], limits: Limits) -> int:
    max_pixels = payload.get("max_pixels")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ApiError(400, f"max_pixels: expected a whole number >= 1 (got {max_pixels!r})", "invalid_max_pixels",
                       "max_pixels")
    return min(limits.max_image_pixels, max_pixels or limits.max_image_pixels)


def parse_request(body: bytearray, limits: Limits, model_names: set[str], dim: int) -> EmbedRequest:
    """The request, checked; ApiError (400 / 404) names what is wrong. Empties `body` (see load_json)."""
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object with an `input` field", "invalid_json")
    _check_model(payload.get("model"), model_names)
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
    else:
        _check_texts(items, limits.max_text_chars)
    encoding_format = _output_options(payload, dim)
    pyramid = _pyramid(payload, images, len(items), limits)
    return EmbedRequest(items, images, encoding_format, pyramid, _pixel_limit(payload, limits))
