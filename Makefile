# Test and demo entry points. The runtime (venv + real ComfyUI) comes from scripts/provision.sh,
# which honours QTD_CACHE and COMFYUI_PATH and prints the paths it settled on.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.PHONY: test test-quick demo provision

# Runs provision.sh (fails the target if it fails) and takes the venv and ComfyUI paths from its
# "QTD_VENV=..." / "COMFYUI_PATH=..." stdout lines.
define PROVISION
out="$$(scripts/provision.sh)"
QTD_VENV="$$(sed -n 's/^QTD_VENV=//p' <<<"$$out")"
COMFYUI_PATH="$$(sed -n 's/^COMFYUI_PATH=//p' <<<"$$out")"
export QTD_VENV COMFYUI_PATH
endef

provision:
	scripts/provision.sh

# The browser is part of what `make test` checks: install_browser.sh fails the target when Chromium
# cannot be installed, and QTD_REQUIRE_BROWSER=1 turns the browser test's skip into a failure.
test:
	scripts/install_browser.sh
	$(PROVISION)
	QTD_REQUIRE_BROWSER=1 "$$QTD_VENV/bin/python" -m pytest $(PYTEST_ARGS)

test-quick:
	$(PROVISION)
	"$$QTD_VENV/bin/python" -m pytest -m "not slow" $(PYTEST_ARGS)

demo:
	$(PROVISION)
	"$$QTD_VENV/bin/python" scripts/demo.py
