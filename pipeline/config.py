"""Load, override and validate the YAML run config; every error names its key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline.errors import ConfigError

DEFAULT_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"]
# encoder.quality presets for dynamic-resolution models: (min_pixels, max_pixels), 28x28 pixels a token.
QUALITY_PIXELS = {name: (low * 28 * 28, high * 28 * 28) for name, (low, high) in
                  {"fast": (128, 256), "balanced": (256, 512), "high": (256, 768), "ultra": (256, 1024)}.items()}


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    root: list[str]
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    include_hidden: bool = False
    follow_symlinks: bool = False

    @field_validator("root", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        return sorted({ext.lower().lstrip(".") for ext in value})


class DecodeConfig(_Strict):
    workers: Any = "auto"  # "auto" = the usable cores
    max_image_pixels: int = Field(100_000_000, gt=0)
    timeout_s: float = Field(60.0, gt=0)  # per file; a hung decoder is killed and recorded
    jpeg_draft: bool = True  # let libjpeg downscale by 1/2..1/8 while decoding large JPEGs
    # cuda: JPEGs also go to nvJPEG on the GPU (needs torchvision), beside the CPU pool; auto: that when
    # the encoder is on a CUDA GPU and nvJPEG is there (H100: ViT-B/16 2.2x, 12 MP 1.6x faster; docs/benchmarks.md).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_batch: int = Field(256, ge=1)  # JPEGs per nvJPEG batch
    # JPEGs up to this size travel to the GPU decoder through shared memory (a decode task's region is at
    # least this large); larger ones are decoded by the CPU workers (JPEG draft mode).
    gpu_max_file_mb: int = Field(4, ge=1, le=256)
    # Memory a decode process may add to its own size at start (RLIMIT_AS; null: unbounded); a file that needs
    # more is the error "needs more than N MB to decode". Heaviest legitimate decodes measured: a 100 Mpx RGBA PNG
    # rotated by EXIF (at max_image_pixels) 1,674 MB whole, 2,071 MB as a 1+9+25 tile pyramid; the 400 photos
    # 12 MB, the hostile set 98 MB: 3 GB leaves the worst 1.5x. A 256x256 ICNS asked 8,100 MB (issue 16).
    max_worker_mb: int | None = Field(3072, ge=64)

    @field_validator("workers")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be 'auto' or a whole number >= 1")


class EncoderConfig(_Strict):
    model: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    # A PEFT adapter's base model (hub id or folder), when the one its adapter_config.json names cannot be
    # reached.
    base_model: str | None = None
    kind: Literal["auto", "clip", "siglip", "siglip2", "dinov2", "http", "colqwen2", "colqwen2_5",
                  "biqwen2_5", "colpali", "qwen_vl_features", "qwen3_vl_embedding"] = "auto"
    # kind http: a remote NIM/OpenAI-compatible /v1/embeddings endpoint (e.g. `embindex serve`) embeds the
    # original file bytes; `model` is the id it serves. The Bearer key comes from an environment variable.
    url: str | None = None  # http://HOST:PORT (a trailing /v1 is accepted)
    api_key_env: str | None = None  # the name of the variable holding the key, never the key itself
    request_concurrency: int = Field(4, ge=1)  # requests in flight
    request_images: int = Field(64, ge=1)  # images per bulk request
    request_max_bytes: int = Field(32_000_000, ge=1_000_000)  # per request; a larger file is downscaled first
    request_timeout_s: float = Field(120.0, gt=0)
    request_retries: int = Field(5, ge=0)  # on 429, 5xx and connection errors, with exponential backoff
    device: Literal["auto", "cuda", "mps", "cpu"] | str = "auto"
    # float8: bfloat16, with the vision tower's Linear layers in FP8 through torchao (Hopper/Ada GPUs, fixed-size
    # single-vector kinds; see pipeline/encode/models/float8.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float8"] = "auto"
    batch_size: int = Field(64, ge=1)
    # torch.compile of the forward pass (fixed-size single-vector kinds): auto compiles on CUDA when the run
    # has enough images to repay the compile (pipeline/encode/compiled.py); compiled code is cached on disk.
    compile: Literal["auto"] | bool = "auto"
    # Dynamic resolution (Qwen-VL families): each image is resized to within [min_pixels, max_pixels] pixels,
    # one language-model token per 28x28. None: the quality preset, else the model's own processor setting.
    min_pixels: int | None = Field(None, ge=28 * 28)
    max_pixels: int | None = Field(None, ge=28 * 28)
    quality: Literal["fast", "balanced", "high", "ultra"] | None = None  # see QUALITY_PIXELS

    @field_validator("max_pixels")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_pixels")
        if value is not None and low is not None and value < low:
            raise ValueError(f"must be at least encoder.min_pixels ({low})")
        return value

    @field_validator("quality")
    @classmethod
    def _quality_agrees(cls, value: str | None, info: ValidationInfo) -> str | None:
        for key, preset in zip(("min_pixels", "max_pixels"), QUALITY_PIXELS[value] if value else ()):
            given = info.data.get(key)
            if given is not None and given != preset:
                raise ValueError(f"{value!r} sets encoder.{key} to {preset}, but encoder.{key} is {given}: "
                                 "set the quality or the pixel bounds, not both")
        return value
    # Images of many sizes (dynamic resolution): a batch also stops at this many language-model tokens,
    # counted padded to its longest image. None: only batch_size caps it.
    max_batch_tokens: int | None = Field(None, ge=1)
    # Pyramid tiles for single-vector models: the whole image and every cell of each [rows, cols] grid,
    # stored as a multi-vector row with each vector's tile (level, row, col). E.g. [[1, 1], [3, 3], [5, 5]].
    pyramid: list[list[int]] | None = None
    # Multi-vector models: cluster each image's token vectors down to about 1 / pool_factor of them.
    pool_factor: int | None = Field(None, ge=2)
    # Matryoshka models (qwen3_vl_embedding): keep the first `dim` values of each vector, normalised again
    # (smaller tables, faster search, somewhat less recall); None: the model's full size. Part of the identity.
    dim: int | None = Field(None, ge=1)

    @field_validator("pyramid")
    @classmethod
    def _valid_pyramid(cls, value: Any) -> Any:
        if value is not None:
            parse_pyramid(value)  # ValueError names the bad grid
        return value


class LanceOutput(_Strict):
    uri: str = "./index"
    table: str = "images"


class ParquetOutput(_Strict):
    dir: str = "./embeddings"


class OutputConfig(_Strict):
    lancedb: LanceOutput | None = Field(default_factory=LanceOutput)
    parquet: ParquetOutput | None = None


class SearchConfig(_Strict):
    # Below this many rows search is exact (brute force); from it on `embindex run` keeps an ANN index.
    ann_min_rows: int = Field(100_000, ge=1)
    # On CLIP-like vectors (1M x 512, docs/benchmarks.md issue 21) IVF_SQ with the settings below gave recall@10
    # >= 0.996 for image and text queries at ~11-12 ms on 2 cores and builds in 1-2 minutes; IVF_PQ and IVF_RQ
    # lose text queries (0.90 / 0.94 at refine 10) and IVF_PQ builds for 3+ minutes; IVF_FLAT is as good but 4x
    # the size (2.05 GB against 0.52 GB).
    ann_index: Literal["ivf_sq", "ivf_pq", "ivf_rq", "ivf_flat", "ivf_hnsw_sq"] = "ivf_sq"
    # Rows per IVF partition when the index is built; None: LanceDB's 8,192 (122 partitions at 1M rows, where
    # 20 probes scan 16 % of the rows: 30-45 ms instead of 11-12 ms with 1,024).
    ann_partition_rows: int | None = Field(1024, ge=16)
    nprobes: int = Field(20, ge=1)  # IVF partitions searched per query: 2 % of the rows at 1,024 a partition
    # Re-rank refine_factor * k candidates with exact distances (not for ivf_flat, exact already): with IVF_SQ,
    # 5 lifted recall@10 from 0.97-0.98 to 0.996-1.0 for ~1 ms.
    refine_factor: int | None = Field(5, ge=1)
    ef: int = Field(100, ge=1)  # HNSW search breadth (ivf_hnsw_sq)
    # Text queries (search_text, `embindex query --text`) sit in their own cone, far from every image vector
    # (the modality gap): a quantised index may need more re-ranking for them (IVF_PQ: 0.90 at refine 10,
    # 0.98 at 30). None: the image settings above.
    text_nprobes: int | None = Field(None, ge=1)
    text_refine_factor: int | None = Field(None, ge=1)


class RayConfig(_Strict):
    """`run.runner: ray`: decode tasks and embed actors on a Ray cluster; the driver plans and commits."""

    address: str | None = None  # None: start Ray on this machine; auto, HOST:PORT or ray://HOST:PORT: join one
    num_gpu_actors: Any = "auto"  # embed actors; auto = the cluster's GPUs / gpus_per_actor
    gpus_per_actor: float = Field(1.0, ge=0)  # 0: actors encode on CPUs (CPU-only clusters, tests)
    actor_cpus: float = Field(1.0, gt=0)  # CPUs reserved per embed actor
    decode_cpus: float = Field(1.0, gt=0)  # per decode task (one file at a time)
    decode_files: int = Field(64, ge=1)  # files per decode task
    num_cpus: int | None = Field(None, ge=1)  # a Ray started here: CPUs it may use (default all)
    object_store_mb: int | None = Field(None, ge=64)  # a Ray started here: its object store
    # Object store this run's pipeline may fill (decoded images waiting for the actors); None: Ray Data's share.
    max_queued_mb: int | None = Field(None, ge=64)

    @field_validator("num_gpu_actors")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be 'auto' or a whole number >= 1")


class RunConfig(_Strict):
    report_dir: str = "./runs"
    max_error_rate: float = Field(0.05, ge=0, le=1)
    shard_size: int = Field(1024, ge=1)  # files per commit: a kill loses at most the shards in flight
    runner: Literal["local", "ray"] = "local"  # ray: needs `pip install 'embindex[ray]'`
    ray: RayConfig = Field(default_factory=RayConfig)


class ServeConfig(_Strict):
    """`embindex serve`: a NIM-compatible /v1/embeddings server for the encoder above."""

    host: str = "127.0.0.1"  # loopback unless asked: the API has no rate limits of its own
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = None  # the id in /v1/models; default: a hub id as given, a folder's name
    api_key_env: str | None = None  # if set, requests need `Authorization: Bearer <that variable's value>`
    max_items: int = Field(64, ge=1)  # inputs per request
    max_vectors: int = Field(4096, ge=1)  # vectors per request, pyramid tiles included
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # larger bodies get 413 before they are read
    max_image_pixels: int | None = Field(None, gt=0)  # None: decode.max_image_pixels
    max_queued_images: int = Field(8192, ge=1)  # beyond this many images waiting, new requests get 429
    batch_window_ms: float = Field(5.0, ge=0)  # how long a GPU batch waits for more requests' images
    # Request images decode in this many processes (threads measured GIL-bound: 712 against 1,392 images/s
    # on 16 cores); auto = the usable cores.
    decode_workers: Any = "auto"
    # Bytes of request bodies in flight, admitted from Content-Length before a body is read (past it, 429 with
    # Retry-After). Memory follows bytes, not images: 16 concurrent 60 MB bodies took the server to 2.0-2.3 GB
    # (issue 16). null: 4 x max_body_bytes (256 MiB by default), four of the largest bodies at once; an admitted
    # byte costs about 2 at its peak (the body, then its strings): 16 x 60 MB took the server 0.6-0.7 GB over idle.
    max_inflight_bytes: int | None = Field(None, ge=1024)
    # Characters per text input (400 past it): the tokenizer reads a whole text before truncating it to the
    # model's context (CLIP: 77 tokens). Four 1 MB texts took 49 s; at a limit of 1,000,000, four such requests
    # took the server to 2.35 GB, outside the byte budget (docs/benchmarks.md). 16384 characters are ~4,000
    # tokens, beyond any served text tower's context; a request of 64 of them tokenizes in ~1-2 s on 2 cores.
    max_text_chars: int = Field(16384, ge=1)
    # Seconds to receive a whole request body (408 past it, the connection closed): 200 half-sent bodies held
    # connections and their admitted bytes for minutes. 60 s lets a 64 MiB body in at 9 Mbit/s.
    body_timeout_s: float = Field(60.0, gt=0)

    @field_validator("decode_workers")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be 'auto' or a whole number >= 1")

    @field_validator("max_inflight_bytes")
    @classmethod
    def _admits_the_largest_body(cls, value: int | None, info: ValidationInfo) -> int | None:
        body = info.data.get("max_body_bytes")
        if value is not None and body is not None and value < body:
            raise ValueError(f"must be >= serve.max_body_bytes ({body}), or the largest request never gets in")
        return value

    @property
    def inflight_bytes(self) -> int:
        """max_inflight_bytes, its null resolved."""
        return self.max_inflight_bytes if self.max_inflight_bytes is not None else 4 * self.max_body_bytes


class Config(_Strict):
    input: InputConfig
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    config_path: str | None = Field(None, exclude=True)

    @property
    def roots(self) -> list[Path]:
        return [Path(r) for r in self.input.root]

    @property
    def index_dir(self) -> Path:
        """Where the lock and the index's own metadata live: the first configured sink."""
        if self.output.lancedb is not None:
            return Path(self.output.lancedb.uri)
        return Path(self.output.parquet.dir)  # type: ignore[union-attr]


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `--set dotted.key=value` (value parsed as YAML) to the raw config dict."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. encoder.batch_size=32")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def _resolve(base: Path, path: str) -> str:
    expanded = os.path.expanduser(path)
    return str(expanded if os.path.isabs(expanded) else (base / expanded).resolve())


