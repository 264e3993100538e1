#!/usr/bin/env python3
"""The main job end to end: a real headless ComfyUI runs the shipped quadtree upscale workflow.

    make demo                                   # provisions the runtime, then runs this script
    .cache/venv/bin/python scripts/demo.py [--model local|tiny_sd15] [--steps 20] [--scale 1.5]

What it does (no GPU, no downloaded weights, no network):

1. generates the sample photograph (``scripts/make_sample_photo.py``: procedural, seeded, same
   licence as this repository);
2. starts real ComfyUI headless with this node pack and the test fixture node pack installed
   (``tests/server.py``'s harness, in a throw-away base directory);
3. uploads the photo through ``POST /upload/image``;
4. takes ``example_workflows/api/quadtree_img2img_upscale.json`` (the API form of the shipped
   template), substitutes the fixture model loader ``QTDTestCheckpointLoader`` for
   ``CheckpointLoaderSimple`` (its MODEL/CLIP/VAE outputs map 1:1), applies the CPU-sized
   overrides printed below, queues it through ``POST /prompt`` and times every node from the
   server's websocket events;
5. runs the workflow once with sampling at 2 steps (every node executes, one-time costs are
   paid), then as set (ComfyUI re-runs only KSampler -> decode -> save), then two comparison
   runs that differ only where stated: all tiles at full strength (``variable_denoise`` = off)
   and untiled (``KSampler`` on the plain model); wall and server CPU seconds of each;
6. writes to ``<repo>/output/``: ``sample_photo.png``, ``quadtree_visualisation.png``,
   ``result.png``, ``report.json``, ``report.txt``, ``workflow_api.json`` (the prompt as sent)
   and ``comfyui_server.log``;
7. always shuts the server down.

The fixture model is a tiny seeded network, not a trained checkpoint: the result shows the
mechanics (tiles, per-tile strength, seamless blending, model calls), not image quality.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
WORKFLOW = os.path.join(REPO, "example_workflows", "api", "quadtree_img2img_upscale.json")
OUTPUT = os.path.join(REPO, "output")
PHOTO_NAME = "quadtree_demo_photo.png"

RUN_DONE_RE = re.compile(r"run done: (\d+) model calls, (\d+) tile evaluations; saved (\d+) by schedule and "
                         r"(\d+) by skip \(of (\d+) for all tiles at every call\)")
QUADTREE_RE = re.compile(r"quadtree of (\d+)x(\d+)px: (\d+) tiles (\{.*?\}), denoise ([\d.]+) to ([\d.]+)")
PROMPT_TIME_RE = re.compile(r"Prompt executed in ([\d.]+) seconds")


def load_by_path(name: str, path: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_modules():
    """The pack's pure modules (quadtree, variable_denoise), imported without its ``__init__``
    (which registers ComfyUI nodes and needs ComfyUI on the path)."""
    name = "qtd_demo_pack"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [REPO]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.quadtree"), importlib.import_module(f"{name}.variable_denoise")


# ------------------------------------------------------------------------------------------
# websocket timing
# ------------------------------------------------------------------------------------------

class EventRecorder(threading.Thread):
    """Records the server's websocket events for our client id, with arrival times."""

    def __init__(self, url: str, client_id: str):
        super().__init__(daemon=True)
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.events: list[tuple[float, dict]] = []
        self.ready = threading.Event()
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def run(self):
        try:
            asyncio.run(self._main())
        except Exception as e:  # the server going away ends the thread
            self.error = e
        finally:
            self.ready.set()

    async def _main(self):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, heartbeat=30) as ws:
                self.ready.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            data = json.loads(msg.data)
                        except ValueError:
                            continue
                        with self._lock:
                            self.events.append((time.monotonic(), data))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

    def node_times(self, prompt_id: str, end_time: float) -> list[tuple[str, float]]:
        """[(node id, seconds)] in execution order: from each node's 'executing' event to the next."""
        with self._lock:
            evs = [(t, e["data"]) for t, e in self.events
                   if e.get("type") == "executing" and e.get("data", {}).get("prompt_id") == prompt_id]
        out = []
        for k, (t, d) in enumerate(evs):
            node = d.get("node")
            if node is None:
                continue
            t_next = evs[k + 1][0] if k + 1 < len(evs) else end_time
            out.append((str(node), t_next - t))
        return out

    def cached_nodes(self, prompt_id: str) -> list[str]:
        with self._lock:
            for _, e in self.events:
                if e.get("type") == "execution_cached" and e.get("data", {}).get("prompt_id") == prompt_id:
                    return [str(n) for n in e["data"].get("nodes", [])]
        return []


