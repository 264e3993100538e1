"""Run a REAL headless ComfyUI server with this node pack installed, for end-to-end tests.

    with ComfyServer() as srv:                     # start() on enter, stop() on exit (always)
        info = srv.object_info()
        history = srv.run(prompt)                  # queue + wait + raise on execution errors
        paths = srv.output_images(history)

The server is ``<venv python> <ComfyUI>/main.py --cpu --listen 127.0.0.1 --port <free>
--base-directory <tmp>`` where ``<tmp>/custom_nodes`` holds only two symlinks: this pack (as
``quadtree-diffusion``: a folder name with a dash, not a Python identifier) and
``tests/fixture_nodes`` (as ``qtd_test_fixture_nodes``). Its stdout/stderr go to ``<tmp>/server.log``.

The process runs in its own process group; ``stop()`` sends SIGTERM to the group, then SIGKILL
after a grace period. Every ComfyServer still running at interpreter exit is stopped too, and on
Linux the server gets SIGTERM if the test process itself is killed (PR_SET_PDEATHSIG).
Every wait is bounded: startup (``startup_timeout``), each HTTP request (``request_timeout``) and
each prompt (``wait(timeout=...)``, which interrupts the server when it expires).

This file is loaded by ``tests/conftest.py`` as module ``qtd_server`` (never as ``server``:
that name belongs to ComfyUI's own server.py).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref

import requests

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
FIXTURE_NODES_DIR = os.path.join(TESTS_DIR, "fixture_nodes")
PACK_FOLDER_NAME = "quadtree-diffusion"
FIXTURE_NODES_FOLDER_NAME = "qtd_test_fixture_nodes"

_LIVE: "weakref.WeakSet[ComfyServer]" = weakref.WeakSet()


class ComfyServerError(RuntimeError):
    """The server could not start, died, or answered with an error."""


class PromptRejected(ComfyServerError):
    """POST /prompt answered 400 (validation failed); ``.response`` holds the JSON body."""

    def __init__(self, message, response=None):
        super().__init__(message)
        self.response = response


class PromptFailed(ComfyServerError):
    """The prompt ran but ended with status 'error'; ``.history`` holds the history entry."""

    def __init__(self, message, history=None):
        super().__init__(message)
        self.history = history


def _default_cache() -> str:
    return os.environ.get("QTD_CACHE") or os.path.join(REPO_ROOT, ".cache")


def default_comfy_path() -> str:
    return os.environ.get("COMFYUI_PATH") or os.path.join(_default_cache(), "ComfyUI")


def default_python() -> str:
    venv = os.environ.get("QTD_VENV") or os.path.join(_default_cache(), "venv")
    py = os.path.join(venv, "bin", "python")
    return py if os.path.exists(py) else sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _format_node_errors(body) -> str:
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('type')}: {err.get('message')} {err.get('details', '')}".rstrip())
    elif err:
        lines.append(str(err))
    for node_id, info in (body.get("node_errors") or {}).items():
        ctype = info.get("class_type", "?")
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({ctype}): {e.get('type')}: {e.get('message')} "
                         f"{e.get('details', '')} {json.dumps(e.get('extra_info', {}))[:300]}")
    return "\n".join(lines) or json.dumps(body)[:2000]


class ComfyServer:
    """A real ComfyUI server process in a throw-away base directory."""

    def __init__(self, base_dir: str | None = None, *, comfy_path: str | None = None,
                 python: str | None = None, port: int | None = None, pack_dir: str = REPO_ROOT,
                 pack_folder_name: str = PACK_FOLDER_NAME, fixture_nodes: bool = True,
                 extra_args=(), startup_timeout: float = 180.0, request_timeout: float = 60.0,
                 keep_base_dir: bool = False):
        self.comfy_path = os.path.realpath(comfy_path or default_comfy_path())
        self.python = python or default_python()
        self.port = port
        self.pack_dir = os.path.realpath(pack_dir)
        self.pack_folder_name = pack_folder_name
        self.fixture_nodes = fixture_nodes
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self._own_base_dir = base_dir is None
        self.keep_base_dir = keep_base_dir
        self.base_dir = os.path.realpath(base_dir) if base_dir else None
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self._log_file = None

    # ---- paths ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> str:
        return os.path.join(self.base_dir, "input")

    @property
    def output_dir(self) -> str:
        return os.path.join(self.base_dir, "output")

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.base_dir, "temp")

    @property
    def custom_nodes_dir(self) -> str:
        return os.path.join(self.base_dir, "custom_nodes")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "server.log")

    # ---- lifecycle -----------------------------------------------------------------------
    def _prepare_base_dir(self):
        if self.base_dir is None:
            self.base_dir = os.path.realpath(tempfile.mkdtemp(prefix="qtd-comfy-"))
        for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        links = {self.pack_folder_name: self.pack_dir}
        if self.fixture_nodes:
            links[FIXTURE_NODES_FOLDER_NAME] = FIXTURE_NODES_DIR
        for name, target in links.items():
            link = os.path.join(self.custom_nodes_dir, name)
            if os.path.islink(link) or os.path.exists(link):
                continue
            os.symlink(target, link, target_is_directory=True)

    def command(self) -> list[str]:
        return [
            self.python, os.path.join(self.comfy_path, "main.py"),
            "--cpu",
            "--use-pytorch-cross-attention",  # same attention as the in-process tests
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--base-directory", self.base_dir,
            "--disable-auto-launch",
            "--dont-print-server",
            "--disable-api-nodes",            # no network-facing nodes, faster start
            "--database-url", "sqlite:///:memory:",  # never write into the ComfyUI checkout
            "--preview-method", "none",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        if not os.path.isfile(os.path.join(self.comfy_path, "main.py")):
            raise ComfyServerError(f"no ComfyUI at {self.comfy_path}: run scripts/provision.sh")
        self._prepare_base_dir()
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        env["QTD_FIXTURES_PY"] = os.path.join(TESTS_DIR, "fixtures.py")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self._log_file = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(
            self.command(), cwd=self.base_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent)
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {code} during startup; log tail:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/system_stats", timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer within {self.startup_timeout:.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0):
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_process_group(proc, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def cleanup(self):
        """stop() and remove the base directory (if this object created it)."""
        self.stop()
        if self._own_base_dir and not self.keep_base_dir and self.base_dir and os.path.isdir(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
        return False

    # ---- logs ----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---- HTTP ----------------------------------------------------------------------------
    def _check_alive(self):
        if not self.alive():
            raise ComfyServerError(f"ComfyUI server is not running; log tail:\n{self.log_tail()}")

    def get(self, path: str, **kw) -> requests.Response:
        self._check_alive()
        kw.setdefault("timeout", self.request_timeout)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        self._check_alive()
        kw.setdefault("timeout", self.request_timeout)
        return requests.post(self.url + path, **kw)

    def object_info(self, node_class: str | None = None) -> dict:
        r = self.get("/object_info" + (f"/{node_class}" if node_class else ""))
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected with readable node errors."""
        body = {"prompt": prompt, "client_id": client_id or self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self.post("/prompt", json=body)
        try:
            data = r.json()
        except ValueError:
            data = r.text
        if r.status_code != 200:
            raise PromptRejected(f"POST /prompt answered {r.status_code}:\n{_format_node_errors(data)}", data)
        if data.get("node_errors"):
            raise PromptRejected(f"POST /prompt reported node errors:\n{_format_node_errors(data)}", data)
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        r = self.get(f"/history/{prompt_id}")
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.25) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry (any status).
        On timeout the server is interrupted and TimeoutError raised."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI adds the entry once the prompt has finished
                return entry
            if time.monotonic() > deadline:
                try:
                    self.interrupt()
                except Exception:
                    pass
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """queue + wait; raises PromptFailed (with ComfyUI's traceback) unless status is success."""
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise PromptFailed(f"prompt {prompt_id} failed:\n{execution_error_text(entry)}", entry)
        return entry

    def interrupt(self):
        r = self.post("/interrupt", json={})
        r.raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = True):
        self.post("/free", json={"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    # ---- outputs -------------------------------------------------------------------------
    def output_images(self, history: dict, node_id: str | None = None) -> list[str]:
        """Absolute paths of the image files listed in a history entry (optionally one node's)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for nid, out in (history.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for img in out.get("images", []):
                root = roots.get(img.get("type", "output"), self.output_dir)
                paths.append(os.path.join(root, img.get("subfolder", ""), img["filename"]))
        return paths


def execution_error_text(entry: dict) -> str:
    msgs = (entry or {}).get("status", {}).get("messages", [])
    lines = []
    for item in msgs:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            continue
        event, data = item
        if event in ("execution_error", "execution_interrupted"):
            lines.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
            tb = data.get("traceback")
            if tb:
                lines.append("".join(tb) if isinstance(tb, list) else str(tb))
    return "\n".join(lines) or json.dumps(entry.get("status", {}))[:3000]


def _die_with_parent():
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _stop_process_group(proc: subprocess.Popen, grace: float = 5.0):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Kill anything left in the group (the server itself or children it spawned).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


@atexit.register
def _stop_all():
    for srv in list(_LIVE):
        try:
            srv.stop(grace=2.0)
        except Exception:
            pass
