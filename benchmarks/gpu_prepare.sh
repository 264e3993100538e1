#!/usr/bin/env bash
# Prepare a run of benchmarks/bench_gpu.py on a lent GPU machine (no network there).
#
#   benchmarks/gpu_prepare.sh        # here, once: wheels ComfyUI needs that the GPU image lacks
#
# The GPU image has python3 3.12 with torch, einops, transformers, safetensors, scipy, psutil,
# PyYAML, Pillow, numpy and tqdm, but not torchsde/trampoline (ComfyUI's k-diffusion samplers
# import them). PyAV (36 MB, only ComfyUI's video nodes need it) is left out to keep the
# transferred tree under 64 MiB; without it ComfyUI's `nodes` module cannot be imported and
# bench_gpu.py runs the KSampler node's body itself (benchlib.ksampler says which path ran).
# Then run, through the device tool, with carry [".cache/ComfyUI", ".whl"] and timeout_s 540:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
#   export PYTHONUNBUFFERED=1 COMFYUI_PATH=$PWD/.cache/ComfyUI; nvidia-smi; \
#   python3 benchmarks/bench_gpu.py --out $OUT 2>&1 | tee $OUT/log.txt
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${QTD_VENV:-$REPO/.cache/venv}/bin/python"
[ -x "$PY" ] || PY=python3
mkdir -p "$REPO/.whl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$REPO/.whl" torchsde==0.2.6 trampoline==0.1.2
ls -la "$REPO/.whl"
git -C "$REPO" check-ignore -q .whl/ || echo "warning: .whl/ is not git-ignored" >&2
