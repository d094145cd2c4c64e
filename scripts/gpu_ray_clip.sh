#!/usr/bin/env bash
# One device call for issue 22's one-GPU rows: CLIP ViT-L/14 (random init, bf16) over 40,000 distinct synthetic
# JPEGs, the local runner, the Ray runner with one GPU actor, and two actors sharing the GPU (half each).
# Carry `.whlray` (scripts/pack_ray_wheels.sh .whlray). Usage: bash scripts/gpu_ray_clip.sh OUT_DIR
set -euo pipefail
out=${1:?usage: scripts/gpu_ray_clip.sh OUT_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlray/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 scripts/bench_ray.py --synth 40000 --full-size clip-vit-l14 --batch-size 256 \
    --runs local,ray-1gpu,ray-2x0.5gpu --work /tmp/bench-ray-clip --out "$out"