# ------------------------------------------------------------------------------------------
# workflow preparation
# ------------------------------------------------------------------------------------------

def substitute_fixture_loader(prompt: dict, kind: str, seed: int = 0) -> list[str]:
    """Replace every CheckpointLoaderSimple by a fixture loader with the same outputs
    (MODEL, CLIP, VAE): QTDTestDenoiserLoader for kind 'denoiser', else QTDTestCheckpointLoader."""
    changed = []
    for nid, node in prompt.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            if kind == "denoiser":
                node["class_type"], node["inputs"] = "QTDTestDenoiserLoader", {"seed": seed}
            else:
                node["class_type"], node["inputs"] = "QTDTestCheckpointLoader", {"kind": kind, "seed": seed}
            node.setdefault("_meta", {})["title"] = f"fixture model ({kind})"
            changed.append(nid)
    return changed


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def one(prompt: dict, class_type: str) -> str:
    ids = nodes_of(prompt, class_type)
    if len(ids) != 1:
        raise SystemExit(f"the workflow should have exactly one {class_type} node, found {ids}")
    return ids[0]


def prepare(prompt: dict, args, photo_name: str) -> tuple[dict, list[str]]:
    p = copy.deepcopy(prompt)
    notes = []
    for nid in substitute_fixture_loader(p, args.model):
        notes.append(f"node {nid}: CheckpointLoaderSimple -> {p[nid]['class_type']}({p[nid]['inputs']})")
    li = one(p, "LoadImage")
    p[li]["inputs"]["image"] = photo_name
    notes.append(f"node {li} LoadImage.image = {photo_name} (the generated sample photo)")
    overrides = [("ImageScaleBy", "scale_by", args.scale), ("QuadtreeVisualizer", "min_tile_size", args.min_tile),
                 ("KSampler", "steps", args.steps)]
    for ctype, key, value in overrides:
        nid = one(p, ctype)
        old = p[nid]["inputs"][key]
        if old != value:
            p[nid]["inputs"][key] = value
            notes.append(f"node {nid} {ctype}.{key}: {old} -> {value} (CPU-sized demo)")
    for nid in nodes_of(p, "SaveImage"):
        prefix = p[nid]["inputs"]["filename_prefix"]
        p[nid]["inputs"]["filename_prefix"] = "demo/" + prefix.split("/")[-1]
    return p, notes


def variant_all_tiles(prompt: dict) -> dict:
    p = copy.deepcopy(prompt)
    p[one(p, "QuadtreeDiffusion")]["inputs"]["variable_denoise"] = "off"
    for nid in nodes_of(p, "SaveImage"):
        p[nid]["inputs"]["filename_prefix"] += "_alltiles"
    return p


def variant_untiled(prompt: dict) -> dict:
    """KSampler on the model that feeds QuadtreeDiffusion (the tiling node bypassed)."""
    p = copy.deepcopy(prompt)
    qd = one(p, "QuadtreeDiffusion")
    ks = one(p, "KSampler")
    p[ks]["inputs"]["model"] = list(p[qd]["inputs"]["model"])
    del p[qd]
    for nid in nodes_of(p, "SaveImage"):
        p[nid]["inputs"]["filename_prefix"] += "_untiled"
    return p


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------

def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def parse_run_done(text: str) -> list[dict]:
    keys = ("model_calls", "tile_evaluations", "saved_by_schedule", "saved_by_skip", "all_tiles_every_call")
    return [dict(zip(keys, map(int, m.groups()))) for m in RUN_DONE_RE.finditer(text)]


def parse_quadtree(text: str) -> dict | None:
    found = list(QUADTREE_RE.finditer(text))
    if not found:
        return None
    m = found[-1]
    hist = json.loads(m.group(4).replace("'", '"'))
    return {"width": int(m.group(1)), "height": int(m.group(2)), "tiles": int(m.group(3)),
            "size_histogram": hist, "denoise_range": [float(m.group(5)), float(m.group(6))]}


