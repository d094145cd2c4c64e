#!/usr/bin/env bash
# AIPerf 0.13 against `embindex serve` on 127.0.0.1: --endpoint-type nim_embeddings, images only, concurrency 8,
# 240 requests of 4 images each. AIPerf exits 0 even when requests fail: the run is judged by error_request_count
# and was_cancelled in profile_export_aiperf.json (this script exits 1 unless both are zero/false).
#
#   scripts/aiperf_serve.sh MODEL_DIR OUT_DIR [IMAGE_SOURCE]
#
# MODEL_DIR: a local model folder (its tokenizer files also serve as AIPerf's tokenizer, offline).
# IMAGE_SOURCE: a folder of images AIPerf re-encodes as 640x480 JPEGs (default: AIPerf's random noise images).
# Environment: AIPERF_VENV (default /tmp/aiperf-venv; made with `pip install aiperf==0.13.0` if missing: AIPerf
# never goes into the project's environment), PYTHON (the project's python, default python3), DEVICE (auto),
# CONCURRENCY (8), REQUESTS (240), BULK (4).
set -euo pipefail
model=$(realpath "$1") out=$(realpath -m "$2") source=${3:-noise}
venv=${AIPERF_VENV:-/tmp/aiperf-venv} python=${PYTHON:-python3}
concurrency=${CONCURRENCY:-8} requests=${REQUESTS:-240} bulk=${BULK:-4}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ ! -x "$venv/bin/aiperf" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q aiperf==0.13.0
fi

work=$(mktemp -d)
name=$(basename "$model")
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
cat > "$work/serve.yaml" <<YAML
encoder: {model: $model, device: ${DEVICE:-auto}}
serve: {model_name: $name}
YAML
"$python" -m pipeline.cli serve "$work/serve.yaml" --port "$port" --quiet > "$out/serve.log" 2>&1 &
server=$!
trap 'status=$?; kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"; exit $status' EXIT
for _ in $(seq 600); do
  curl -sf "$url/v1/health/ready" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$out/serve.log"; exit 1; }
  sleep 0.2
done
curl -sf "$url/v1/health/ready" > /dev/null || { echo "embindex serve did not get ready" >&2; exit 1; }

# AIPerf 0.13 loads a Hugging Face tokenizer named after --tokenizer: offline, it must be a hub cache entry.
# (--use-server-token-count below keeps it from tokenizing every data URI while it post-processes records:
# without it, 240 requests of base64 images took over 15 minutes of one core after the run.)
snapshot="$work/hf/hub/models--local--tok/snapshots/0000000000000000000000000000000000000000"
mkdir -p "$snapshot" "$work/hf/hub/models--local--tok/refs"
cp "$model"/tokenizer* "$model"/config.json "$snapshot"/ 2>/dev/null || true
cp "$model"/*.txt "$model"/*.model "$snapshot"/ 2>/dev/null || true
echo -n 0000000000000000000000000000000000000000 > "$work/hf/hub/models--local--tok/refs/main"

image_source=()
[ "$source" != noise ] && image_source=(--image-source "$(realpath "$source")")
started=$(date +%s.%N)
HF_HOME="$work/hf" HF_HUB_OFFLINE=1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
  "$venv/bin/aiperf" profile --model "$name" --tokenizer local/tok --url "$url" \
  --endpoint-type nim_embeddings --synthetic-input-tokens-mean 0 \
  --image-batch-size "$bulk" --image-width-mean 640 --image-height-mean 480 --image-format jpeg "${image_source[@]}" \
  --concurrency "$concurrency" --request-count "$requests" --warmup-request-count "$concurrency" \
  --use-server-token-count --random-seed 0 --ui-type none --artifact-dir "$out/aiperf" > "$out/aiperf.log" 2>&1 || {
    tail -40 "$out/aiperf.log"; exit 1; }
wall_s=$(echo "$(date +%s.%N) - $started" | bc)
curl -sf "$url/metrics" > "$out/server_metrics.txt"

"$python" - "$out" "$wall_s" "$concurrency" "$requests" "$bulk" <<'PY'
import json
import sys
from pathlib import Path

out, wall_s, concurrency, requests, bulk = Path(sys.argv[1]), float(sys.argv[2]), *map(int, sys.argv[3:6])
export = json.loads(next((out / "aiperf").rglob("profile_export_aiperf.json")).read_text())


def stat(name: str, key: str = "avg") -> float | None:
    value = export.get(name)
    return value.get(key) if isinstance(value, dict) else value


errors = int(stat("error_request_count") or 0)  # AIPerf leaves the key out when no request failed
cancelled = bool(export.get("was_cancelled", False))
completed = int(stat("completed_request_count") or 0)
summary = {
    "aiperf_version": export.get("aiperf_version"), "requests": stat("request_count"),
    "completed_request_count": completed, "error_request_count": errors, "was_cancelled": cancelled,
    "error_summary": export.get("error_summary"), "benchmark_duration_s": stat("benchmark_duration"),
    "concurrency": concurrency, "images_per_request": bulk,
    "request_throughput_per_s": stat("request_throughput"),
    "images_per_s": (stat("request_throughput") or 0) * bulk,
    "request_latency_ms": {k: stat("request_latency", k) for k in ("avg", "p50", "p90", "p99")},
    "aiperf_wall_s": wall_s,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(0 if errors == 0 and not cancelled and completed == requests else 1)
PY
