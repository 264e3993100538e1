"""Test setup: real ComfyUI (CPU, in-process) + the node pack loaded as ``quadtree_diffusion``.

pytest runs with ``--import-mode=importlib`` (pytest.ini), so neither ``tests/`` nor the repo root
is put on ``sys.path``: the repo root holds the pack's own ``nodes.py``/``utils.py`` and ``tests/``
holds a ``server.py``, both of which would shadow ComfyUI's top-level modules of the same names.
Instead this file registers helper modules by file path:

* ``qtd_fixtures`` = tests/fixtures.py (tiny models, CLIP/VAE stand-ins, run_ksampler, ...)
* ``qtd_server``   = tests/server.py   (ComfyServer harness)
* ``qtd_families`` = tests/families.py (tiny models of every model family of the running ComfyUI)
* ``qtd_upstream`` = tests/upstream.py (faithful fixtures of ComfyUI code added after 0.28)

so tests do ``import qtd_fixtures as fx`` / ``from qtd_server import ComfyServer``.

Fixtures: ``pack`` (session; the imported pack module), ``fx`` (qtd_fixtures),
``run_ksampler`` (the function), ``comfy_server`` (session-wide real ComfyUI server),
``fresh_comfy_server`` (a server of its own for one test).
"""
import importlib.util
import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _load_by_path(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


qtd_fixtures = _load_by_path("qtd_fixtures", os.path.join(TESTS_DIR, "fixtures.py"))
qtd_server = _load_by_path("qtd_server", os.path.join(TESTS_DIR, "server.py"))

# ComfyUI on sys.path, repo root off it, CPU forced -- before anything imports comfy/torch users.
COMFYUI_PATH = qtd_fixtures.setup_comfy()
qtd_reliability = _load_by_path("qtd_reliability", os.path.join(TESTS_DIR, "reliability.py"))
qtd_families = _load_by_path("qtd_families", os.path.join(TESTS_DIR, "families.py"))
qtd_upstream = _load_by_path("qtd_upstream", os.path.join(TESTS_DIR, "upstream.py"))
import nodes as comfy_nodes  # noqa: E402  ComfyUI's nodes.py (asserted below)

assert os.path.realpath(comfy_nodes.__file__).startswith(COMFYUI_PATH + os.sep), comfy_nodes.__file__


def pytest_report_header(config):
    import comfy.model_management as mm
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except Exception:
        version = "?"
    return [f"ComfyUI {version} at {COMFYUI_PATH} (device {mm.get_torch_device()})",
            f"node pack: {REPO_ROOT} as module '{qtd_fixtures.PACK_MODULE_NAME}'"]


@pytest.fixture(scope="session")
def pack():
    """The node pack imported in-process as ``quadtree_diffusion`` (fails the test, not the
    collection, while the pack's ``__init__.py`` is missing or broken)."""
    try:
        return qtd_fixtures.load_pack(REPO_ROOT)
    except ImportError as e:
        if not os.path.isfile(os.path.join(REPO_ROOT, "__init__.py")):
            pytest.fail(f"node pack not importable yet: {e}", pytrace=False)
        raise


@pytest.fixture(scope="session")
def fx():
    return qtd_fixtures


@pytest.fixture(scope="session")
def run_ksampler():
    return qtd_fixtures.run_ksampler


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server for the whole session (started on first use, always stopped)."""
    base = tmp_path_factory.mktemp("comfy-server")
    srv = qtd_server.ComfyServer(str(base))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if os.environ.get("QTD_SHOW_SERVER_LOG"):
            print(f"\n----- ComfyUI server log ({srv.log_path}) -----\n{srv.log_text()}")


@pytest.fixture
def fresh_comfy_server(tmp_path):
    """A server of its own for one test (use sparingly: startup takes ~10-30 s)."""
    with qtd_server.ComfyServer(str(tmp_path / "comfy")) as srv:
        yield srv


@pytest.fixture(scope="module")
def single_thread():
    """torch on one CPU thread for a module of tiny-model tests (restored afterwards): their tensors are
    so small that thread hand-offs cost more than the maths, several times more on a shared machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
