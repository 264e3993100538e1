"""Prompt builders and output readers for the reliability tests (issue 6).

Loaded by file path as module ``qtd_reliability`` (see :func:`load`), like conftest.py loads
``qtd_fixtures``/``qtd_server``: pytest runs in importlib mode, so tests/ is not on sys.path.

* :func:`widget_defaults` / :func:`node`: API-format nodes with the defaults the frontend fills in.
* :func:`tiled_prompt`: one KSampler workflow through QuadtreeDiffusion (grid or quadtree, txt2img
  or img2img, batch 1-2, optional SpotDiffusion parameters) ending in ``SaveLatent`` (node "out"),
  so outputs are compared as exact float tensors.
* :func:`run_with_log`: queue + wait, returning the history entry and the server-log text the
  prompt produced (the server runs one prompt at a time, so the log slice is that prompt's).
* :func:`saved_latents`, :func:`engine_lines`, :func:`status_messages`, :func:`rss`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import torch

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
PACK_PREFIXES = ("[Quadtree Diffusion]", "[Quadtree Variable Denoise]", "[Quadtree Skip]")


def load():
    """This module as ``qtd_reliability`` (idempotent)."""
    name = "qtd_reliability"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.realpath(__file__))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- prompt building

def widget_defaults(object_info: dict, class_type: str) -> dict:
    """Default values of a node's widget inputs, as the frontend would fill them in."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in object_info[class_type]["input"].get(section, {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):
                out[name] = opts.get("default", kind[0] if kind else None)
            elif kind == "COMBO":
                out[name] = opts.get("default", (opts.get("options") or [None])[0])
            elif "default" in opts:
                out[name] = opts["default"]
    return out