def layout_from_photo(qt, photo_path: str, prompt: dict):
    """Rebuild the quadtree the server built: ComfyUI's ImageScaleBy 'lanczos' is PIL's LANCZOS on
    the 8-bit image, then QuadtreeVisualizer's settings go to the pack's build_quadtree."""
    import numpy as np
    import torch
    from PIL import Image

    sc = prompt[one(prompt, "ImageScaleBy")]["inputs"]
    vis = prompt[one(prompt, "QuadtreeVisualizer")]["inputs"]
    img = Image.open(photo_path).convert("RGB")
    if sc["upscale_method"] != "lanczos":
        return None, None
    w, h = round(img.width * sc["scale_by"]), round(img.height * sc["scale_by"])
    img = img.resize((w, h), resample=Image.Resampling.LANCZOS)
    t = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    return qt.build_quadtree(t, vis["content_threshold"], max(vis["min_tile_size"], qt.MIN_TILE),
                             vis["max_tile_size"], vis["min_denoise"], vis["max_denoise"]), t


def change_by_denoise(layout, upscaled, result_path: str, map_path: str) -> dict:
    """How much sampling changed each tile: mean |result - upscaled input| (0-255 units, on 8x8
    block means, i.e. at the latent's resolution) over each tile core, averaged per denoise
    level. Also writes a heat map of the change with the tile borders."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    res = torch.from_numpy(np.asarray(Image.open(result_path).convert("RGB")).astype(np.float32) / 255.0)
    H, W = min(res.shape[0], upscaled.shape[0]) // 8 * 8, min(res.shape[1], upscaled.shape[1]) // 8 * 8
    pool = lambda a: torch.nn.functional.avg_pool2d(a[:H, :W].permute(2, 0, 1)[None], 8)[0]  # noqa: E731
    diff = (pool(res) - pool(upscaled)).abs().mean(dim=0) * 255.0          # [H/8, W/8]
    per_level: dict[str, list] = {}
    for t in layout.tiles:
        y0, y1, x0, x1 = t.y // 8, (t.y + t.h) // 8, t.x // 8, (t.x + t.w) // 8
        per_level.setdefault(f"{t.denoise:.4f}", []).append(float(diff[y0:y1, x0:x1].mean()))
    out = {k: round(sum(v) / len(v), 2) for k, v in sorted(per_level.items())}
    heat = (diff / max(1e-6, float(diff.max()))).clamp(0, 1)
    rgb = torch.stack([heat, heat ** 2, 0.25 * (1 - heat)], dim=-1)
    img = Image.fromarray((rgb.numpy() * 255).astype(np.uint8)).resize((W, H), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for t in layout.tiles:
        d.rectangle([t.x, t.y, t.x + t.w - 1, t.y + t.h - 1], outline=(90, 160, 255))
    img.save(map_path)
    return out


def fmt_table(rows, header) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def write_report(report: dict, path_txt: str):
    L = []
    lay = report["layout"]
    L.append("Quadtree Tiled Diffusion - demo report")
    L.append("=" * 38)
    L.append(f"ComfyUI {report['comfyui_version']}, model: fixture '{report['settings']['model']}' "
             f"(tiny seeded network standing in for a checkpoint), CPU")
    L.append(f"photo {report['photo']['size']} -> upscaled canvas {lay['width']}x{lay['height']} px "
             f"(latent {lay['width'] // 8}x{lay['height'] // 8}), {report['settings']['steps']} steps, "
             f"method {report['settings']['method']}, variable_denoise {report['settings']['variable_denoise']}")
    L.append("")
    L.append(f"Tiles: {lay['tiles']}")
    L += ["  " + s for s in fmt_table([[k, v] for k, v in lay["size_histogram"].items()], ["tile size (px)", "count"])]
    L.append("")
    L.append("Per-tile denoise:")
    L += ["  " + s for s in fmt_table([[f"{float(k):.2f}", v, report['denoise_active_steps'][k]]
                                       for k, v in lay["denoise_histogram"].items()],
                                      ["denoise", "tiles", "active steps (of %d)" % report["settings"]["steps"]])]
    L.append("")
    L.append("How much sampling changed the tiles (mean |result - upscaled input|, 0-255, at latent resolution):")
    L += ["  " + s for s in fmt_table([[f"{float(k):.2f}", v] for k, v in report["mean_change_by_denoise"].items()],
                                      ["denoise", "mean change"])]
    L.append("")
    mc = report["model_calls"]
    L.append("Model calls (one call = the sampler asking the model once, cond+uncond batched):")
    rows = [["quadtree, schedule (this workflow)", mc["quadtree"]["model_calls"], mc["quadtree"]["tile_evaluations"],
             f"{mc['quadtree']['evaluated_area_vs_untiled']:.2f}"],
            ["quadtree, all tiles every step (off)", mc["all_tiles"]["model_calls"],
             mc["all_tiles"]["tile_evaluations"], f"{mc['all_tiles']['evaluated_area_vs_untiled']:.2f}"],
            ["untiled (plain KSampler)", mc["untiled"]["model_calls"], "-", "1.00"]]
    L += ["  " + s for s in fmt_table(rows, ["run", "model calls", "tile evaluations",
                                             "latent area evaluated / untiled"])]
    L.append(f"  schedule saved {mc['quadtree']['saved_by_schedule']} of {mc['quadtree']['all_tiles_every_call']} "
             f"tile evaluations ({mc['quadtree']['saved_fraction'] * 100:.0f}%); "
             f"predicted from the layout: {mc['quadtree']['predicted_tile_evaluations']} evaluations "
             f"(variable_denoise.schedule_model_calls)")
    L.append("")
    L.append("Wall time per stage (s):")
    st = report["timings_s"]
    rows = [[k, f"{v:.2f}"] for k, v in st["stages"].items()]
    L += ["  " + s for s in fmt_table(rows, ["stage", "seconds"])]
    L.append("  nodes (each timed in the run where it executed: 'first' = every node, sampling at 2 steps;")
    L.append("  'main' = the re-run of KSampler -> decode -> save at the set steps):")
    rows = [[f"{n['node']} {n['class_type']}", n["run"], f"{n['seconds']:.2f}"] for n in st["nodes"]]
    L += ["    " + s for s in fmt_table(rows, ["node", "run", "seconds"])]
    L.append("  sampling runs (KSampler -> decode -> save; server CPU seconds are less sensitive to other load):")
    rows = [[k, f"{v['wall_s']:.2f}", f"{v['server_cpu_s']:.2f}"] for k, v in st["sampling_runs"].items()]
    L += ["    " + s for s in fmt_table(rows, ["run", "wall s", "server CPU s"])]
    L.append("")
    L.append("Files:")
    for k, v in report["files"].items():
        L.append(f"  {k}: {v}")
    L.append("")
    L.append("Workflow changes for this CPU demo:")
    L += ["  " + n for n in report["workflow_changes"]]
    text = "\n".join(L) + "\n"
    with open(path_txt, "w", encoding="utf-8") as f:
        f.write(text)
    return text


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the shipped quadtree upscale workflow on real ComfyUI (CPU).")
    ap.add_argument("--model", default="denoiser", choices=("denoiser", "local", "tiny_sd15"),
                    help="fixture model standing in for the checkpoint: denoiser (default; "
                         "QTDTestDenoiserLoader, a blur denoiser, so the result is a picture), or a "
                         "random-weight QTDTestCheckpointLoader kind (its result is noise)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.5, help="ImageScaleBy factor (default 1.5: 512 -> 768 px)")
    ap.add_argument("--min-tile", type=int, default=64, help="QuadtreeVisualizer min_tile_size (default 64)")
    ap.add_argument("--photo-size", type=int, default=512)
    ap.add_argument("--output", default=OUTPUT)
    ap.add_argument("--no-compare", action="store_true", help="skip the all-tiles and untiled comparison runs")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per prompt")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    stages: dict[str, float] = {}
    out_dir = os.path.abspath(args.output)
    os.makedirs(out_dir, exist_ok=True)

    qtd_server = load_by_path("qtd_server", os.path.join(REPO, "tests", "server.py"))
    photo_mod = load_by_path("qtd_sample_photo", os.path.join(REPO, "scripts", "make_sample_photo.py"))
    qt, vd = pack_modules()

    t = time.monotonic()
    photo_path = os.path.join(out_dir, "sample_photo.png")
    photo = photo_mod.make_photo(args.photo_size, photo_mod.DEFAULT_SEED)
    photo.save(photo_path)
    stages["generate sample photo"] = time.monotonic() - t
    print(f"[demo] sample photo ({photo.width}x{photo.height}, generated, seed {photo_mod.DEFAULT_SEED}): {photo_path}")

    with open(WORKFLOW, encoding="utf-8") as f:
        shipped = json.load(f)
    prompt, changes = prepare(shipped, args, PHOTO_NAME)
    with open(os.path.join(out_dir, "workflow_api.json"), "w", encoding="utf-8") as f:
        json.dump(prompt, f, indent=2)
    print(f"[demo] workflow: {os.path.relpath(WORKFLOW, REPO)}")
    for n in changes:
        print(f"[demo]   {n}")

    base = tempfile.mkdtemp(prefix="qtd-demo-")
    srv = qtd_server.ComfyServer(base)
    report: dict = {}
    try:
        t = time.monotonic()
        print("[demo] starting ComfyUI (headless, CPU) ...", flush=True)
        srv.start()
        stages["start ComfyUI server"] = time.monotonic() - t
        stats = srv.get("/system_stats").json()
        comfy_version = stats.get("system", {}).get("comfyui_version", "?")
        print(f"[demo] ComfyUI {comfy_version} at {srv.url} (base dir {base})")

        rec = EventRecorder(srv.url, srv.client_id)
        rec.start()
        rec.ready.wait(10)

        t = time.monotonic()
        with open(photo_path, "rb") as f:
            r = srv.post("/upload/image", files={"image": (PHOTO_NAME, f, "image/png")},
                         data={"overwrite": "true", "type": "input"})
        r.raise_for_status()
        stages["upload photo (POST /upload/image)"] = time.monotonic() - t

        def run(p, label):
            c0, t0 = process_cpu_seconds(srv.proc.pid), time.monotonic()
            pid = srv.queue(p)
            entry = srv.wait(pid, timeout=args.timeout)
            t1, c1 = time.monotonic(), process_cpu_seconds(srv.proc.pid)
            if entry.get("status", {}).get("status_str") != "success":
                raise qtd_server.PromptFailed(f"{label} failed:\n{qtd_server.execution_error_text(entry)}", entry)
            time.sleep(0.2)  # let the final websocket events arrive
            nodes = [{"node": nid, "class_type": p[nid]["class_type"], "seconds": round(s, 3)}
                     for nid, s in rec.node_times(pid, t1)]
            cpu = (c1 - c0) if c0 is not None and c1 is not None else float("nan")
            print(f"[demo] {label}: {t1 - t0:.1f}s wall, {cpu:.1f}s server CPU", flush=True)
            return entry, t1 - t0, nodes, cpu

        ks = one(prompt, "KSampler")
        # 1. The whole workflow once at 2 steps: every node runs (their times are reported from
        #    here) and the one-time costs (model load, first tiled call) are paid. ComfyUI keeps
        #    the outputs of nodes whose inputs do not change, so the runs after it re-run only
        #    KSampler -> Quadtree VAE Decode -> SaveImage: their times compare sampling with sampling.
        first = copy.deepcopy(prompt)
        first[ks]["inputs"].update(steps=2, seed=int(prompt[ks]["inputs"]["seed"]) + 1)
        first_entry, stages["first run: every node, sampling at 2 steps"], first_nodes, _ = run(
            first, "first run (every node; sampling at 2 steps)")

        # 2. The workflow as set.
        log_before = len(srv.log_text())
        entry, dt_main, main_nodes, cpu_main = run(prompt, "quadtree upscale workflow")
        stages["main run: sampling as set (KSampler -> decode -> save)"] = dt_main
        main_log = srv.log_text()[log_before:]
        sampling = {"quadtree": {"wall_s": dt_main, "server_cpu_s": cpu_main}}

        vis_save = [nid for nid in nodes_of(prompt, "SaveImage")
                    if prompt[nid]["inputs"]["images"][0] == one(prompt, "QuadtreeVisualizer")]
        res_save = [nid for nid in nodes_of(prompt, "SaveImage") if nid not in vis_save]
        files = {"sample photo": photo_path}
        for nids, name in ((vis_save, "quadtree_visualisation.png"), (res_save, "result.png")):
            paths = [pth for nid in nids for pth in srv.output_images(entry, nid)]
            if not paths:  # a cached output node: its image was written by the first run
                paths = [pth for nid in nids for pth in srv.output_images(first_entry, nid)]
            if not paths:
                raise RuntimeError(f"the workflow produced no image for {name}: outputs {entry.get('outputs')}")
            dst = os.path.join(out_dir, name)
            shutil.copyfile(paths[0], dst)
            files[name.rsplit(".", 1)[0].replace("_", " ")] = dst

        runs = {"quadtree": parse_run_done(main_log)}
        if not args.no_compare:
            log_before = len(srv.log_text())
            _, dt, _, cpu = run(variant_all_tiles(prompt), "comparison: all tiles every step (variable_denoise off)")
            stages["comparison run: all tiles every step"] = dt
            runs["all_tiles"] = parse_run_done(srv.log_text()[log_before:])
            sampling["all_tiles"] = {"wall_s": dt, "server_cpu_s": cpu}
            _, dt, _, cpu = run(variant_untiled(prompt), "comparison: untiled KSampler")
            stages["comparison run: untiled"] = dt
            sampling["untiled"] = {"wall_s": dt, "server_cpu_s": cpu}
        main_ids = {n["node"] for n in main_nodes}
        node_times = ([dict(n, run="first") for n in first_nodes if n["node"] not in main_ids]
                      + [dict(n, run="main") for n in main_nodes])
        server_log = srv.log_text()
    finally:
        t = time.monotonic()
        srv.stop()
        stages["stop server"] = time.monotonic() - t
        log_copy = os.path.join(out_dir, "comfyui_server.log")
        try:
            shutil.copyfile(srv.log_path, log_copy)
        except OSError:
            pass
        shutil.rmtree(base, ignore_errors=True)
        print("[demo] server stopped", flush=True)

    # ---- numbers
    if not runs["quadtree"]:
        raise RuntimeError("the server log has no '[Quadtree Diffusion] run done' line: was the model tiled?")
    qrun = runs["quadtree"][-1]
    qlog = parse_quadtree(server_log)
    layout, upscaled = layout_from_photo(qt, photo_path, prompt)
    if layout is None or qlog is None or layout.size_histogram() != qlog["size_histogram"]:
        raise RuntimeError(f"could not reproduce the server's quadtree: log {qlog}, local "
                           f"{layout.size_histogram() if layout else None}")
    change_map = os.path.join(out_dir, "change_map.png")
    change = change_by_denoise(layout, upscaled, files["result"], change_map)
    files["change map"] = change_map
    steps = prompt[ks]["inputs"]["steps"]
    dens = [t.denoise for t in layout.tiles]
    dhist: dict[str, int] = {}
    active: dict[str, int] = {}
    for d in sorted(dens):
        k = f"{d:.4f}"
        dhist[k] = dhist.get(k, 0) + 1
        active[k] = vd.active_steps(d, steps)
    predicted = vd.schedule_model_calls(dens, steps)
    if predicted != qrun["tile_evaluations"]:
        print(f"[demo] WARNING: the engine made {qrun['tile_evaluations']} tile evaluations, the layout's "
              f"schedule predicts {predicted} (variable_denoise.schedule_model_calls)")
    # latent area evaluated, from the engine's own windows for this layout
    area = evaluated_area(layout, prompt, steps, vd)
    canvas_area = (layout.width // 8) * (layout.height // 8)
    untiled_calls = steps  # a plain KSampler calls the model once per step (euler)

    def area_ratio(kind):
        return area[kind] / (untiled_calls * canvas_area) if area.get(kind) else float("nan")

    mc = {"quadtree": dict(qrun, predicted_tile_evaluations=predicted,
                           saved_fraction=(qrun["saved_by_schedule"] + qrun["saved_by_skip"]) / qrun["all_tiles_every_call"],
                           evaluated_area_vs_untiled=area_ratio("schedule")),
          "untiled": {"model_calls": untiled_calls}}
    if "all_tiles" in runs and runs["all_tiles"]:
        mc["all_tiles"] = dict(runs["all_tiles"][-1], evaluated_area_vs_untiled=area_ratio("all"))
    else:
        mc["all_tiles"] = {"model_calls": qrun["model_calls"], "tile_evaluations": qrun["all_tiles_every_call"],
                           "evaluated_area_vs_untiled": area_ratio("all")}

    prompt_time = [float(x) for x in PROMPT_TIME_RE.findall(server_log)]
    stages["total (this script)"] = time.monotonic() - t_start
    qd_inputs = prompt[one(prompt, "QuadtreeDiffusion")]["inputs"]
    report = {
        "comfyui_version": comfy_version,
        "photo": {"path": photo_path, "size": f"{photo.width}x{photo.height}", "generator": "scripts/make_sample_photo.py",
                  "seed": photo_mod.DEFAULT_SEED, "licence": "generated; same licence as this repository (GPL-3.0)"},
        "settings": {"model": args.model, "steps": steps, "method": qd_inputs["method"],
                     "variable_denoise": qd_inputs["variable_denoise"], "tile_overlap": qd_inputs["tile_overlap"],
                     "quadtree": {k: v for k, v in prompt[one(prompt, "QuadtreeVisualizer")]["inputs"].items()
                                  if not isinstance(v, list)}},
        "layout": {"width": layout.width, "height": layout.height, "tiles": len(layout.tiles),
                   "size_histogram": layout.size_histogram(), "denoise_histogram": dhist,
                   "server_log": qlog},
        "denoise_active_steps": active,
        "mean_change_by_denoise": change,
        "model_calls": mc,
        "timings_s": {"stages": {k: round(v, 3) for k, v in stages.items()},
                      "nodes": node_times,
                      "sampling_runs": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sampling.items()},
                      "server_prompt_executed_s": prompt_time},
        "files": {**files, "report.json": os.path.join(out_dir, "report.json"),
                  "report.txt": os.path.join(out_dir, "report.txt"),
                  "workflow_api.json": os.path.join(out_dir, "workflow_api.json"),
                  "server log": os.path.join(out_dir, "comfyui_server.log")},
        "workflow_changes": changes,
    }
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = write_report(report, os.path.join(out_dir, "report.txt"))
    print()
    print(text)
    print(f"[demo] done in {stages['total (this script)']:.1f}s; files in {out_dir}:")
    for k, v in report["files"].items():
        print(f"[demo]   {k}: {v}")
    return 0


def evaluated_area(layout, prompt: dict, steps: int, vd) -> dict:
    """Latent pixels the model evaluates over the run, from the engine's window plan for this layout:
    schedule = sum over windows of area * active steps; all = sum of window areas * steps."""
    try:
        tp = importlib.import_module("qtd_demo_pack.tile_plan")
        import torch
        qi = prompt[one(prompt, "QuadtreeDiffusion")]["inputs"]
        cfg = tp.TileConfig(method=qi["method"], enable_overlap=bool(qi["enable_overlap"]),
                            tile_overlap=int(qi["tile_overlap"]), tile_batch_size=int(qi["tile_batch_size"]),
                            skip_below=int(qi["skip_diffusion_below"]), variable_denoise=qi["variable_denoise"],
                            tile_width=int(qi["tile_width"]), tile_height=int(qi["tile_height"]), layout=layout)
        plan = tp.plan_for(cfg, layout.height // 8, layout.width // 8, 8, 1, "cpu", torch.float32)
        sched = sum((w.size[0] * w.size[1]) * (0 if w.skipped else vd.active_steps(w.denoise, steps))
                    for w in plan.windows)
        full = sum(w.size[0] * w.size[1] for w in plan.windows) * steps
        return {"schedule": sched, "all": full}
    except Exception as e:  # the numbers above stay; only the area ratio is missing
        print(f"[demo] (could not plan windows for the area ratio: {e})")
        return {}


if __name__ == "__main__":
    sys.exit(main())
