#!/usr/bin/env bash
# Wheels for running the Ray runner on a machine without a package registry (CPython 3.12, x86-64):
# Ray 2.60 with its Java jar and dashboard web build removed (79 MB -> ~43 MB: a Python-only Ray needs
# neither), and the few pure-Python dependencies such a machine may lack. Usage, here:
#   scripts/pack_ray_wheels.sh .whl
# There (before the command): python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
out=${1:?usage: scripts/pack_ray_wheels.sh OUT_DIR}
mkdir -p "$out"
download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          -d "$out")
"${download[@]}" ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
python3 - "$out" <<'PY'
import base64, hashlib, sys, zipfile
from pathlib import Path

out = Path(sys.argv[1])
wheel = next(out.glob("ray-2.60.0-*.whl"))
slim = out / (wheel.name + ".slim")
drop = ("ray/jars/", "ray/dashboard/client/build/")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
    record_name = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
    kept = [i for i in source.infolist() if not i.filename.startswith(drop) and i.filename != record_name]
    lines = []
    for info in kept:  # copies keep their unix modes (raylet, gcs_server are executables)
        data = source.read(info)
        target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    target.writestr(source.getinfo(record_name), "\n".join(lines) + "\n")
slim.replace(wheel)
print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB after removing {', '.join(drop)}")
PY
du -ch "$out"/*.whl | tail -1