def node(object_info: dict, class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": {**widget_defaults(object_info, class_type), **inputs}}


def photo_name(width: int, height: int, seed: int = 0) -> str:
    return f"qtd_rel_{width}x{height}_{seed}.png"


def ensure_photo(srv, width: int, height: int, seed: int = 0) -> str:
    """A synthetic photo in the server's input folder; returns its LoadImage name."""
    import qtd_fixtures as fx
    name = photo_name(width, height, seed)
    path = os.path.join(srv.input_dir, name)
    if not os.path.isfile(path):
        fx.save_image(fx.synthetic_photo(width, height, seed=seed), path)
    return name


def tiled_prompt(oi: dict, *, model_kind: str = "local", model_seed: int = 0,
                 method: str = "Mixture of Diffusers", mode: str = "schedule", layout: str = "grid",
                 enable_overlap: bool = True, overlap: int = 16, tile_batch_size: int = 4,
                 tile_width: int = 64, tile_height: int = 64, skip_below: int = 0,
                 sampler: str = "euler", scheduler: str = "normal", steps: int = 3, cfg: float = 5.0,
                 seed: int = 0, denoise: float = 1.0, width: int = 128, height: int = 128, batch: int = 1,
                 image: str | None = None, image2: str | None = None, image_batch: int = 1,
                 latent: str | None = None, content_threshold: float = 10.0, min_tile_size: int = 32,
                 max_tile_size: int = 128, min_denoise: float = 0.3, max_denoise: float = 0.9,
                 spot: dict | None = None, text: str = "a landscape photo", negative: str = "blurry",
                 prefix: str = "qtd_rel") -> dict:
    """One tiled KSampler workflow; node ids are stable names ("model", "tiled", "ksampler", "out").

    Images: ``image`` (a LoadImage name), optionally batched with ``image2`` (ImageBatch) or
    repeated ``image_batch`` times (RepeatImageBatch); ``layout="quadtree"`` builds the layout
    on that image batch.  ``latent``: "empty" (EmptyLatentImage ``width`` x ``height`` x
    ``batch``), "image" (VAEEncode of ``image`` alone) or "images" (VAEEncode of the image
    batch); default "image" with an image, else "empty".  For "image"/"images", ``batch`` > 1
    repeats the latent (RepeatLatentBatch).
    """
    p = {
        "model": node(oi, "QTDTestCheckpointLoader", kind=model_kind, seed=model_seed),
        "pos": node(oi, "QTDTestConditioning", text=text),
        "neg": node(oi, "QTDTestConditioning", text=negative),
    }
    latent = latent or ("image" if image is not None else "empty")
    img_ref = None
    if image is not None:
        p["img"] = node(oi, "LoadImage", image=image)
        img_ref = ["img", 0]
        if image2 is not None:
            p["img2"] = node(oi, "LoadImage", image=image2)
            p["imgs"] = node(oi, "ImageBatch", image1=["img", 0], image2=["img2", 0])
            img_ref = ["imgs", 0]
        elif image_batch > 1:
            p["imgs"] = node(oi, "RepeatImageBatch", image=["img", 0], amount=image_batch)
            img_ref = ["imgs", 0]
    if latent == "empty":
        p["enc"] = node(oi, "EmptyLatentImage", width=width, height=height, batch_size=batch)
    else:
        if image is None:
            raise ValueError("an encoded latent needs an image")
        p["enc"] = node(oi, "VAEEncode", pixels=["img", 0] if latent == "image" else img_ref, vae=["model", 2])
        if batch > 1:
            p["rep"] = node(oi, "RepeatLatentBatch", samples=["enc", 0], amount=batch)
    latent_ref = ["rep", 0] if "rep" in p else ["enc", 0]
    model = ["model", 0]
    if spot is not None:
        p["spot"] = node(oi, "SpotDiffusionParams_QuadtreeDiffusion", model=model, **spot)
        model = ["spot", 0]
    tiled = dict(model=model, method=method, enable_overlap=enable_overlap, tile_overlap=overlap,
                 tile_batch_size=tile_batch_size, skip_diffusion_below=skip_below, variable_denoise=mode,
                 tile_width=tile_width, tile_height=tile_height)
    if layout == "quadtree":
        if img_ref is None:
            raise ValueError("a quadtree layout needs an image")
        p["vis"] = node(oi, "QuadtreeVisualizer", image=img_ref, content_threshold=content_threshold,
                        min_tile_size=min_tile_size, min_denoise=min_denoise, max_denoise=max_denoise,
                        line_thickness=1, max_tile_size=max_tile_size)
        tiled["quadtree"] = ["vis", 1]
    p["tiled"] = node(oi, "QuadtreeDiffusion", **tiled)
    p["ksampler"] = node(oi, "KSampler", model=["tiled", 0], seed=seed, steps=steps, cfg=cfg,
                         sampler_name=sampler, scheduler=scheduler, positive=["pos", 0], negative=["neg", 0],
                         latent_image=latent_ref, denoise=denoise)
    p["out"] = node(oi, "SaveLatent", samples=["ksampler", 0], filename_prefix=prefix)
    return p


# ----------------------------------------------------------------------------- running / reading

def run_with_log(srv, prompt: dict, timeout: float = 240.0, check: bool = True):
    """(history entry, log text written while the prompt ran). ``check``: raise unless success."""
    start = len(srv.log_text())
    pid = srv.queue(prompt)
    entry = srv.wait(pid, timeout)
    time.sleep(0.05)  # the log line of the finished prompt is written before the history entry
    log = srv.log_text()[start:]
    if check and entry.get("status", {}).get("status_str") != "success":
        import qtd_server
        raise qtd_server.PromptFailed(f"prompt {pid} failed:\n{qtd_server.execution_error_text(entry)}\n"
                                      f"log:\n{log[-4000:]}", entry)
    return entry, log


def saved_latents(srv, history: dict, node_id: str = "out") -> list[torch.Tensor]:
    """The tensors SaveLatent wrote for ``node_id`` (exact float values)."""
    from safetensors.torch import load_file
    out = (history.get("outputs") or {}).get(node_id) or {}
    tensors = []
    for item in out.get("latents", []):
        root = {"output": srv.output_dir, "temp": srv.temp_dir}.get(item.get("type", "output"), srv.output_dir)
        path = os.path.join(root, item.get("subfolder", ""), item["filename"])
        tensors.append(load_file(path)["latent_tensor"])
    return tensors


def saved_latent(srv, history: dict, node_id: str = "out") -> torch.Tensor:
    ts = saved_latents(srv, history, node_id)
    assert len(ts) == 1, f"expected one saved latent from node {node_id}, got {len(ts)}"
    return ts[0]


def engine_lines(log: str) -> list[str]:
    """The pack's own log lines (prefixed "[Quadtree ...]") in a log slice."""
    out = []
    for ln in log.replace("\r", "\n").splitlines():
        starts = [ln.find(p) for p in PACK_PREFIXES if p in ln]
        if starts:  # tqdm's progress bar shares the line: keep the pack's text only
            out.append(ln[min(starts):].strip())
    return out


def status_messages(entry: dict) -> list[tuple[str, dict]]:
    return [(m[0], m[1]) for m in (entry or {}).get("status", {}).get("messages", [])
            if isinstance(m, (list, tuple)) and len(m) == 2]


def message(entry: dict, event: str) -> dict | None:
    for ev, data in status_messages(entry):
        if ev == event:
            return data
    return None


def cached_nodes(entry: dict) -> set:
    data = message(entry, "execution_cached")
    return set(data.get("nodes", [])) if data else set()


def rss(srv) -> int:
    """Resident memory (bytes) of the server process."""
    import psutil
    return psutil.Process(srv.proc.pid).memory_info().rss


def post_prompt(srv, prompt: dict):
    """Raw POST /prompt: (HTTP status, JSON body) without raising on validation errors."""
    r = srv.post("/prompt", json={"prompt": prompt, "client_id": srv.client_id})
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def node_errors(body, node_id: str) -> list[dict]:
    return ((body or {}).get("node_errors") or {}).get(node_id, {}).get("errors", [])


# ----------------------------------------------------------------------------- example workflows

# Example workflows made for a current ComfyUI: {name: [(node type, an input the example sets)]}. On a
# ComfyUI whose node lacks that input (0.3.75's Wan Context Windows predates freenoise), the tests of
# that example skip with the reason (feature detection on /object_info, never a version string).
EXAMPLE_NEEDS = {"wan_video_upscale_context_windows": [("WanContextWindowsManual", "freenoise"),
                                                       ("CreateVideo", "bit_depth")]}


def example_unsupported(name: str, object_info: dict) -> str | None:
    """Why the server cannot take example workflow ``name`` as shipped, or None."""
    for node, name_in in EXAMPLE_NEEDS.get(name, []):
        info = object_info.get(node)
        inputs = {} if info is None else {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        if name_in not in inputs:
            return f"{name}: this ComfyUI's {node} has no input {name_in!r} (the example is made for ComfyUI 0.28+)"
    return None
