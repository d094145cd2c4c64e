"""The Ray runner's embed actor: one encoder on one GPU (or the CPU), any kind the local runner embeds."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from typing import Any

import numpy as np

from pipeline.runners.ray_stages import KV_NAMESPACE, node_label


def layout_key(run_key: str) -> str:
    """Where an actor leaves the row layout (encode.layout.RowLayout) for the driver, in Ray's key-value store."""
    return f"{run_key}:layout"


def _json_default(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


class EmbedActor:
    """Holds one encoder (on the actor's GPU, or the CPU) and embeds the decoded rows of each batch.

    Fixed-size single-vector models take the batch as one uint8 tensor. The others (multi-vector, dynamic
    resolution, pyramid tiles) go through the local runner's grouped encode stage (encode.groups): sorted into
    groups of similar token counts within the batch, which the driver sizes to a few encoder batches, and a
    group the GPU has no memory for is halved until it fits (an image that fails alone is an error row)."""

    def __init__(self, encoder_config: dict[str, Any], run_key: str, n_images: int) -> None:
        started = time.perf_counter()
        import ray
        import torch
        from ray.experimental.internal_kv import _internal_kv_put

        from pipeline.config import EncoderConfig
        from pipeline.encode.compiled import choose, compile_encoder
        from pipeline.encode.layout import is_grouped, row_extras, row_layout, warm_up, wrap_encoder
        from pipeline.encode.models.load import load_encoder

        self.settings = settings = EncoderConfig(**encoder_config)
        self.encoder = wrap_encoder(load_encoder(settings), settings)
        self.cuda = self.encoder.device.type == "cuda"
        self.grouped = is_grouped(self.encoder)
        if self.cuda:  # as in the local runner: CUDA's set-up and the kernels' choice are loading's cost
            warm_up(self.encoder, 1 if self.grouped else settings.batch_size)
        self.compile = choose(settings.compile, self.encoder, n_images, settings.batch_size)
        if self.compile.enabled:
            compile_encoder(self.encoder, self.compile, settings.batch_size)
        self.layout = row_layout(self.encoder)
        self.extras = row_extras(self.encoder)
        _internal_kv_put(layout_key(run_key), pickle.dumps(self.layout), overwrite=True, namespace=KV_NAMESPACE)
        context = ray.get_runtime_context()
        gpus = context.get_accelerator_ids().get("GPU", [])
        self.label = f"{node_label()}/gpu{','.join(gpus)}" if gpus else f"{node_label()}/cpu-{os.getpid()}"
        if gpus and context.get_assigned_resources().get("GPU", 1) < 1:  # actors sharing a GPU: one row each
            self.label += f"-{os.getpid()}"
        self.gpu_name = torch.cuda.get_device_name(self.encoder.device) if self.cuda else ""
        # On a GPU two calls run at once (see ray_driver): one copies its batch in while the other's
        # forward runs. Each thread copies into its own pinned buffer, so its host-to-device copy is async.
        # Grouped encoders run one group at a time (their activations are large: two at once could run a
        # 3B model out of memory); the other call meanwhile only receives its batch.
        self._local = threading.local()
        self._one_group_at_a_time = threading.Lock()
        self.load_s = time.perf_counter() - started
        # Wall clock, for the driver: its embedding phase starts when the first actor can embed.
        self.ready_at = time.time()

    def _embed_batch(self, batch: dict[str, np.ndarray], todo: np.ndarray) -> tuple[np.ndarray, float]:
        """Fixed-size single-vector: the rows to do as one uint8 batch -> (n, dim) float32, and their FLOPs."""
        import torch

        from pipeline.encode.flops import ImageFlops

        vectors = np.zeros((len(batch["path"]), self.encoder.dim), np.float32)
        if not len(todo):
            return vectors, 0.0
        encoded = self.encoder.encode_images(staged(batch["pixels"][todo], self.cuda, self._local))
        vectors[todo] = encoded.to("cpu", torch.float32).numpy()
        height, width, _ = self.encoder.input_spec().output_shape
        return vectors, len(todo) * (ImageFlops(self.encoder)(height, width) or 0.0)

    def _embed_groups(self, batch: dict[str, np.ndarray], todo: np.ndarray) -> tuple[dict[int, np.ndarray],
                                                                                      dict[int, str], Any]:
        """Any other encoder: row -> its vectors ((n_i, dim) multi-vector, (1, dim) single), row -> an error,
        and the timer (its encode_s: the encoder's time, not the wait for the other call's groups)."""
        from pipeline.encode.groups import embed_groups
        from pipeline.encode.stream import EncodeTimer
        from pipeline.records import DecodeResult, Embedded

        results = (DecodeResult(int(row), batch["pixels"][row], None, int(batch["width"][row]),
                                int(batch["height"][row]), str(batch["content_hash"][row])) for row in todo)
        timer, vectors, errors = EncodeTimer(), {}, {}
        with self._one_group_at_a_time:
            started = time.perf_counter()
            for event in embed_groups(results, self.encoder, self.settings.batch_size,
                                      self.settings.max_batch_tokens, lambda slot: None, timer,
                                      pool_factor=self.settings.pool_factor):
                if isinstance(event, Embedded):
                    for item, vector in zip(event.items, event.vectors):
                        vectors[item.key] = vector if self.layout.multivector else np.asarray(vector).reshape(1, -1)
                else:  # out of GPU memory even alone
                    errors[event.key] = event.error
            timer.encode_s = time.perf_counter() - started
        return vectors, errors, timer

    def _grouped_columns(self, batch: dict[str, np.ndarray], todo: np.ndarray) -> dict[str, np.ndarray]:
        vectors, errors, timer = self._embed_groups(batch, todo)
        return grouped_columns(batch, vectors, errors, timer, self.layout, self.extras)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        todo = np.flatnonzero((batch["error"] == "") & ~batch["reused"])
        n = len(batch["path"])
        started = time.perf_counter()
        if self.grouped:
            columns = self._grouped_columns(batch, todo)
        else:
            vectors, flops = self._embed_batch(batch, todo)
            encoded = np.zeros(n, np.bool_)
            encoded[todo] = True
            columns = {"embedding": vectors, "encoded": encoded, "extras": np.array([""] * n, dtype=object),
                       "flops": np.full(n, flops / max(n, 1)), "oom_halvings": np.zeros(n)}
        encode_s = time.perf_counter() - started
        columns.setdefault("encode_s", np.full(n, encode_s / n if n else 0.0))
        out = {name: value for name, value in batch.items() if name != "pixels"}
        mb = 1024 * 1024
        allocated = torch.cuda.max_memory_allocated(self.encoder.device) / mb if self.cuda else 0.0
        reserved = torch.cuda.max_memory_reserved(self.encoder.device) / mb if self.cuda else 0.0
        # Per-actor figures ride along as columns (the batch's share per row): the driver adds them up.
        return {**out, **columns, "worker": np.array([self.label] * n, dtype=object),
                "vram_allocated_mb": np.full(n, allocated), "vram_reserved_mb": np.full(n, reserved),
                "gpu_name": np.array([self.gpu_name] * n, dtype=object), "actor_load_s": np.full(n, self.load_s),
                "compile_s": np.full(n, self.compile.compile_s), "ready_at": np.full(n, self.ready_at),
                "device": np.array([str(self.encoder.device)] * n, dtype=object)}


def staged(pixels: np.ndarray, cuda: bool, local: threading.local) -> Any:
    """The batch as a uint8 tensor; on a GPU in this thread's own pinned buffer, so its host-to-device copy is async."""
    import torch

    if not cuda:
        return torch.from_numpy(np.ascontiguousarray(pixels))
    pinned = getattr(local, "pinned", None)
    if pinned is None or pinned.shape[0] < len(pixels):
        pinned = local.pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    buffer = pinned[:len(pixels)]
    buffer.numpy()[:] = pixels  # a plain memcpy: torch's copy_ would wake its CPU thread pool
    return buffer


def grouped_columns(batch: dict[str, np.ndarray], vectors: dict[int, np.ndarray], errors: dict[int, str], timer: Any,
                    layout: Any, extras_of: Any) -> dict[str, np.ndarray]:
    """The grouped stage's results as the batch's columns: the embedding (float16 per row for multi-vector, as
    stored: half the bytes to ship), new error rows, and each row's extra columns as JSON."""
    from pipeline.records import DecodeResult

    n = len(batch["path"])
    error = batch["error"].copy()
    for row, reason in errors.items():
        error[row] = reason
    extras = np.array([""] * n, dtype=object)
    for row in vectors:
        if extras_of is not None:
            sized = DecodeResult(None, None, None, int(batch["width"][row]), int(batch["height"][row]))
            extras[row] = json.dumps(extras_of(sized), default=_json_default)
    if layout.multivector:
        width = next((v.shape[1] for v in vectors.values()), layout.dim)
        embedding = np.empty(n, dtype=object)
        for row in range(n):
            embedding[row] = vectors[row].astype(np.float16) if row in vectors else np.zeros((0, width), np.float16)
    else:
        embedding = np.zeros((n, layout.dim), np.float32)
        for row, vector in vectors.items():
            embedding[row] = vector[0]
    share = 1 / max(n, 1)  # per-call figures ride along as each row's share: the driver adds them up
    return {"embedding": embedding, "error": error, "extras": extras, "encoded": np.isin(np.arange(n), list(vectors)),
            "flops": np.full(n, timer.flops * share), "oom_halvings": np.full(n, timer.oom_halvings * share),
            "encode_s": np.full(n, timer.encode_s * share)}
