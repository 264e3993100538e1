#!/usr/bin/env bash
# Install headless Chromium and chromedriver (Debian packages) for tests/test_browser.py.
#
#   scripts/install_browser.sh        # no-op when both are already installed
#
# Needs root (or sudo) and apt-get. Without them, or when the install fails, it says so and exits 1:
# the browser is part of what `make test` (and CI) checks, so `make test` stops there. To run the
# rest of the suite without a browser, run pytest yourself (tests/test_browser.py then skips with
# the reason) or `make test-quick`.
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
    exit 1
  fi
fi
if ! have apt-get; then
  echo "[install_browser] no apt-get: install Chromium and chromedriver with your package manager" >&2
  exit 1
fi

echo "[install_browser] apt-get install chromium chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
if ! { { have chromium || have chromium-browser; } && have chromedriver; }; then
  echo "[install_browser] apt-get ran but chromium / chromedriver are still not on PATH" >&2
  exit 1
fi
chromium --version || true
chromedriver --version || true
