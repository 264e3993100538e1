"""Registry readiness: ``comfy node validate`` (comfy-cli) on the checkout, via
scripts/check_registry.sh, which fails on any problem comfy-cli reports even where comfy-cli
itself exits 0 (issue 6).  The negative cases prove the script really reads the output."""
import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "check_registry.sh")


def check(pack_dir):
    return subprocess.run(["bash", SCRIPT, pack_dir], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def checkout_result():
    r = check(REPO)
    if r.returncode == 2:
        pytest.skip("comfy-cli is not installed in the test venv (scripts/check_registry.sh exit 2: "
                    f"{r.stderr.strip()}); install requirements-dev.txt")
    return r


def test_checkout_passes_comfy_node_validate(checkout_result):
    r = checkout_result
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All validation checks passed successfully" in r.stdout
    assert "check_registry: OK" in r.stdout


@pytest.fixture(scope="module")
def clean_copy(checkout_result, tmp_path_factory):
    """The pack's code, pyproject.toml and LICENSE in a folder of their own; it passes the check."""
    dest = tmp_path_factory.mktemp("registry") / "pack"
    dest.mkdir()
    for path in glob.glob(os.path.join(REPO, "*.py")) + [os.path.join(REPO, "pyproject.toml"),
                                                          os.path.join(REPO, "LICENSE")]:
        shutil.copy(path, dest)
    r = check(str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def _eval_in_code(d):
    with open(d / "utils.py", "a") as f:
        f.write("\n\ndef _unsafe(text):\n    return eval(text)\n")


def _bad_license(d):
    text = (d / "pyproject.toml").read_text()
    start = text.index("license = ")
    end = text.index("\n", start)
    (d / "pyproject.toml").write_text(text[:start] + "license = {}" + text[end:])


def _no_version(d):
    text = (d / "pyproject.toml").read_text()
    start = text.index("\nversion = ")
    end = text.index("\n", start + 1)
    (d / "pyproject.toml").write_text(text[:start] + '\nversion = ""' + text[end:])


@pytest.mark.parametrize("breakage, expected", [
    (_eval_in_code, "Security warnings found"),      # comfy-cli exits 0 here
    (_bad_license, "Warning: License should be"),     # comfy-cli exits 0 here
    (_no_version, "project version is empty"),        # comfy-cli exits 1 here
], ids=["eval", "license", "version"])
def test_any_reported_problem_fails_the_check(clean_copy, tmp_path, breakage, expected):
    d = tmp_path / "pack"
    shutil.copytree(clean_copy, d)
    breakage(d)
    r = check(str(d))
    assert r.returncode == 1, r.stdout + r.stderr
    assert expected in r.stdout, r.stdout
    assert "check_registry: FAILED" in r.stderr, r.stderr
