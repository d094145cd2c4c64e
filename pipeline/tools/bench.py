"""Batch-size sweep: the real pipeline once per batch size into scratch sinks; a table, JSON and a plot."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.encode.layout import warm_up, wrap_encoder
from pipeline.encode.models.load import load_encoder
from pipeline.runners.local import run_index

log = logging.getLogger(__name__)

TABLE_HEADER = ("| Batch Size | Peak VRAM | Processing Time | Images/s | Command | Decode s | Encode s | Write s "
                "| GPU busy | Achieved TFLOP/s |")


def _scratch_config(config: Config, batch_size: int, scratch: Path) -> Config:
    """The user's config aimed at a scratch folder: their index is never touched."""
    trial = config.model_copy(deep=True)
    trial.encoder.batch_size = batch_size
    if trial.output.lancedb is not None:
        trial.output.lancedb.uri = str(scratch / "index")
    if trial.output.parquet is not None:
        trial.output.parquet.dir = str(scratch / "embeddings")
    trial.run.report_dir = str(scratch / "runs")
    return trial


def _out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def sweep(config: Config, batch_sizes: list[int], limit: int | None, out_dir: Path) -> list[dict[str, Any]]:
    """One row per batch size; a batch size that runs out of memory is a row saying so."""
    import torch

    encoder = wrap_encoder(load_encoder(config.encoder), config.encoder)  # once: every size, the same weights
    warm_up(encoder)
    rows = []
    for batch_size in batch_sizes:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the last batch size's cached blocks would count as this one's peak
        scratch = out_dir / f"scratch-bs{batch_size}"
        shutil.rmtree(scratch, ignore_errors=True)
        command = f"embindex run {config.config_path} --set encoder.batch_size={batch_size}"
        try:
            report = run_index(_scratch_config(config, batch_size, scratch), progress=False, encoder=encoder,
                               limit=limit).report
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _out_of_memory(exc):
                raise
            reason = str(exc).splitlines()[0]
            log.warning("batch size %d: %s", batch_size, reason)
            rows.append({"batch_size": batch_size, "out_of_memory": reason, "command": command})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append({
            "batch_size": batch_size,
            "images": report["images_embedded"],
            "peak_vram_allocated_mb": report["peak_vram_allocated_mb"],
            "peak_vram_reserved_mb": report["peak_vram_reserved_mb"],
            "peak_vram_nvml_mb": report["peak_vram_nvml_mb"],
            "peak_host_rss_mb": report["peak_host_rss_mb"],
            "processing_s": report["embed_s"],  # the embedding phase, as images_per_s
            "images_per_s": report["images_per_s"],
            "stage_s": report["stage_s"],
            "decode_wait_s": report["decode_wait_s"],
            "gpu_busy_pct": report.get("gpu_busy_pct"),
            "oom_halvings": report.get("oom_halvings", 0),  # grouped encoders split a batch that did not fit
            "vectors_per_image": report.get("vectors_per_image"),
            "achieved_tflops": report.get("achieved_tflops"),  # None: an encoder encode/flops.py does not count
            "device": report["device"],
            "gpu_name": report["gpu_name"],
            "command": command,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "out_of_memory" in row:
            lines.append(f"| {row['batch_size']} | out of memory: {row['out_of_memory']} | — | — "
                         f"| `{row['command']}` | — | — | — | — | — |")
            continue
        vram = row["peak_vram_nvml_mb"] or row["peak_vram_reserved_mb"]
        busy = "—" if row["gpu_busy_pct"] is None else f"{row['gpu_busy_pct']:.0f} %"
        stage = row["stage_s"]
        tflops = row.get("achieved_tflops")
        achieved = "—" if tflops is None else f"{tflops:.3g}"
        lines.append(f"| {row['batch_size']} | {vram / 1024:.2f} GB | {row['processing_s']:.1f} s "
                     f"| {row['images_per_s']:.1f} | `{row['command']}` | {stage['decode']:.1f} | "
                     f"{stage['encode']:.1f} | {stage['write']:.1f} | {busy} | {achieved} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, model: str = "") -> bool:
    """images/s and peak VRAM against batch size; False (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'embindex[plot]'): bench.png skipped")
        return False
    done = [r for r in rows if "out_of_memory" not in r]
    sizes = [r["batch_size"] for r in done]
    figure, speed_axis = plt.subplots(figsize=(7, 4))
    speed_axis.plot(sizes, [r["images_per_s"] for r in done], "o-", color="tab:blue")
    speed_axis.set_xscale("log", base=2)
    speed_axis.set_xlabel("batch size")
    speed_axis.set_ylabel("images/s", color="tab:blue")
    memory_axis = speed_axis.twinx()
    memory_axis.plot(sizes, [(r["peak_vram_nvml_mb"] or r["peak_vram_reserved_mb"]) / 1024 for r in done], "s--",
                     color="tab:red")
    memory_axis.set_ylabel("peak VRAM (GB)", color="tab:red")
    where = (done[0]["gpu_name"] or done[0]["device"]) if done else "no batch size completed"
    speed_axis.set_title(f"{Path(model).name} on {where}" if model else where)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_outputs(rows: list[dict[str, Any]], config: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"model": config.encoder.model, "rows": rows}, indent=2))
    title = f"# embindex bench: {config.encoder.model}\n\n"
    (out_dir / "bench.md").write_text(title + format_table(rows))
    plot(rows, out_dir / "bench.png", config.encoder.model)
