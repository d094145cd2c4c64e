"""`embindex serve` under hostile load (issue 16): concurrent ~60 MB image requests and 1 MB texts, while the server's
memory and /v1/health/live latency are sampled.

    python scripts/serve_stress.py [--out FILE.json] [--models DIR] [--images DIR] [--image-requests 16]
        [--request-mb 60] [--text-requests 4] [--long-text-requests 4] [--set serve.KEY=VALUE ...] [--repo DIR]

1. The tiny CLIP (scripts/make_tiny_models.py into a temporary folder unless --models).
2. `python -m pipeline.cli serve` from --repo (default: this checkout) on 127.0.0.1, a free port, serve defaults
   unless --set; decode processes: auto (the usable cores).
3. The bodies, built before the clock: the photos of --images upscaled to 2560 px JPEGs (quality 95, ~1 MB of
   base64 each), as many a request as make --request-mb; four 1 MB texts a request (--text-requests); 64 texts of
   16,384 characters a request (--long-text-requests: the largest text request a default server takes).
4. Every request at once, a thread each; a 429 is retried after its Retry-After until --deadline-s. Throughout,
   the server's RSS with its child processes (psutil, every 50 ms) and GET /v1/health/live back to back (a new
   connection each) from a process of its own, so the load client's GIL is not in the latency.
Prints and writes JSON: idle, max and after RSS, live latency (max, p99, p50), every attempt's status, each
request's final status, and the bound `idle + 2 x max_inflight_bytes + 150 MB a decode process` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_serve import free_port, wait_until_ready  # noqa: E402 - a sibling script

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "images"
MB = 1_000_000
DECODE_PROCESS_MB = 150  # one decode process: Python, PIL and NumPy (~60 MB) and a task of 4 images being decoded
WORDS = ("the a dog cat red car beach photo of with on in and under blue green small large old new running "
         "sitting street house tree river mountain city night day").split()


def photo_uris(folder: Path, count: int, side: int = 2560) -> list[bytes]:
    """`count` JPEG data URIs of real photos upscaled to `side` px (quality 95: ~1 MB of base64 each)."""
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    uris = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        uris.append(b"data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()))
    return uris


def image_bodies(uris: list[bytes], n_requests: int, request_mb: float) -> list[bytes]:
    """n_requests bodies of about request_mb each (at most 64 images), cycling through the photos."""
    per_request = min(64, max(1, round(request_mb * MB / (sum(map(len, uris)) / len(uris)))))
    bodies = []
    for index in range(n_requests):
        chosen = [uris[(index * per_request + k) % len(uris)] for k in range(per_request)]
        bodies.append(b'{"request_type": "bulk_image", "input": ["' + b'", "'.join(chosen) + b'"]}')
    return bodies


def text_bodies(n_requests: int, n_texts: int, chars: int) -> list[bytes]:
    rng = random.Random(16)
    bodies = []
    for _ in range(n_requests):
        texts = []
        for _ in range(n_texts):
            words = " ".join(rng.choice(WORDS) for _ in range(chars // 4 + 1))
            texts.append(words[:chars])
        bodies.append(json.dumps({"input": texts, "request_type": "bulk_text"}).encode())
    return bodies


def start_server(repo: Path, config: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(config), "--port", str(port),
                                    "--quiet"], cwd=repo, stdout=log_file, stderr=subprocess.STDOUT)
    wait_until_ready(process, f"http://127.0.0.1:{port}", log, 300)
    return process


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """RSS of the server process, and of its children (decode processes, multiprocessing's tracker)."""
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return process.memory_info().rss, children


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[int, int]]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        samples.append(tree_rss(process))
        stop.wait(0.05)


