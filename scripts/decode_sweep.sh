#!/usr/bin/env bash
# `embindex run` per decode setting on a GPU machine; prints one line per run from its report.
#
#   bash scripts/decode_sweep.sh IMAGES OUT "clip-vit-b16 auto auto small" "clip-vit-b16 auto 15 large60" ...
#
# Each setting: MODEL (make_full_size_models.py name, random-init) DECODE_DEVICE WORKERS CORPUS, where
# CORPUS is small (IMAGES x 200 distinct re-encodes) or largeK (IMAGES x K, upscaled to 12 MP; large =
# large20). The 12 MP files are written once, for the largest K asked; a smaller K reads the first K copies.
set -euo pipefail
images=$1 out=$2; shift 2
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1
models=$(printf '%s\n' "$@" | awk '{print $1}' | sort -u | paste -sd,)
python3 scripts/make_full_size_models.py /tmp/sweep-models --models "$models" >/dev/null
copies() { local c=${1#large}; echo "${c:-20}"; }
most=0
for setting in "$@"; do
  corpus=$(awk '{print $4}' <<< "$setting")
  if [[ $corpus == large* ]] && (( $(copies "$corpus") > most )); then most=$(copies "$corpus"); fi
done
python3 - "$images" "$most" "$@" <<'PY'
import sys; sys.path.insert(0, "scripts")
from pathlib import Path
from bench_gpu import _upscale
from gpu_report_check import build_corpus
images, most, settings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if any(s.split()[3] == "small" for s in settings) and not Path("/tmp/sweep-small").exists():
    print("small:", build_corpus(images, 200, Path("/tmp/sweep-small")), flush=True)
if most and not Path("/tmp/sweep-large").exists():
    print("large:", build_corpus(images, most, Path("/tmp/sweep-large"), make=_upscale, chunksize=4), flush=True)
PY
for setting in "$@"; do
  read -r model device workers corpus <<< "$setting"
  if [[ $corpus == small ]]; then roots=/tmp/sweep-small
  else roots=$(seq -f "/tmp/sweep-large/copy%03g" 0 $(( $(copies "$corpus") - 1 )) | paste -sd,); fi
  d=/tmp/sweep-run; rm -rf $d; mkdir -p $d
  printf "input: {root: [%s]}\nencoder: {model: /tmp/sweep-models/%s, device: cuda, batch_size: 256}\ndecode: {device: %s, workers: %s}\noutput: {lancedb: null, parquet: {dir: %s/emb}}\nrun: {report_dir: %s/runs, shard_size: 8192}\n" \
    "$roots" "$model" "$device" "$workers" $d $d > $d/c.yaml
  python3 -m pipeline.cli run $d/c.yaml -q >/dev/null
  python3 - "$setting" $d <<'PY' | tee -a "$out/decode_sweep.txt"
import glob, json, sys
r = json.load(open(sorted(glob.glob(sys.argv[2] + "/runs/*/report.json"))[-1]))
print(sys.argv[1], r["images_embedded"], "files;", round(r["images_per_s"]), "images/s; embed", round(r["embed_s"], 2),
      "s; nvJPEG", r["images_gpu_decoded"], "; workers", r["decode_workers"], "; first wait",
      round(r["first_decode_wait_s"], 2), "; gpu_feed", r.get("gpu_feed"))
PY
done
