"""Run statistics and memory probes, written as report.json and report.md."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 0.1
# memory_full_info reads /proc/PID/smaps_rollup, which walks the page tables: measured 19 ms (median, 66 ms max)
# for a busy main process (600 MB RSS, torch loaded) and 1 ms a decode worker, against 0.01 ms for memory_info.
# Beside 16 workers that is ~35 ms a read, a third of a core at 10 Hz; every 0.5 s it is ~7 %.
FULL_EVERY_S = 0.5
CHILDREN_EVERY_S = 2.0
SMOKE_TEST_LINE = "**SMOKE TEST: random-weight model, the embeddings are meaningless.**"
MB = 1024 * 1024


def read_memory(process: psutil.Process) -> tuple[int, int, int | None] | None:
    """(rss, uss, pss) of one process in bytes; pss is None off Linux. Where smaps is refused (AccessDenied)
    the uss is the plain RSS (an upper bound); None once the process has exited."""
    try:
        full = process.memory_full_info()
        return full.rss, full.uss, getattr(full, "pss", None)
    except psutil.Error:
        pass
    try:
        rss = process.memory_info().rss
    except psutil.Error:
        return None
    return rss, rss, None


class MemoryProbe:
    """Samples host memory (this process plus its children) and NVML GPU memory in a thread; keeps the peaks.

    The host figure counts what the tree really uses: the main process's RSS plus each worker's unique
    memory (USS). Summing RSS counts the pages they share (torch's and the libraries' code, the decode
    regions in shared memory) once a process: a ColNomic run reported 5.1-5.5 GB that way. RSS is read every
    SAMPLE_EVERY_S; USS and PSS every FULL_EVERY_S, and in between a worker's USS is its RSS less the shared
    part (RSS - USS) its last full read found."""

    def __init__(self, device: Any = None) -> None:
        gpu_index = (device.index or 0) if getattr(device, "type", None) == "cuda" else None
        if gpu_index is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        self.peak_host_rss_mb = 0.0  # main RSS + workers' USS
        self.peak_host_pss_mb: float | None = None  # sum of PSS over the tree; None where there is no PSS
        self.peak_main_rss_mb = 0.0
        self.peak_workers_rss_mb = 0.0  # the workers' plain RSS summed, shared pages and all
        self.peak_nvml_used_mb: float | None = None
        self._busy_samples: list[int] = []  # NVML utilisation: % of the sample period a kernel ran
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._children_cache: list[psutil.Process] = []
        self._children_at = -1e9
        self._full_at = -1e9
        self._shared_bytes: dict[int, int] = {}  # worker pid -> RSS - USS at its last full read
        self._nvml_handle = self._open_nvml(gpu_index) if gpu_index is not None else None
        self._thread = threading.Thread(target=self._loop, name="memory-probe", daemon=True)

    @staticmethod
    def _open_nvml(gpu_index: int) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        except Exception:  # no driver, no library: NVML is optional
            return None

    def _children(self) -> list[psutil.Process]:
        """The decode workers, re-listed every CHILDREN_EVERY_S: listing scans all of /proc
        (measured: half a core at 10 Hz beside 16 workers), reading one RSS is one small file."""
        now = time.monotonic()
        if now - self._children_at > CHILDREN_EVERY_S:
            self._children_cache = self._process.children(recursive=True)
            self._children_at = now
        return self._children_cache

    def _worker_memory(self, child: psutil.Process, full: bool) -> tuple[int, int, int | None] | None:
        """(rss, uss, pss) of one worker; between full reads uss is estimated and pss is None.
        A worker not read in full yet is read in full now (1 ms), not counted at its whole RSS."""
        if full or child.pid not in self._shared_bytes:
            reading = read_memory(child)
            if reading is not None:
                self._shared_bytes[child.pid] = reading[0] - reading[1]
            return reading
        try:
            rss = child.memory_info().rss
        except psutil.Error:
            return None
        return rss, max(0, rss - self._shared_bytes[child.pid]), None

    def sample(self, full: bool = True) -> None:
        """Read the tree's memory once and raise the peaks; full=False reads RSS only (see FULL_EVERY_S)."""
        if full:
            main = read_memory(self._process)
            if main is None:
                return
            main_rss, main_pss = main[0], main[2]
            self._full_at = time.monotonic()
        else:
            main_rss, main_pss = self._process.memory_info().rss, None
        workers_rss = workers_uss = workers_pss = 0
        for child in self._children():
            reading = self._worker_memory(child, full)
            if reading is None:  # exited since the listing
                continue
            rss, uss, pss = reading
            workers_rss += rss
            workers_uss += uss
            workers_pss += rss if pss is None else pss  # refused smaps: its RSS, an upper bound
        self.peak_main_rss_mb = max(self.peak_main_rss_mb, main_rss / MB)
        self.peak_workers_rss_mb = max(self.peak_workers_rss_mb, workers_rss / MB)
        self.peak_host_rss_mb = max(self.peak_host_rss_mb, (main_rss + workers_uss) / MB)
        if main_pss is not None:
            self.peak_host_pss_mb = max(self.peak_host_pss_mb or 0.0, (main_pss + workers_pss) / MB)
        if self._nvml_handle is not None:
            import pynvml

            try:  # v2 leaves out driver-reserved memory, as nvidia-smi does
                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle, version=pynvml.nvmlMemory_v2)
            except (AttributeError, TypeError, pynvml.NVMLError):
                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            self.peak_nvml_used_mb = max(self.peak_nvml_used_mb or 0.0, info.used / MB)
            self._busy_samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu)

    @property
    def gpu_busy_pct(self) -> float | None:
        """Mean GPU utilisation over the run (NVML), None without NVML."""
        return sum(self._busy_samples) / len(self._busy_samples) if self._busy_samples else None

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.sample(full=time.monotonic() - self._full_at >= FULL_EVERY_S)
            except psutil.Error:
                pass

    def __enter__(self) -> MemoryProbe:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def gpu_memory_peaks(device: Any) -> dict[str, Any]:
    """torch's peak allocated/reserved memory since the probe reset them (zero off CUDA)."""
    if getattr(device, "type", None) != "cuda":
        return {"gpu_name": None, "peak_vram_allocated_mb": 0.0, "peak_vram_reserved_mb": 0.0}
    import torch

    mb = 1024 * 1024
    return {
        "gpu_name": torch.cuda.get_device_name(device),
        "peak_vram_allocated_mb": torch.cuda.max_memory_allocated(device) / mb,
        "peak_vram_reserved_mb": torch.cuda.max_memory_reserved(device) / mb,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, show: bool) -> Any:
    """tqdm on a terminal; nothing in cron logs."""
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)


