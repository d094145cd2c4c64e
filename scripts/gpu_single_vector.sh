#!/usr/bin/env bash
# Issue 17's H200 figures in one call: embindex end to end with encoder.compile (B/16, L/14, 20,000 files; 12 MP
# over 6,000), the 1,000-file increment, the decode candidates side by side, and the GPU tests. From the repo root:
#
#   bash scripts/gpu_single_vector.sh "$OUT"      (carry .carry .whl .whlgpu: torchao, nvImageCodec, nvjpeg wheels)
#
# Each step writes under OUT as it ends, within 9.5 minutes in all (the device's limit per call is 10).
set -uo pipefail
out=${1:?OUT folder}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whlgpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi -L
# The GPU tests first: the code a user runs on CUDA, before the figures
EMBINDEX_SHARED_DATA=.carry timeout 100 python3 -m pytest -q tests/decode/test_nvjpeg.py \
    tests/decode/test_resize_batch.py tests/encode/test_compiled.py tests/encode/test_float8.py 2>&1 \
    | tee "$out/gpu_tests.log"
timeout 350 python3 scripts/bench_compile.py --images .carry/images --work /tmp/bc --out "$out" \
    --models clip-vit-b16,clip-vit-l14 --copies 100 --increment 1000 --large-copies 30 \
    --parts e2e,increment,large 2>&1 | tee "$out/bench_compile.log"
timeout 75 python3 scripts/bench_gpu_decode.py --images .carry/images --copies 10 --workers 16 2>&1 \
    | tee "$out/decode.log"
