#!/usr/bin/env bash
# One device call for issue 20 (and issue 22's one-GPU row): ColNomic-3B (random init, bf16) over 2,000 photos
# of mixed real sizes, the local runner, the Ray runner with one GPU actor, and two actors sharing the GPU.
# Carry `.carry100 .whlray` (100 photos; Ray and its pure-Python needs: scripts/pack_ray_wheels.sh .whlray).
# Usage: bash scripts/gpu_ray_kinds.sh OUT_DIR
set -euo pipefail
out=${1:?usage: scripts/gpu_ray_kinds.sh OUT_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlray/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 scripts/bench_ray.py --images .carry100/images --mixed 2000 --full-size colnomic-3b --batch-size 16 \
    --set encoder.max_pixels=602112 --set encoder.min_pixels=3136 --runs local,ray-1gpu,ray-2x0.5gpu \
    --work /tmp/bench-ray --out "$out"
