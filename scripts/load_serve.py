"""Load generator for `embindex serve`, against the batch pipeline on the same model and files.

    python scripts/load_serve.py --model MODEL_DIR --images DIR --out OUT_DIR \
        [--copies 48] [--concurrency 64] [--bulk 16] [--batch-size 256] [--encoding-formats float,base64]

1. The files: every JPEG/PNG in DIR, or with --copies K, K distinct re-encodes of each JPEG (gpu_report_check's
   corpus; distinct bytes, so neither side can skip a duplicate).
2. The batch pipeline: `python -m pipeline.cli run` over them (Parquet sink only); its report's images/s.
3. The server: `python -m pipeline.cli serve` on 127.0.0.1 (a free port) with the same model and batch size;
   after a warm-up, asyncio + httpx clients keep --concurrency requests of --bulk images in flight until every
   file was sent --passes times, once per encoding format. Images/s = images / (last answer - first send).
Writes OUT_DIR/load_serve.json (and the server's log and /metrics) and prints the ratio serve / pipeline.
The files are read and base64-encoded once, before the clock starts: the clients cost little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".jpg", ".jpeg", ".png")


def corpus_files(images: Path, copies: int, work: Path, limit: int | None) -> tuple[Path, list[Path]]:
    if copies:
        sys.path.insert(0, str(REPO / "scripts"))
        from gpu_report_check import build_corpus

        folder = work / "corpus"
        shutil.rmtree(folder, ignore_errors=True)
        build_corpus(images, copies, folder)
    else:
        folder = images
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    if limit is not None and len(files) > limit:  # the pipeline gets exactly these files too
        files = files[:limit]
        folder = work / "subset"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index, path in enumerate(files):
            shutil.copy(path, folder / f"{index:06d}{path.suffix}")
        files = sorted(folder.iterdir())
    return folder, files


def pipeline_run(model: str, folder: Path, work: Path, batch_size: int, device: str) -> dict:
    config = work / "pipeline.yaml"
    shutil.rmtree(work / "pipeline-embeddings", ignore_errors=True)
    shutil.rmtree(work / "pipeline-runs", ignore_errors=True)
    config.write_text(yaml.safe_dump({
        "input": {"root": str(folder)},
        "encoder": {"model": model, "device": device, "batch_size": batch_size},
        "output": {"lancedb": None, "parquet": {"dir": str(work / "pipeline-embeddings")}},
        "run": {"report_dir": str(work / "pipeline-runs"), "shard_size": 8192},
    }))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"embindex run failed:\n{done.stderr[-3000:]}")
    report = json.loads(sorted((work / "pipeline-runs").glob("*/report.json"))[-1].read_text())
    keys = ("images_embedded", "images_per_s", "embed_s", "decode_workers", "device", "gpu_name", "dtype",
            "gpu_busy_pct", "stage_s")
    return {k: report.get(k) for k in keys}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, work: Path, batch_size: int, device: str, log: Path) -> tuple[subprocess.Popen, str]:
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"model": model, "device": device, "batch_size": batch_size},
                                      "serve": {"model_name": "load-test"}}))
    port = free_port()
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(config), "--port", str(port),
                                    "--quiet"], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, log, 600)
    return process, url


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Until the server's /v1/health/ready is 200; SystemExit with its log's end if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"embindex serve exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"embindex serve did not get ready in {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def request_bodies(files: list[Path], bulk: int, encoding_format: str) -> list[tuple[bytes, int]]:
    uris = [f"data:image/{'png' if f.suffix.lower() == '.png' else 'jpeg'};base64,"
            f"{base64.b64encode(f.read_bytes()).decode()}" for f in files]
    bodies = []
    for start in range(0, len(uris), bulk):
        chunk = uris[start:start + bulk]
        payload = {"model": "load-test", "input": chunk, "request_type": "bulk_image",
                   "encoding_format": encoding_format}
        bodies.append((json.dumps(payload).encode(), len(chunk)))
    return bodies


async def load(url: str, bodies: list[tuple[bytes, int]], concurrency: int, passes: int) -> dict:
    """`concurrency` clients, each sending the next body until every body was sent `passes` times."""
    order = [body for _ in range(passes) for body in bodies]
    next_index = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    images = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def client_loop() -> None:
            nonlocal next_index, images
            while next_index < len(order):
                body, n_images = order[next_index]
                next_index += 1
                sent = time.perf_counter()
                try:
                    response = await client.post("/v1/embeddings", content=body,
                                                 headers={"Content-Type": "application/json"})
                    status = str(response.status_code)
                    if response.status_code == 200 and len(response.json()["data"]) != n_images:
                        status = "wrong vector count"
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - sent)
                    images += n_images
                else:
                    errors[status] = errors.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None

    return {"requests": len(order), "errors": errors, "images": images, "wall_s": wall_s,
            "images_per_s": images / wall_s, "requests_per_s": len(latencies) / wall_s,
            "latency_ms": {"mean": statistics.fmean(latencies) * 1000 if latencies else None,
                           "p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)}}


def batch_stats(metrics: str) -> dict:
    """Mean rows per forward pass, from the server's Prometheus histogram."""
    values = {}
    for line in metrics.splitlines():
        for name in ("embindex_batch_size_sum", "embindex_batch_size_count"):
            if line.startswith(f'{name}{{kind="image"}}'):
                values[name] = float(line.split()[-1])
    count = values.get("embindex_batch_size_count", 0.0)
    return {"forward_passes": count, "mean_batch": values.get("embindex_batch_size_sum", 0.0) / count if count else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/embindex-load"))
    parser.add_argument("--copies", type=int, default=0, help="distinct re-encodes per JPEG (0: the files as they are)")
    parser.add_argument("--limit", type=int, help="use only the first N files")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bulk", type=int, default=16, help="images per request")
    parser.add_argument("--passes", type=int, default=1, help="times each file is sent per encoding format")
    parser.add_argument("--batch-size", type=int, default=256, help="encoder.batch_size of both sides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoding-formats", default="float,base64")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve())

    folder, files = corpus_files(args.images.resolve(), args.copies, args.work, args.limit)
    print(f"files: {len(files)} in {folder}", flush=True)
    result: dict = {"model": model, "files": len(files), "concurrency": args.concurrency, "bulk": args.bulk,
                    "batch_size": args.batch_size, "passes": args.passes}
    if not args.skip_pipeline:
        result["pipeline"] = pipeline_run(model, folder, args.work, args.batch_size, args.device)
        print("pipeline:", json.dumps(result["pipeline"]), flush=True)

    try:  # uvloop where installed: a cheaper client loop
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    server, url = start_server(model, args.work, args.batch_size, args.device, args.out / "serve.log")
    try:
        result["serve"] = {}
        for encoding_format in args.encoding_formats.split(","):
            bodies = request_bodies(files, args.bulk, encoding_format)
            asyncio.run(load(url, bodies[:max(1, 2 * args.concurrency // args.bulk)], args.concurrency, 1))  # warm
            run = asyncio.run(load(url, bodies, args.concurrency, args.passes))
            result["serve"][encoding_format] = run
            print(f"serve ({encoding_format}):", json.dumps(run), flush=True)
        metrics = httpx.get(f"{url}/metrics").text
        (args.out / "serve_metrics.txt").write_text(metrics)
        result["serve_batches"] = batch_stats(metrics)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    if "pipeline" in result:
        pipeline_rate = result["pipeline"]["images_per_s"]
        result["ratio"] = {fmt: run["images_per_s"] / pipeline_rate for fmt, run in result["serve"].items()}
    (args.out / "load_serve.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    for fmt, ratio in result.get("ratio", {}).items():
        print(f"serve ({fmt}) / pipeline images/s: {ratio:.2f} ({'>=' if ratio >= 0.5 else 'below'} 0.5)")


if __name__ == "__main__":
    main()
