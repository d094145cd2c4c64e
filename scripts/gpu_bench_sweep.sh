#!/usr/bin/env bash
# On a CUDA machine, from the repository root: batch-size sweeps of full-size random-init CLIP
# ViT-B/16 and ViT-L/14 over 4,800 ImageNet-size JPEGs (100 photos x 48 distinct re-encodes),
# Parquet sink. Usage: scripts/gpu_bench_sweep.sh IMAGES_DIR OUT_DIR [BATCH_SIZES]
set -euo pipefail
images=$1 out=$2 sizes=${3:-1,8,32,64,128,256,512}
work=/tmp/embindex-sweep
mkdir -p "$work" "$out"
python3 scripts/make_full_size_models.py "$work/models" >/dev/null 2>&1
python3 - "$images" "$work/corpus" <<'PY'
import sys
sys.path.insert(0, "scripts")
from pathlib import Path
from gpu_report_check import build_corpus
print("corpus:", build_corpus(Path(sys.argv[1]), 48, Path(sys.argv[2])), "files")
PY
for model in clip-vit-b16 clip-vit-l14; do
  cat > "$work/$model.yaml" <<YAML
input: {root: $work/corpus}
encoder: {model: $work/models/$model, device: cuda, dtype: bfloat16}
output: {lancedb: null, parquet: {dir: $work/$model-embeddings}}
run: {report_dir: $work/$model-runs}
YAML
  python3 -m pipeline.cli bench "$work/$model.yaml" --batch-sizes "$sizes" --out "$work/$model-bench"
  for f in bench.md bench.json bench.png; do cp "$work/$model-bench/$f" "$out/$model-$f"; done
done
