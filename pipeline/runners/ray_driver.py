"""The Ray runner's driver: the plan's files through Ray decode tasks and embed actors, committed here in shards."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.decode.regions import slot_bytes
from pipeline.decode.spec import InputSpec
from pipeline.encode.groups import WINDOW_BATCHES
from pipeline.encode.layout import RowLayout, decode_spec, groups_images
from pipeline.encode.models.base import resolve_dtype
from pipeline.encode.models.source import ModelSource
from pipeline.encode.stream import EncodeTimer
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.index.commit import ShardCommitter
from pipeline.index.identity import index_identity
from pipeline.index.sinks.base import Sink
from pipeline.plan.diff import Plan
from pipeline.plan.reuse import VectorReuse
from pipeline.records import DecodeResult, Embedded
from pipeline.report import progress_bar
from pipeline.runners.ray_actor import EmbedActor, layout_key
from pipeline.runners.ray_stages import KV_NAMESPACE, decode_block
from pipeline.runners.ray_tally import Tally

log = logging.getLogger(__name__)

# A decode task's pixels stay within this (fewer files per task than run.ray.decode_files where each is large:
# a 3x3 pyramid's 10 tiles of 224 px are 1.5 MB a file, a 768-token document page 1.8 MB).
BLOCK_PIXEL_BYTES = 64 << 20
# Memory Ray reserves per decode task: a large photo decodes to a few hundred MB before its resize.
# It also keeps Ray from fusing decode into the embed actors (fused ops must ask for the same resources),
# which would decode serially inside them.
DECODE_MEMORY = 256 * 1024 * 1024


@dataclass
class RayRun:
    """What run_index needs back: the committer's counts, timings, the dimension, and report fields."""

    committer: ShardCommitter | None
    timer: EncodeTimer
    identity: dict[str, Any]  # the actors' encoder fingerprint with the pipeline's options, as the local runner's
    layout: RowLayout | None  # what the report needs of the encoder the actors held
    embed_s: float
    model_load_s: float
    report: dict[str, Any] = field(default_factory=dict)


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs both
    except ImportError:
        raise ConfigError("run.runner: 'ray' needs Ray Data: pip install 'embindex[ray]'") from None
    return ray


def actor_device(config: Config) -> str:
    """The device the embed actors use: the driver may run on a machine without a GPU."""
    if config.encoder.device != "auto":
        return config.encoder.device
    return "cuda" if config.run.ray.gpus_per_actor > 0 else "cpu"


def actor_model_source(config: Config, described: ModelSource) -> ModelSource:
    """The model as the actors will load it (their device's dtype), checked before anything is written."""
    import torch

    _require_ray()
    if config.encoder.kind == "http":
        raise ConfigError("encoder.kind: http sends each file to its endpoint, which does the GPU work: "
                          "Ray's actors would only forward it; use run.runner: local")
    if config.decode.device == "cuda":
        raise ConfigError("decode.device: GPU decode is not available with run.runner: ray; use cpu")
    device = torch.device(actor_device(config))
    return dataclasses.replace(described, dtype=resolve_dtype(config.encoder.dtype, device))