def _looks_local(model: str, base: Path) -> bool:
    return model.startswith((".", "/", "~")) or (base / model).is_dir()


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        kind = problem["type"]
        if kind == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {problem.get('input')!r})")
    return "; ".join(dict.fromkeys(lines))


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (),
                require_input: bool = True) -> Config:
    """Read CONFIG, apply --set overrides, validate, and resolve paths against the file's folder.
    `require_input=False` (`embindex serve`) accepts a config without an input section."""
    config_path = Path(path)
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    if not require_input and "input" not in raw:
        raw["input"] = {"root": []}
    try:
        config = Config(**raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    except TypeError as exc:  # a section given as a scalar, e.g. `decode: 4`
        raise ConfigError(str(exc)) from None
    if config.output.lancedb is None and config.output.parquet is None:
        raise ConfigError("output: configure at least one sink (output.lancedb or output.parquet)")
    if config.encoder.kind == "http" and not config.encoder.url:
        raise ConfigError("encoder.url: required when encoder.kind is 'http' (e.g. http://127.0.0.1:8000)")
    if config.encoder.kind == "http" and not config.encoder.url.startswith(("http://", "https://")):
        raise ConfigError(f"encoder.url: expected an http:// or https:// address (got {config.encoder.url!r})")
    if config.encoder.kind == "http" and config.encoder.pyramid:
        raise ConfigError("encoder.pyramid: not available with encoder.kind 'http' (the server embeds whole images)")

    base = config_path.resolve().parent
    config.config_path = str(config_path.resolve())
    config.input.root = [_resolve(base, r) for r in config.input.root]
    for index, root in enumerate(config.input.root):
        if not os.path.isdir(root):
            key = "input.root" if len(config.input.root) == 1 else f"input.root[{index}]"
            problem = "is a file, not a folder" if os.path.exists(root) else "folder does not exist"
            raise ConfigError(f"{key}: {problem}: {root}")
    if config.output.lancedb is not None:
        config.output.lancedb.uri = _resolve(base, config.output.lancedb.uri)
    if config.output.parquet is not None:
        config.output.parquet.dir = _resolve(base, config.output.parquet.dir)
    config.run.report_dir = _resolve(base, config.run.report_dir)
    if config.encoder.kind != "http" and _looks_local(config.encoder.model, base):  # http: a served id
        config.encoder.model = _resolve(base, config.encoder.model)
    if config.encoder.base_model is not None and _looks_local(config.encoder.base_model, base):
        config.encoder.base_model = _resolve(base, config.encoder.base_model)
    return config