def _fixed_cost_lines(report: dict[str, Any]) -> list[str]:
    """Start-up and finish around the embedding phase, the compile, and the model FLOPs achieved (when known)."""
    lines = []
    if report.get("startup_s") is not None:
        compile_note = report.get("compile") or {}
        compiled = f"; compiled in {report['compile_s']:.1f} s" if compile_note.get("enabled") else ""
        imports = report.get("imports_s", 0.0)
        lines.append(f"- start-up {report['startup_s']:.1f} s (imports {imports:.1f} s{compiled}), "
                     f"finish {report.get('finish_s', 0.0):.1f} s")
    if report.get("achieved_tflops") is not None:
        lines.append(f"- {report['flops_per_image'] / 1e9:.3g} GFLOP per image: {report['achieved_tflops']:.3g} "
                     "TFLOP/s achieved over the embedding phase")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    errors = report.get("errors") or {}
    stage = report.get("stage_s", {})
    lines = [
        f"# embindex run {report['run_id']}",
        "",
        *([SMOKE_TEST_LINE, ""] if report.get("smoke_test") else []),
        f"- model: `{report['model']}` on {report['device']} ({report.get('gpu_name') or 'no GPU'}), "
        f"batch size {report['batch_size']}",
        f"- started {report['started_at']}, finished {report['finished_at']}, wall {report['wall_s']:.1f} s "
        f"({_model_time(report)}, embedding {report['embed_s']:.1f} s)",
        f"- files: {report['files_scanned']} scanned, {report['files_new']} new, {report['files_changed']} changed, "
        f"{report['files_deleted']} deleted, {report['files_unchanged']} unchanged",
        f"- embedded {report['images_embedded']} images at {report['images_per_s']:.1f} images/s; "
        f"{sum(errors.values())} errors",
        *([f"- {report['vectors_per_image']:.1f} vectors and {report['embedding_bytes_per_image'] / 1024:.1f} KiB "
           "of embeddings per image"] if report.get("vectors_per_image") else []),
        *_fixed_cost_lines(report),
        "",
        "| Batch Size | Peak VRAM (allocated) | Peak VRAM (reserved) | Peak host RSS | Processing Time | Images/s |",
        "|---|---|---|---|---|---|",
        f"| {report['batch_size']} | {report['peak_vram_allocated_mb']:.0f} MB "
        f"| {report['peak_vram_reserved_mb']:.0f} MB "
        f"| {report['peak_host_rss_mb']:.0f} MB | {report['embed_s']:.1f} s | {report['images_per_s']:.1f} |",
        "",
        "| Stage | Seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in stage.items()],
    ]
    if errors:
        lines += ["", "| Error | Files |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(errors.items())]]
    if report.get("ray"):
        lines += ray_tables(report["ray"])
    lines += ["", f"Output: {report['output_rows']} rows, {report['storage_bytes'] / 1e6:.1f} MB on disk."]
    return "\n".join(lines) + "\n"


def _model_time(report: dict[str, Any]) -> str:
    if report.get("model_loaded", True):
        return f"model load {report['model_load_s']:.1f} s"
    return f"model described, not loaded: {report.get('describe_s', 0.0):.1f} s"


def ray_tables(ray: dict[str, Any]) -> list[str]:
    """Per-node and per-GPU throughput of a Ray run (images per second of the embedding phase)."""
    lines = ["", f"Ray: {ray['nodes']} node(s), {ray['embed_actors']} embed actor(s), {ray['cpus']:g} CPUs, "
                 f"{ray['gpus']:g} GPUs ({ray['address']}); the first actor ready {ray['actor_start_s']:.1f} s "
                 f"after the pipeline's start ({ray['actor_load_s']:.1f} s of it loading and warming up)", "",
             "| Node | Decoded | Decoded/s | Decode CPU s | Encoded | Encoded/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {node} | {n['decoded']} | {n['decoded_per_s']:.1f} | {n['decode_s']:.1f} | {n['encoded']} "
              f"| {n['encoded_per_s']:.1f} |" for node, n in ray["per_node"].items()]
    lines += ["", "| Actor (node/GPU) | Images | Images/s | Busy images/s | Peak VRAM (allocated) |",
              "|---|---|---|---|---|"]
    lines += [f"| {actor} | {g['images']} | {g['images_per_s']:.1f} | {g['encode_images_per_s']:.1f} "
              f"| {g['peak_vram_allocated_mb']:.0f} MB |" for actor, g in ray["per_gpu"].items()]
    return lines


def write_report(report_dir: str, report: dict[str, Any]) -> Path:
    folder = Path(report_dir) / report["run_id"]
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"report.json": json.dumps(report, indent=2, default=str), "report.md": format_markdown(report)}
    for name, text in texts.items():
        temporary = folder / (name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, folder / name)
    return folder


def latest_report(report_dir: str) -> Path | None:
    """The newest run's folder (run ids sort by time)."""
    folders = sorted(p for p in Path(report_dir).glob("*") if (p / "report.json").exists())
    return folders[-1] if folders else None


def elapsed(since: float) -> float:
    return time.perf_counter() - since
