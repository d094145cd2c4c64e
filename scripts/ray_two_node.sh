#!/usr/bin/env bash
# Issue 8, item 2: a two-node Ray cluster on one machine (`ray start --head` + `ray start --address`,
# each node with its own raylet and CPUs, token auth on as on a real cluster); the same job through
# the cluster and through the local runner; rows, vectors and errors compared.
# Usage, from the repository root with the [ray] extra installed:
#   scripts/ray_two_node.sh [IMAGES_DIR] [MODEL_DIR] [WORK_DIR]
# Writes WORK_DIR/ray_two_node.json (the comparison) and the Ray run's report.md. Stops only the
# Ray processes it started (those of its own --temp-dir), also when it fails.
set -euo pipefail
images=$(realpath "${1:-../shared/data/images}")
model=$(realpath "${2:-tiny-models/clip}")
work=$(realpath -m "${3:-/tmp/embindex-ray-two-node}")
port=${RAY_HEAD_PORT:-6390}
cpus=${CPUS_PER_NODE:-1}
temp=/tmp/ray2n-$$  # Ray's socket paths must stay short: not under WORK_DIR
rm -rf "$work" "$temp"
mkdir -p "$work"

# Every node and every driver must present the same token: here one variable, on a real cluster the
# same RAY_AUTH_TOKEN (or token file, RAY_AUTH_TOKEN_PATH) on each machine.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN

stop_cluster() {
  # `ray stop` would end every Ray on this machine; end only this cluster's processes: those naming
  # its temp dir (GCS, raylets) and everything they started (agents, workers, actors).
  python3 - "$temp" <<'PY' || true
import os, sys
import psutil
ours = [p for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and any(sys.argv[1] in arg for arg in (p.info["cmdline"] or []))]
family = {p.pid: p for p in ours}
for process in ours:
    try:
        family.update({child.pid: child for child in process.children(recursive=True)})
    except psutil.Error:
        pass
for process in family.values():
    try:
        process.kill()
    except psutil.Error:
        pass
psutil.wait_procs(list(family.values()), timeout=10)
PY
  rm -rf "$temp"
}
trap stop_cluster EXIT

common=(--num-cpus="$cpus" --num-gpus=0 --object-store-memory=$((200 << 20)) --disable-usage-stats)
ray start --head --port="$port" --temp-dir="$temp" --include-dashboard=false "${common[@]}" >"$work/head.log" 2>&1
ray start --address="127.0.0.1:$port" "${common[@]}" >"$work/worker.log" 2>&1
python3 - "$port" <<'PY'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
print(f"cluster: {len(nodes)} nodes, {ray.cluster_resources().get('CPU')} CPUs")
assert len(nodes) == 2, nodes
PY

for runner in ray local; do
  cat >"$work/$runner.yaml" <<YAML
input: {root: $images}
decode: {workers: auto}
encoder: {model: $model, batch_size: 32}
output: {lancedb: {uri: ./$runner-index, table: images}, parquet: {dir: ./$runner-embeddings}}
run:
  report_dir: ./$runner-runs
  shard_size: 64
  runner: $runner
  ray: {gpus_per_actor: 0, actor_cpus: 0.5, decode_cpus: 0.5, decode_files: 16}
YAML
done
started=$(date +%s.%N)
embindex run "$work/ray.yaml" --quiet --address "127.0.0.1:$port"
echo "ray run: $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s"
embindex run "$work/local.yaml" --quiet

python3 - "$work" <<'PY'
import glob, json, sys
from pathlib import Path

import numpy as np
from pipeline.index.sinks.lance import LanceSink
from pipeline.index.sinks.parquet import ParquetSink

work = Path(sys.argv[1])
tables = {r: LanceSink(str(work / f"{r}-index"), "images").read("images").sort_by("path") for r in ("ray", "local")}
vectors = {r: np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for r, t in tables.items()}
report = json.loads(Path(sorted(glob.glob(str(work / "ray-runs/*/report.json")))[-1]).read_text())
result = {
    "rows": {r: t.num_rows for r, t in tables.items()},
    "parquet_rows": ParquetSink(str(work / "ray-embeddings")).count_rows("images"),
    "distinct_paths": len(set(tables["ray"]["path"].to_pylist())),
    "same_metadata": all(tables["ray"][c].equals(tables["local"][c]) for c in
                         ("path", "root", "size_bytes", "mtime_ns", "content_hash", "width", "height", "model")),
    "min_cosine_vs_local": float((vectors["ray"] * vectors["local"]).sum(axis=1).min()),
    "nodes": report["ray"]["nodes"],
    "per_node": report["ray"]["per_node"],
    "per_gpu": report["ray"]["per_gpu"],
    "wall_s": report["wall_s"], "embed_s": report["embed_s"], "images_per_s": report["images_per_s"],
}
result["ok"] = (result["rows"]["ray"] == result["rows"]["local"] == result["parquet_rows"] == result["distinct_paths"]
                and result["same_metadata"] and result["min_cosine_vs_local"] >= 0.9999 and result["nodes"] == 2
                and all(n["decoded"] > 0 for n in result["per_node"].values()) and len(result["per_node"]) == 2)
(work / "ray_two_node.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
sys.exit(0 if result["ok"] else 1)
PY
cp "$(ls -d "$work"/ray-runs/*/ | tail -1)report.md" "$work/ray-report.md"
