#!/usr/bin/env bash
# Install headless Chromium and chromedriver (Debian packages) for tests/test_browser.py.
#
#   scripts/install_browser.sh        # no-op when both are already installed
#
# Needs root (or sudo) and apt-get. Without them it says so and exits 0: the browser test then
# skips with that reason, every other test still runs.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if { have chromium || have chromium-browser; } && have chromedriver; then
  echo "[install_browser] chromium and chromedriver already installed"
  exit 0
fi

SUDO=()
if [ "$(id -u)" != "0" ]; then
  if have sudo; then SUDO=(sudo -n); else
    echo "[install_browser] not root and no sudo: install chromium and chromium-driver yourself" >&2
    exit 0
  fi
fi
if ! have apt-get; then
  echo "[install_browser] no apt-get: install Chromium and chromedriver with your package manager" >&2
  exit 0
fi

echo "[install_browser] apt-get install chromium chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version || true
chromedriver --version || true