@contextmanager
def ray_session(config: Config) -> Iterator[Any]:
    """Join the configured cluster, or start Ray here; leave a session the caller opened as it is."""
    ray = _require_ray()
    settings = config.run.ray
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # Ray starts its processes with fork + exec, which lancedb's fork hook warns about needlessly.
    warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
    if settings.address in (None, "local"):
        options["num_cpus"] = settings.num_cpus
        if settings.object_store_mb is not None:
            options["object_store_memory"] = settings.object_store_mb * 1024 * 1024
    else:
        _check_reachable(settings.address)
        options["address"] = settings.address
    ray.init(**options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One TCP connect first: ray.init retries an address that does not answer for many minutes."""
    import socket

    if address in ("auto", "local"):
        return  # Ray looks these up itself and fails at once when there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except ValueError:
        raise ConfigError(f"run.ray.address: expected auto, HOST:PORT or ray://HOST:PORT (got {address!r})") from None
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} "
                              f"(run.ray.address): {exc.strerror or exc}") from None


def _n_actors(ray: Any, config: Config) -> int:
    settings = config.run.ray
    if settings.gpus_per_actor == 0:
        return 1 if settings.num_gpu_actors == "auto" else settings.num_gpu_actors
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < settings.gpus_per_actor:
        raise ConfigError("run.ray.gpus_per_actor: the Ray cluster has no GPU; set run.ray.gpus_per_actor: 0 "
                          "to encode on CPUs, or point run.ray.address at a cluster with GPUs")
    if settings.num_gpu_actors == "auto":
        return int(gpus // settings.gpus_per_actor)
    if settings.num_gpu_actors * settings.gpus_per_actor > gpus:
        # Ray would wait for the missing GPUs for ever.
        raise ConfigError(f"run.ray.num_gpu_actors: {settings.num_gpu_actors} actors of "
                          f"{settings.gpus_per_actor:g} GPU need more than the cluster's {gpus:g} GPUs")
    return settings.num_gpu_actors


def _actor_pool(ray: Any, n_actors: int, device: str) -> Any:
    """A fixed pool. On a GPU each actor runs two calls at once, so copying one batch in (and Ray handing
    it over) overlaps the other's forward pass, as the local runner's two pinned buffers do; the GPU
    itself still runs one forward at a time. On CPUs two forwards would only share the cores."""
    if not device.startswith("cuda"):
        return ray.data.ActorPoolStrategy(size=n_actors)
    return ray.data.ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=2,
                                      enable_true_multi_threading=True)


def files_per_block(spec: InputSpec, decode_files: int) -> int:
    """run.ray.decode_files, or fewer where a file's pixels are large (BLOCK_PIXEL_BYTES a task)."""
    return max(1, min(decode_files, BLOCK_PIXEL_BYTES // slot_bytes(spec)))


def _plan_blocks(plan: Plan, reuse: VectorReuse, rows_per_block: int) -> list[pa.Table]:
    """The pending files with the content hashes each may reuse, cut into one block per decode task."""
    known = [sorted(hashes) if (hashes := reuse.hashes_for_size(size)) else None
             for size in plan.pending["size_bytes"].to_pylist()]
    table = plan.pending.append_column("known_hashes", pa.array(known, pa.list_(pa.string())))
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]


def _encoder_settings(config: Config) -> dict[str, Any]:
    return {**config.encoder.model_dump(), "device": actor_device(config)}


class _Driver:
    """Turns the rows coming back from the actors into the committer's events; commits in shards."""

    def __init__(self, sinks: list[Sink], model: str, shard_size: int, reuse: VectorReuse, run_key: str) -> None:
        self.sinks, self.model, self.shard_size, self.reuse, self.run_key = sinks, model, shard_size, reuse, run_key
        self.committer: ShardCommitter | None = None  # made with the first batch: an actor has left the layout
        self.layout: RowLayout | None = None
        self.seen: set[tuple[str, str]] = set()  # a block Ray ran twice must not write its rows twice
        self.timer = EncodeTimer()
        self.halvings = 0.0  # the actors' out-of-memory halvings, a share per row

    def _committer(self) -> ShardCommitter:
        """Every batch has passed an actor, which left its encoder's row layout in Ray's key-value store first."""
        if self.committer is None:
            from ray.experimental.internal_kv import _internal_kv_get

            self.layout = pickle.loads(_internal_kv_get(layout_key(self.run_key), namespace=KV_NAMESPACE))
            self.committer = ShardCommitter(self.sinks, self.layout.schema, self.model, self.shard_size)
        return self.committer

    def _reused(self, key: dict[str, Any], digest: str) -> Embedded:
        known = self.reuse.lookup(digest)
        self.timer.reused += 1
        item = DecodeResult(key, None, None, known.width, known.height, digest, extras=known.extras)
        return Embedded([item], [known.vector] if self.layout.multivector else known.vector[None, :])

    def add(self, batch: dict[str, np.ndarray]) -> int:
        committer = self._committer()
        embedded: list[DecodeResult] = []
        rows: list[int] = []
        fresh = 0
        for index in range(len(batch["path"])):
            key = {"root": str(batch["root"][index]), "path": str(batch["path"][index]),
                   "size_bytes": int(batch["size_bytes"][index]), "mtime_ns": int(batch["mtime_ns"][index]),
                   "attempts": int(batch["attempts"][index]), "was_in": batch["was_in"][index] or None}
            if (key["root"], key["path"]) in self.seen:
                log.debug("%s: delivered twice by Ray; kept once", key["path"])
                continue
            self.seen.add((key["root"], key["path"]))
            fresh += 1
            self.timer.decode_s += float(batch["decode_s"][index])
            self.timer.flops += float(batch["flops"][index])
            self.halvings += float(batch["oom_halvings"][index])
            digest, error = str(batch["content_hash"][index]), str(batch["error"][index])
            if error:
                committer.add(DecodeResult(key, None, None, error=error))
            elif batch["reused"][index]:
                committer.add(self._reused(key, digest))
            else:
                extras = json.loads(batch["extras"][index]) if batch["extras"][index] else None
                embedded.append(DecodeResult(key, None, None, int(batch["width"][index]),
                                             int(batch["height"][index]), digest, extras=extras))
                rows.append(index)
        if embedded:
            self.timer.images += len(embedded)
            self.timer.batch_sizes.append(len(embedded))
            if self.layout.multivector:
                vectors: np.ndarray | list[np.ndarray] = [batch["embedding"][row] for row in rows]
                self.timer.vectors += sum(len(v) for v in vectors)
            else:
                vectors = batch["embedding"][rows]
            committer.add(Embedded(embedded, vectors))
        return fresh

    def finish(self) -> ShardCommitter | None:
        self.timer.oom_halvings = round(self.halvings)
        if self.committer is not None:
            self.committer.commit()
        return self.committer


def embed_on_ray(config: Config, described: ModelSource, plan: Plan, reuse: VectorReuse, sinks: list[Sink],
                 progress: bool | None) -> RayRun:
    """Decode and embed the plan's pending files on Ray; commit them here, a shard at a time."""
    settings = config.run.ray
    spec = decode_spec(described, config.encoder)
    blocks = _plan_blocks(plan, reuse, files_per_block(spec, settings.decode_files))
    # Grouped encoders sort each actor call's images by token count (encode.groups): a few batches' worth, as
    # the local runner's window, so every forward pass is token-homogeneous.
    grouped = groups_images(described, config.encoder)
    rows_per_call = config.encoder.batch_size * (WINDOW_BATCHES if grouped else 1)
    show = sys.stderr.isatty() if progress is None else progress
    run_key = uuid.uuid4().hex  # names this run's entries in Ray's key-value store
    driver = _Driver(sinks, described.name, config.run.shard_size, reuse, run_key)
    tally = Tally()
    with ray_session(config) as ray:
        from ray.exceptions import RayError

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts committed files; Ray's would draw a second bar
        context.print_on_execution_start = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        if not log.isEnabledFor(logging.DEBUG):  # Ray Data's execution summaries, unless --verbose
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        n_actors = _n_actors(ray, config)
        decode_tasks = None if config.decode.workers == "auto" else config.decode.workers
        # The local runner's test hook (pipeline.decode.worker) reaches Ray's decode workers too.
        fault = os.environ.get("EMBINDEX_FAULT")
        started, started_at = time.perf_counter(), time.time()
        first_s = None
        dataset = (
            ray.data.from_arrow(blocks)
            .map_batches(decode_block, batch_format="pyarrow", batch_size=None,
                         fn_kwargs={"spec": spec, "max_image_pixels": config.decode.max_image_pixels,
                                    "jpeg_draft": config.decode.jpeg_draft, "timeout_s": config.decode.timeout_s,
                                    "run_key": run_key, "max_worker_mb": config.decode.max_worker_mb},
                         num_cpus=settings.decode_cpus, memory=DECODE_MEMORY,
                         compute=ray.data.TaskPoolStrategy(size=decode_tasks),
                         runtime_env={"env_vars": {"EMBINDEX_FAULT": fault}} if fault else None)
            .map_batches(EmbedActor, batch_format="numpy", batch_size=rows_per_call,
                         compute=_actor_pool(ray, n_actors, actor_device(config)), num_gpus=settings.gpus_per_actor,
                         num_cpus=settings.actor_cpus,
                         fn_constructor_kwargs={"encoder_config": _encoder_settings(config), "run_key": run_key,
                                                "n_images": -(-plan.pending.num_rows // n_actors)})
        )
        if settings.max_queued_mb is not None:  # else decoding may run far ahead of the GPUs on a big store
            options = dataset.context.execution_options  # this dataset's own copy of the context
            options.resource_limits = options.resource_limits.copy(
                object_store_memory=settings.max_queued_mb * 1024 * 1024)
        bar = progress_bar(plan.pending.num_rows, show)
        try:
            waited = time.perf_counter()
            for batch in dataset.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=2):
                driver.timer.decode_wait_s += time.perf_counter() - waited
                first_s = first_s if first_s is not None else time.perf_counter() - started
                tally.add(batch)
                bar.update(driver.add(batch))
                waited = time.perf_counter()
        except RayError as exc:
            _raise_config_error(exc)
            raise RuntimeError(f"the Ray job failed: {_first_line(exc)}") from None
        finally:
            bar.close()
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(run_key, del_by_prefix=True, namespace=KV_NAMESPACE)
        committer = driver.finish()
        total_s = time.perf_counter() - started
        resources = ray.cluster_resources()
        n_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    # As in the local runner, embed_s starts once a model is loaded and warmed up: here when the first actor
    # is (Ray starts the actors' processes, imports, loads and warms up while the decode tasks run). The
    # actors' clocks are other machines' on a cluster: clamped to the run should they disagree.
    actor_start_s = min(max(tally.first_ready_at - started_at, 0.0), total_s)
    embed_s = max(total_s - actor_start_s, 1e-9)
    driver.timer.encode_s = sum(entry["encode_s"] for entry in tally.gpus.values())
    gpus = tally.report(embed_s)
    fields: dict[str, Any] = {
        "runner": "ray",
        "model_loaded": True,
        "device": tally.device or actor_device(config),
        "gpu_name": next((g["gpu_name"] for g in tally.gpus.values() if g["gpu_name"]), None),
        "peak_vram_allocated_mb": max([g["peak_vram_allocated_mb"] for g in tally.gpus.values()] or [0.0]),
        "peak_vram_reserved_mb": max([g["peak_vram_reserved_mb"] for g in tally.gpus.values()] or [0.0]),
        "decode_workers": int(resources.get("CPU", 0) // settings.decode_cpus),
        "ray": {"address": settings.address or "local", "nodes": n_nodes, "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0), "embed_actors": n_actors, "gpus_per_actor": settings.gpus_per_actor,
                "decode_cpus": settings.decode_cpus, "decode_files": settings.decode_files,
                "total_s": total_s, "first_result_s": first_s, "actor_start_s": actor_start_s,
                "actor_load_s": tally.actor_load_s, "actor_compile_s": tally.actor_compile_s, **gpus},
    }
    identity = index_identity(driver.layout.fingerprint, config.encoder) if driver.layout is not None else {}
    return RayRun(committer, driver.timer, identity, driver.layout, embed_s, actor_start_s, fields)


def _raise_config_error(exc: BaseException) -> None:
    """An actor that found the config wrong (encoder.compile: true for a multi-vector model, encoder.pyramid on
    a dynamic one) or could not load the model: the same error, and exit code, as the local runner's. Ray hands
    back the actor's error as text, its last line "pipeline.errors.ConfigError: <message>"."""
    name, found, message = _first_line(exc).partition(": ")
    error = {"ConfigError": ConfigError, "ModelLoadError": ModelLoadError}.get(name.rpartition(".")[2])
    if found and error is not None:
        raise error(message) from None


def _first_line(exc: BaseException) -> str:
    """Ray's errors carry the remote traceback; its last line names the cause."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
