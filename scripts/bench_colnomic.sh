#!/usr/bin/env bash
# On a CUDA machine, from the repository root: `embindex bench` of a full-size random-init ColNomic-3B
# (Qwen2.5-VL-3B + custom_text_proj, bf16) at max_pixels 768x28x28 over 2,000 images of mixed real sizes
# (the photos in IMAGES_DIR, re-encoded at 5 scales and cropped to various aspects), Parquet sink.
# Usage: scripts/bench_colnomic.sh IMAGES_DIR OUT_DIR [BATCH_SIZES] [N_IMAGES]
set -euo pipefail
images=$1 out=$2 sizes=${3:-1,4,8,16,32} count=${4:-2000}
work=/tmp/embindex-colnomic
mkdir -p "$work" "$out"
[ -d "$work/models/colnomic-3b" ] || python3 scripts/make_full_size_models.py "$work/models" --models colnomic-3b
python3 - "$images" "$work/corpus" "$count" <<'PY'
import sys
from multiprocessing import Pool
from pathlib import Path
from PIL import Image
sys.path.insert(0, "scripts")
from gpu_report_check import distinct

SCALES = [1.0, 1.5, 2.2, 3.2, 4.5]  # 500x375 photos -> 256..768 tokens of 28x28 after smart_resize
ASPECTS = [1.0, 0.75, 1.33, 0.6, 1.7]

def make(job):
    source, target, copy = job
    image = Image.open(source).convert("RGB")
    aspect = ASPECTS[copy % len(ASPECTS)]
    width, height = image.size
    if width / height > aspect:
        image = image.crop((0, 0, int(height * aspect), height))
    else:
        image = image.crop((0, 0, width, int(width / aspect)))
    scale = SCALES[(copy // len(ASPECTS)) % len(SCALES)]
    image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    image, quality = distinct(image, copy)
    image.save(target, quality=quality)

sources = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
copies = -(-int(sys.argv[3]) // len(sources))
folder = Path(sys.argv[2])
jobs = []
for copy in range(copies):
    (folder / f"copy{copy:03d}").mkdir(parents=True, exist_ok=True)
    jobs += [(str(s), str(folder / f"copy{copy:03d}" / s.name), copy) for s in sources]
with Pool() as pool:
    pool.map(make, jobs[:int(sys.argv[3])], chunksize=8)
print("corpus:", min(len(jobs), int(sys.argv[3])), "files")
PY
cat > "$work/colnomic.yaml" <<YAML
input: {root: $work/corpus}
encoder: {model: $work/models/colnomic-3b, device: cuda, dtype: bfloat16, max_pixels: 602112, min_pixels: 3136}
output: {lancedb: null, parquet: {dir: $work/embeddings}}
run: {report_dir: $work/runs}
YAML
python3 -m pipeline.cli bench "$work/colnomic.yaml" --batch-sizes "$sizes" --limit "$count" --out "$work/bench"
for f in bench.md bench.json; do cp "$work/bench/$f" "$out/colnomic-bs${sizes//,/_}-$f"; done
cat "$work/bench/bench.md"