def live_once(port: int) -> float:
    """One GET /v1/health/live on a new connection, over a raw socket (an HTTP client's own set-up, e.g. httpx's SSL
    context, took tens of ms of CPU on a loaded machine); its seconds, or 30.0 when it failed."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    except OSError:
        return 30.0
    return time.perf_counter() - started if reply.startswith(b"HTTP/1.1 200") else 30.0


def probe_live(port: int, stop: mp.synchronize.Event, out: mp.Queue) -> None:
    """live_once back to back (10 ms apart) until stopped; puts [(seconds since start, latency)]."""
    origin, latencies = time.monotonic(), []
    while not stop.is_set():
        at = time.monotonic() - origin
        latencies.append((round(at, 3), live_once(port)))
        stop.wait(0.01)
    out.put(latencies)


def send(url: str, body: bytes, deadline: float) -> list[int]:
    """POST body until it is not refused as busy (429, after its Retry-After) or the deadline; every status."""
    statuses = []
    with httpx.Client(timeout=600) as client:
        while True:
            try:
                response = client.post(f"{url}/v1/embeddings", content=body,
                                       headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)
                return statuses
            statuses.append(response.status_code)
            if response.status_code != 429 or time.monotonic() > deadline:
                return statuses
            time.sleep(float(response.headers.get("retry-after", "1")))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_load(url: str, pid: int, groups: dict[str, list[bytes]], deadline_s: float) -> dict:
    """Every request at once while RSS and live latency are sampled."""
    stop_rss, samples = threading.Event(), []
    rss_thread = threading.Thread(target=sample_rss, args=(pid, stop_rss, samples), daemon=True)
    context = mp.get_context("spawn")
    stop_live, latencies_out = context.Event(), context.Queue()
    prober = context.Process(target=probe_live, args=(int(url.rsplit(":", 1)[1]), stop_live, latencies_out),
                             daemon=True)
    rss_thread.start()
    prober.start()
    jobs = [(kind, body) for kind, bodies in groups.items() for body in bodies]
    started = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [(kind, pool.submit(send, url, body, started + deadline_s)) for kind, body in jobs]
        results = [(kind, future.result()) for kind, future in futures]
    wall_s = time.monotonic() - started
    time.sleep(2)  # RSS and live a little after the load
    stop_live.set()
    latencies = latencies_out.get(timeout=120)
    prober.join(30)
    stop_rss.set()
    rss_thread.join()
    return {"wall_s": round(wall_s, 1), "samples": samples, "latencies": latencies, "results": results}


def summarise(load: dict, idle_rss: int, inflight_bytes: int, workers: int) -> dict:
    statuses: dict[str, Counter] = {}
    finals: dict[str, Counter] = {}
    for kind, attempts in load["results"]:
        statuses.setdefault(kind, Counter()).update(str(s) for s in attempts)
        finals.setdefault(kind, Counter())[str(attempts[-1])] += 1
    rss = [main + children for main, children in load["samples"]]
    latencies = [latency for _, latency in load["latencies"]]
    bound_mb = idle_rss / MB + 2 * inflight_bytes / MB + DECODE_PROCESS_MB * workers
    return {
        "rss_mb": {"idle": round(idle_rss / MB), "max": round(max(rss) / MB), "after": round(rss[-1] / MB),
                   "max_server_process": round(max(main for main, _ in load["samples"]) / MB),
                   "max_children": round(max(children for _, children in load["samples"]) / MB),
                   "bound": round(bound_mb), "within_bound": max(rss) / MB <= bound_mb, "samples": len(rss)},
        "live_latency_s": {"max": round(max(latencies), 3), "p99": round(percentile(latencies, 0.99), 3),
                           "p50": round(percentile(latencies, 0.5), 4), "probes": len(latencies),
                           "over_0_5_s": sum(latency >= 0.5 for latency in latencies)},
        "attempt_statuses": {kind: dict(counts) for kind, counts in statuses.items()},
        "final_statuses": {kind: dict(counts) for kind, counts in finals.items()},
        "wall_s": load["wall_s"],
        "slowest_live": sorted(load["latencies"], key=lambda probe: -probe[1])[:10],  # (s into the load, latency)
    }


def write_config(folder: Path, model: Path, overrides: list[str]) -> tuple[Path, dict]:
    serve: dict = {}
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        serve[key.removeprefix("serve.")] = yaml.safe_load(value)
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"model": str(model), "device": "cpu"}, "serve": serve}))
    return config, serve


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", type=Path, help="make_tiny_models.py's folder (default: made here)")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--image-requests", type=int, default=16)
    parser.add_argument("--request-mb", type=float, default=60)
    parser.add_argument("--text-requests", type=int, default=4, help="requests of four 1 MB texts")
    parser.add_argument("--long-text-requests", type=int, default=4, help="requests of 64 texts of 16,384 chars")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server runs")
    parser.add_argument("--deadline-s", type=float, default=300, help="stop retrying 429s after this")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-stress-"))
    models = args.models
    if models is None:
        models = work / "models"
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(models)], check=True,
                       capture_output=True)
    uris = photo_uris(args.images, 400)
    groups = {"image_60mb": image_bodies(uris, args.image_requests, args.request_mb),
              "text_4x1mb": text_bodies(args.text_requests, 4, MB),
              "text_64x16k": text_bodies(args.long_text_requests, 64, 16384)}
    config, serve = write_config(work, models / "clip", args.overrides)
    port = free_port()
    server = start_server(args.repo, config, port, work / "serve.log")
    try:
        idle_rss = sum(tree_rss(psutil.Process(server.pid)))
        load = run_load(f"http://127.0.0.1:{port}", server.pid, {k: v for k, v in groups.items() if v},
                        args.deadline_s)
    finally:
        server.terminate()
        server.wait(30)
    body_mb = {kind: round(sum(map(len, bodies)) / len(bodies) / MB, 1) for kind, bodies in groups.items() if bodies}
    inflight = serve.get("max_inflight_bytes") or 4 * serve.get("max_body_bytes", 64 * 2**20)
    workers = len(os.sched_getaffinity(0)) if serve.get("decode_workers", "auto") == "auto" else serve["decode_workers"]
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "repo": str(args.repo), "serve": serve, "max_inflight_bytes": inflight, "decode_processes": workers,
              "requests": {kind: {"count": len(bodies), "body_mb": body_mb[kind]} for kind, bodies in groups.items()
                           if bodies},
              **summarise(load, idle_rss, inflight, workers), "server_log": str(work / "serve.log")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
