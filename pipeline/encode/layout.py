"""What a run stores per image for its encoder: the row schema, extra columns, and which encode stage feeds it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import EncoderConfig, parse_pyramid
from pipeline.decode.spec import InputSpec, input_spec_from_processor, resized_size
from pipeline.decode.tiles import pyramid_tiles
from pipeline.errors import ConfigError
from pipeline.index.schema import FLOAT16, FLOAT32, TILE_TYPE, images_schema
from pipeline.records import DecodeResult

# Late-interaction rows hold hundreds of vectors per image: half precision halves the table, and
# MaxSim scores move by ~1e-3 (the ColPali family stores them this way too).
MULTIVECTOR_TYPE = FLOAT16


def wrap_encoder(encoder: Any, config: EncoderConfig) -> Any:
    """Apply pipeline options that change what an encoder returns (pyramid tiles)."""
    if config.pool_factor and not getattr(encoder, "normalized", True):
        raise ConfigError(f"encoder.pool_factor: {encoder.kind} stores features a model takes one per image token; "
                          "pooling them would change what the model sees")
    if not config.pyramid or getattr(encoder, "grids", None) is not None:
        return encoder
    from pipeline.encode.pyramid import PyramidEncoder

    if getattr(encoder, "multivector", False) or encoder.input_spec().dynamic:
        raise ConfigError(f"encoder.pyramid: tiles need a fixed-size single-vector model; {encoder.kind} is not")
    return PyramidEncoder(encoder, config.pyramid, config.batch_size)


def decode_spec(described: Any, config: EncoderConfig) -> InputSpec:
    """What the decoders must give the encoder, known without its weights (the Ray runner's decode tasks run
    before any actor has loaded it): the vision-language kinds' own spec, else the image processor's, with the
    pyramid's tiles; the loaded encoder's input_spec() is the same."""
    spec = described.spec or input_spec_from_processor(described.processor)
    return dataclasses.replace(spec, tiles=tuple(parse_pyramid(config.pyramid))) if config.pyramid else spec


def groups_images(described: Any, config: EncoderConfig) -> bool:
    """is_grouped, before the weights load: the vision-language kinds (multi-vector, or dynamic resolution)
    carry their own input spec, and pyramid tiles make any encoder multi-vector."""
    return described.spec is not None or bool(config.pyramid)


def is_grouped(encoder: Any) -> bool:
    """Encoders that take a list of images of their own sizes (embed_groups) rather than one uint8 batch."""
    return bool(getattr(encoder, "multivector", False) or encoder.input_spec().dynamic)


def row_schema(encoder: Any) -> pa.Schema:
    extra = dict(encoder.extra_columns()) if hasattr(encoder, "extra_columns") else {}
    if getattr(encoder, "grids", None) is not None:
        extra["tiles"] = pa.list_(TILE_TYPE)
    multivector = bool(getattr(encoder, "multivector", False))
    return images_schema(encoder.dim, MULTIVECTOR_TYPE if multivector else FLOAT32, multivector, extra)


def row_extras(encoder: Any) -> Callable[[DecodeResult], dict[str, Any]] | None:
    """Per-row values of the extra columns, computed from the original image size (so reused rows get
    them too without a decode)."""
    spec = encoder.input_spec()
    grids = getattr(encoder, "grids", None)
    has_extras = hasattr(encoder, "extras_for")
    if grids is None and not has_extras:
        return None

    def extras(item: DecodeResult) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if grids is not None:
            values["tiles"] = [{"level": t.level, "row": t.row, "col": t.col}
                               for t in pyramid_tiles(item.width, item.height, grids)]
        if has_extras:
            width, height = resized_size(item.width, item.height, spec)
            values.update(encoder.extras_for(height, width))
        return values

    return extras


@dataclass(frozen=True)
class RowLayout:
    """What a run that does not hold the encoder (the Ray driver; its actors do) needs of it to commit rows and
    report: the row schema, the fingerprint, and what vector_sizes reads. Picklable."""

    schema: pa.Schema
    fingerprint: dict[str, Any]
    dim: int
    multivector: bool
    deepstack_layers: int = 0


def row_layout(encoder: Any) -> RowLayout:
    return RowLayout(row_schema(encoder), encoder.fingerprint(), encoder.dim,
                     bool(getattr(encoder, "multivector", False)), getattr(encoder, "deepstack_layers", 0))


def vector_sizes(encoder: Any, timer: Any) -> dict[str, Any]:
    """Report fields: vectors and embedding bytes per encoded image (multi-vector rows vary per image)."""
    if encoder is None or not timer.images:
        return {"vectors_per_image": None, "embedding_bytes_per_image": None}
    multivector = bool(getattr(encoder, "multivector", False))
    per_image = timer.vectors / timer.images if multivector and timer.vectors else 1.0
    width = (MULTIVECTOR_TYPE if multivector else FLOAT32).bit_width // 8
    width *= 1 + getattr(encoder, "deepstack_layers", 0)  # Qwen3-VL features: each token's DeepStack layers too
    return {"vectors_per_image": per_image, "embedding_bytes_per_image": per_image * encoder.dim * width}


def warm_up(encoder: Any, batch_size: int = 1) -> None:
    """A forward pass on zeros: the CUDA context and kernel selection are not any batch's cost.
    Fixed-size encoders take `batch_size` images, so the first real batch finds its kernels chosen."""
    import torch

    spec = encoder.input_spec()
    if is_grouped(encoder):
        if spec.dynamic:
            shape: tuple[int, ...] = (4 * spec.factor, 4 * spec.factor, 3)
        else:  # fixed-size multi-vector (ColPali), or pyramid tiles stacked per image
            shape = (encoder.n_tiles, *spec.output_shape) if spec.tiles else spec.output_shape
        encoder.encode_image_list([torch.zeros(shape, dtype=torch.uint8)])
    else:
        height, width, _ = spec.output_shape
        encoder.encode_images(torch.zeros((batch_size, height, width, 3), dtype=torch.uint8))
