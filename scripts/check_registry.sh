#!/usr/bin/env bash
# Registry readiness: run `comfy node validate` (comfy-cli) on a node-pack checkout and FAIL on any
# problem it reports.  comfy-cli prints warnings (security findings from ruff, malformed license,
# unparsable pyproject.toml, ...) but exits 0 for most of them, so its output is checked here.
#
#   scripts/check_registry.sh [PACK_DIR]      # default: this checkout
#
# Environment: COMFY_CLI = the `comfy` executable (default: $QTD_VENV/bin/comfy, the provisioned
# venv's, else `comfy` on PATH).  Runs offline: telemetry off, a throw-away HOME for comfy-cli's
# config, no prompts.  Exit status: 0 = ready, 1 = problems reported, 2 = comfy-cli not available.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACK="$(cd "${1:-$REPO}" && pwd)"
CACHE="${QTD_CACHE:-$REPO/.cache}"
VENV="${QTD_VENV:-$CACHE/venv}"

COMFY="${COMFY_CLI:-}"
if [ -z "$COMFY" ]; then
  if [ -x "$VENV/bin/comfy" ]; then COMFY="$VENV/bin/comfy"; else COMFY="$(command -v comfy || true)"; fi
fi
if [ -z "$COMFY" ] || [ ! -x "$COMFY" ]; then
  echo "check_registry: comfy-cli not found (pip install -r requirements-dev.txt, or set COMFY_CLI)" >&2
  exit 2
fi

home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
out="$(cd "$PACK" && HOME="$home" XDG_CONFIG_HOME="$home/.config" DO_NOT_TRACK=1 COMFY_NO_TELEMETRY=1 \
       NO_COLOR=1 TERM=dumb COLUMNS=200 timeout 300 "$COMFY" --skip-prompt --no-json node validate </dev/null 2>&1)"
rc=$?
printf '%s\n' "$out"

problems=()
[ "$rc" -eq 0 ] || problems+=("comfy node validate exited with status $rc")
grep -qF "All validation checks passed successfully" <<<"$out" \
  || problems+=("no 'All validation checks passed successfully' line")
# A clean run prints exactly these lines; anything else is a finding (or a crash) to look at.
while IFS= read -r line; do
  line="${line%$'\r'}"
  case "$line" in
    ""|"Validating node configuration..."|"Running security checks..."|*"All validation checks passed successfully") ;;
    *) problems+=("reported: $line") ;;
  esac
done <<<"$out"

if [ "${#problems[@]}" -gt 0 ]; then
  echo "check_registry: FAILED for $PACK" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "check_registry: OK ($PACK is ready for the Comfy registry)"
