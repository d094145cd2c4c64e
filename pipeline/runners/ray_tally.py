"""The Ray runner's per-node and per-GPU counts, added up from the figures each row brings back from the actors."""

from __future__ import annotations

from typing import Any

import numpy as np


class Tally:
    """Per-node and per-GPU counts for the report."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, float]] = {}
        self.gpus: dict[str, dict[str, Any]] = {}
        self.actor_load_s = 0.0
        self.actor_compile_s = 0.0  # encoder.compile in the actors (part of actor_load_s)
        self.first_ready_at = float("inf")  # wall clock: when the first actor had loaded and warmed up
        self.device = ""

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for node, seconds in zip(batch["decode_node"], batch["decode_s"]):
            entry = self.nodes.setdefault(node, {"decoded": 0, "decode_s": 0.0, "encoded": 0})
            entry["decoded"] += 1
            entry["decode_s"] += float(seconds)
        for index, worker in enumerate(batch["worker"]):
            entry = self.gpus.setdefault(worker, {"images": 0, "encode_s": 0.0, "peak_vram_allocated_mb": 0.0,
                                                  "peak_vram_reserved_mb": 0.0, "gpu_name": batch["gpu_name"][index]})
            entry["images"] += int(batch["encoded"][index])
            entry["encode_s"] += float(batch["encode_s"][index])
            entry["peak_vram_allocated_mb"] = max(entry["peak_vram_allocated_mb"], batch["vram_allocated_mb"][index])
            entry["peak_vram_reserved_mb"] = max(entry["peak_vram_reserved_mb"], batch["vram_reserved_mb"][index])
            self.nodes.setdefault(worker.split("/")[0], {"decoded": 0, "decode_s": 0.0, "encoded": 0})
            self.nodes[worker.split("/")[0]]["encoded"] += int(batch["encoded"][index])
        if len(batch["actor_load_s"]):
            self.actor_load_s = max(self.actor_load_s, float(batch["actor_load_s"].max()))
            self.actor_compile_s = max(self.actor_compile_s, float(batch["compile_s"].max()))
            self.first_ready_at = min(self.first_ready_at, float(batch["ready_at"].min()))
            self.device = str(batch["device"][0])

    def report(self, embed_s: float) -> dict[str, Any]:
        per_s = (lambda n: n / embed_s if embed_s > 0 else 0.0)  # noqa: E731
        nodes = {node: {**entry, "decoded_per_s": per_s(entry["decoded"]), "encoded_per_s": per_s(entry["encoded"])}
                 for node, entry in sorted(self.nodes.items())}
        gpus = {worker: {**entry, "images_per_s": per_s(entry["images"]),
                         "encode_images_per_s": entry["images"] / entry["encode_s"] if entry["encode_s"] else 0.0}
                for worker, entry in sorted(self.gpus.items())}
        return {"per_node": nodes, "per_gpu": gpus}
