"""The shipped example workflows (``example_workflows/``) against a REAL ComfyUI server.

* every UI-format workflow is checked against the server's ``/object_info``: every node type is
  known, the widget values line up with the node's widget inputs (in input order, with the
  frontend's extra ``control_after_generate`` / upload values) and lie in range or in the combo
  list (model and image file names are free strings: no weights or inputs exist here), every
  link is type-correct on both ends and every required link input is connected;
* the API form of each workflow is the same graph as its UI form;
* ComfyUI's template browser lists exactly the UI forms (``GET /workflow_templates``) and serves
  them and their thumbnails (``/api/workflow_templates/<pack folder>/<name>.json`` / ``.jpg``);
* every API form runs (``POST /prompt``) with fixture nodes standing in for the checkpoint and
  ControlNet loaders, for a model template's split loaders (UNETLoader / CLIPLoader / VAELoader:
  a tiny model of the family from ``tests/families.py`` that logs what each call is given, the
  fixture CLIP and a tiny real VAE with the family's latent) and for the captioner (``QTDTestCaptioner`` for ComfyUI's Generate Text,
  whose model cannot be downloaded here) and with CPU-sized canvases and step counts, and the engine's log shows that
  the sampling was tiled (in the Flux.2 Klein edit upscale, with the reference image cropped to every tile); the Quadtree VAE nodes run exactly with a real (tiny) ComfyUI VAE
  (``QTDTestVAELoader``, in the img2img upscale) and fall back to ComfyUI's tiled VAE, with their
  log line, with the checkpoint fixture's stand-in VAE (the other workflows).
"""
import copy
import glob
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import qtd_fixtures as fx
import qtd_reliability as rl

pytestmark = pytest.mark.slow

REPO = fx.REPO_ROOT
WF_DIR = os.path.join(REPO, "example_workflows")
UI_FILES = sorted(glob.glob(os.path.join(WF_DIR, "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in UI_FILES]
EXPECTED = {"quadtree_img2img_upscale", "grid_txt2img_large", "spotdiffusion_txt2img",
            "quadtree_upscale_tile_controlnet", "quadtree_upscale_tile_prompts", "wan_video_upscale_context_windows",
            "quadtree_noise_inversion_upscale", "flux2_klein_edit_upscale"}
PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"   # a V3 combo whose chosen option brings its own inputs (ComfyUI 0.8+)
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_WIDGETS = ("seed", "noise_seed")     # the frontend adds control_after_generate to these by name
FILE_COMBOS = {"ckpt_name", "control_net_name", "image", "vae_name", "lora_name", "unet_name", "clip_name", "file"}
PROMPT_TIMEOUT = 300
RUN_DONE = re.compile(r"\[Quadtree Diffusion\] run done: (\d+) model calls, (\d+) tile evaluations")
VAE_LINE = re.compile(r"\[Quadtree VAE\] [^\n]*")
VAE_NODES = ("VAEEncodeTiled_QuadtreeDiffusion", "VAEDecodeTiled_QuadtreeDiffusion")
FRONTEND_ONLY = ("MarkdownNote", "Note")   # nodes of the frontend only: not in /object_info, not in the API form


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def api_path(name):
    return os.path.join(WF_DIR, "api", name + ".json")


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def skip_unless_supported(name: str, object_info: dict):
    """Skip an example made for a newer ComfyUI than the server (tests/reliability.py)."""
    reason = rl.example_unsupported(name, object_info)
    if reason:
        pytest.skip(reason)


# --------------------------------------------------------------------------- validation

def input_specs(info: dict) -> list:
    """[(name, type, options, required)] in the node's input order (required first)."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts, section == "required"))
    return out


def is_widget(typ) -> bool:
    return isinstance(typ, list) or typ in PRIMITIVES or typ == DYNAMIC_COMBO


def option_specs(name: str, opts: dict, value) -> list:
    """The inputs a dynamic combo's chosen option adds, named ``<combo>.<input>`` as the frontend
    and ``/prompt`` name them, in order (required first); [] for an unknown option."""
    for option in opts.get("options", []):
        if option.get("key") == value:
            inputs = option.get("inputs", {})
            return [(f"{name}.{sub}", spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {},
                     section == "required")
                    for section in ("required", "optional") for sub, spec in inputs.get(section, {}).items()]
    return []


def widget_specs(specs: list, values: list) -> tuple[list, int]:
    """([(name, type, options, index of its value, index of its control_after_generate value or
    None)] of the node's widgets in order, dynamic combos expanded by their values; how many values
    they take, the frontend's extra control / upload values included)."""
    out, queue, k = [], [s for s in specs if is_widget(s[1])], 0
    while queue:
        name, typ, opts, _req = queue.pop(0)
        if not is_widget(typ):
            continue
        value = values[k] if k < len(values) else None
        control = None
        if opts.get("control_after_generate") or (typ == "INT" and name.split(".")[-1] in SEED_WIDGETS):
            control = k + 1
        out.append((name, typ, opts, k, control))
        k += 1 + (control is not None) + bool(opts.get("image_upload") or opts.get("video_upload"))  # upload button
        if typ == DYNAMIC_COMBO:        # the chosen option's widgets follow the combo's value
            queue = option_specs(name, opts, value) + queue
    return out, k


def check_value(node_label, name, typ, opts, value) -> list:
    errs = []
    where = f"{node_label}.{name}={value!r}"
    if isinstance(typ, list) or typ in ("COMBO", DYNAMIC_COMBO):
        choices = typ if isinstance(typ, list) else opts.get("options", [])
        if typ == DYNAMIC_COMBO:
            choices = [o.get("key") for o in choices]
        if name in FILE_COMBOS:
            if not isinstance(value, str) or not value:
                errs.append(f"{where}: expected a file name")
        elif value not in choices:
            errs.append(f"{where}: not one of {choices}")
    elif typ == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            errs.append(f"{where}: expected an int")
        elif not opts.get("min", -2 ** 63) <= value <= opts.get("max", 2 ** 64):
            errs.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
    elif typ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errs.append(f"{where}: expected a number")
        elif not opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")):
            errs.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
    elif typ == "BOOLEAN":
        if not isinstance(value, bool):
            errs.append(f"{where}: expected a boolean")
    elif typ == "STRING":
        if not isinstance(value, str):
            errs.append(f"{where}: expected a string")
    return errs


def validate_ui(wf: dict, object_info: dict) -> list:
    """Every problem a user loading ``wf`` into this server would hit, as readable strings."""
    errs = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            errs.append(f"missing top-level key {key!r}")
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    links = {l[0]: l for l in wf.get("links", [])}
    if nodes and wf.get("last_node_id", 0) < max(nodes):
        errs.append("last_node_id is below the largest node id")
    if links and wf.get("last_link_id", 0) < max(links):
        errs.append("last_link_id is below the largest link id")
    for n in wf.get("nodes", []):
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs",
                    "widgets_values", "properties"):
            if key not in n:
                errs.append(f"node {n.get('id')}: missing {key!r}")
        label = f"node {n.get('id')} ({n.get('type')})"
        if n.get("type") in FRONTEND_ONLY:
            if n.get("inputs") or n.get("outputs") or not all(isinstance(v, str) for v in n.get("widgets_values", [])):
                errs.append(f"{label}: a note has no inputs or outputs, only its text")
            continue
        info = object_info.get(n.get("type"))
        if info is None:
            errs.append(f"{label}: unknown node type")
            continue
        specs = input_specs(info)
        # widget values, in input order, with the frontend's extra values
        values = list(n.get("widgets_values", []))
        linked_widgets = {i["name"] for i in n.get("inputs", []) if i.get("widget") and i.get("link") is not None}
        widgets, used = widget_specs(specs, values)
        optional = {name for name, _t, _o, req in specs if not req}
        for i, (name, typ, opts, k, control) in enumerate(widgets):
            if k >= len(values):
                # a workflow saved before optional inputs were added ends early: the frontend keeps those
                # widgets' defaults (saved workflows must load); a missing required value is an error
                if not all(w[0] in optional and "default" in w[2] for w in widgets[i:]):
                    errs.append(f"{label}: no widget value for {name!r}")
                used = k
                break
            if name not in linked_widgets:
                errs += check_value(label, name, typ, opts, values[k])
            if control is not None and (control >= len(values) or values[control] not in CONTROL_VALUES):
                errs.append(f"{label}: {name!r} must be followed by a control_after_generate value "
                            f"{CONTROL_VALUES}, got {values[control] if control < len(values) else None!r}")
        else:
            if used != len(values):
                errs.append(f"{label}: {len(values)} widget values for {used} widgets: {values}")
        # link inputs
        by_name = {name: (typ, req) for name, typ, _o, req in specs}
        slots = {i["name"]: i for i in n.get("inputs", [])}
        for name, (typ, req) in by_name.items():
            if is_widget(typ):
                continue
            slot = slots.get(name)
            if slot is None:
                if req:
                    errs.append(f"{label}: required input {name!r} has no slot")
                continue
            if slot.get("type") != typ:
                errs.append(f"{label}: input {name!r} declared {slot.get('type')}, the node takes {typ}")
            if req and slot.get("link") is None:
                errs.append(f"{label}: required input {name!r} is not connected")
        for slot in n.get("inputs", []):
            if slot["name"] not in by_name:
                errs.append(f"{label}: input {slot['name']!r} does not exist on the node")
            lid = slot.get("link")
            if lid is not None and (lid not in links or links[lid][3] != n["id"]):
                errs.append(f"{label}: input {slot['name']!r} refers to link {lid}, which does not end here")
        outs = info["output"]
        for s, o in enumerate(n.get("outputs", [])):
            if s >= len(outs) or o.get("type") != outs[s]:
                errs.append(f"{label}: output {s} is {o.get('type')}, the node gives "
                            f"{outs[s] if s < len(outs) else 'nothing'}")
            for lid in o.get("links") or []:
                if lid not in links or links[lid][1] != n["id"] or links[lid][2] != s:
                    errs.append(f"{label}: output {s} lists link {lid}, which does not start here")
    for lid, origin, oslot, target, tslot, typ in wf.get("links", []):
        src, dst = nodes.get(origin), nodes.get(target)
        if src is None or dst is None:
            errs.append(f"link {lid}: dangling ({origin} -> {target})")
            continue
        src_info, dst_info = object_info.get(src["type"]), object_info.get(dst["type"])
        if src_info is None or dst_info is None:
            continue
        out_type = src_info["output"][oslot] if oslot < len(src_info["output"]) else None
        in_name = dst["inputs"][tslot]["name"] if tslot < len(dst["inputs"]) else None
        in_type = {nm: t for nm, t, _o, _r in input_specs(dst_info)}.get(in_name)
        if not (out_type == typ == in_type):
            errs.append(f"link {lid}: {src['type']}[{oslot}] gives {out_type}, the link says {typ}, "
                        f"{dst['type']}.{in_name} takes {in_type}")
        if dst["inputs"][tslot].get("link") != lid:
            errs.append(f"link {lid}: {dst['type']}.{in_name} does not point back to it")
    return errs


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """The API prompt the frontend would make from a UI workflow (widgets by input order, links
    as [origin id, slot]); used to check that the shipped API form is the same graph."""
    out = {}
    links = {l[0]: l for l in wf["links"]}
    for n in wf["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in FRONTEND_ONLY:
            continue
        info = object_info[n["type"]]
        inputs = {}
        values = list(n["widgets_values"])
        for name, _typ, _opts, k, _control in widget_specs(input_specs(info), values)[0]:
            inputs[name] = values[k]
        for slot in n["inputs"]:
            if slot.get("link") is not None:
                l = links[slot["link"]]
                inputs[slot["name"]] = [str(l[1]), l[2]]
        out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return out


# --------------------------------------------------------------------------- tests: files

def test_the_four_example_workflows_exist_in_both_forms():
    assert set(NAMES) == EXPECTED, NAMES
    for name in NAMES:
        assert os.path.isfile(api_path(name)), f"no API form of {name}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_valid_against_object_info(name, object_info):
    skip_unless_supported(name, object_info)
    wf = load(os.path.join(WF_DIR, name + ".json"))
    assert wf["version"] == 0.4
    errs = validate_ui(wf, object_info)
    assert not errs, f"{name}.json:\n" + "\n".join(errs)


@pytest.mark.parametrize("name", NAMES)
def test_api_form_is_the_same_graph(name, object_info):
    skip_unless_supported(name, object_info)
    ui = ui_to_api(load(os.path.join(WF_DIR, name + ".json")), object_info)
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in load(api_path(name)).items()}
    assert api == ui


def test_validator_catches_broken_workflows(object_info):
    """The validator above is what the tests rely on: it must reject real mistakes."""
    good = load(os.path.join(WF_DIR, "quadtree_img2img_upscale.json"))
    assert validate_ui(good, object_info) == []

    def broken(mutate, base=good):
        wf = copy.deepcopy(base)
        mutate(wf)
        return validate_ui(wf, object_info)

    def node(wf, type_):
        return next(n for n in wf["nodes"] if n["type"] == type_)

    assert broken(lambda wf: node(wf, "QuadtreeDiffusion").update(type="NoSuchNode"))
    assert broken(lambda wf: node(wf, "QuadtreeDiffusion")["widgets_values"].__setitem__(0, "Bogus"))
    assert broken(lambda wf: node(wf, "QuadtreeVisualizer")["widgets_values"].__setitem__(2, 1.5))  # min_denoise
    assert broken(lambda wf: node(wf, "KSampler")["widgets_values"].pop(1))  # control_after_generate
    assert broken(lambda wf: node(wf, "QuadtreeDiffusion")["widgets_values"].append(3))
    # saved before reference_mode (an optional last input) existed: loads with its default; a required
    # widget's value missing does not
    assert not broken(lambda wf: node(wf, "QuadtreeDiffusion")["widgets_values"].pop())
    assert broken(lambda wf: [node(wf, "QuadtreeDiffusion")["widgets_values"].pop() for _ in range(2)])
    assert broken(lambda wf: wf["links"][0].__setitem__(5, "LATENT"))
    q = next(l for l in good["links"] if l[5] == "QUADTREE")
    assert broken(lambda wf: next(l for l in wf["links"] if l[0] == q[0]).__setitem__(2, 0))  # vis IMAGE -> quadtree

    # the per-tile prompt loop: a captioner sampling mode that does not exist, a length as text
    loop = load(os.path.join(WF_DIR, "quadtree_upscale_tile_prompts.json"))
    assert validate_ui(loop, object_info) == []
    assert broken(lambda wf: node(wf, "TextGenerate")["widgets_values"].__setitem__(2, "greedy"), loop)
    assert broken(lambda wf: node(wf, "TextGenerate")["widgets_values"].__setitem__(1, "48"), loop)
    if object_info["TextGenerate"]["input"]["required"]["sampling_mode"][0] == DYNAMIC_COMBO:
        # "on" brings six sampling widgets (temperature ... seed) whose values are missing
        assert broken(lambda wf: node(wf, "TextGenerate")["widgets_values"].__setitem__(2, "on"), loop)


def test_template_browser_lists_the_ui_forms_only(comfy_server):
    listed = comfy_server.get("/workflow_templates").json()
    folder = comfy_server.pack_folder_name
    assert sorted(listed.get(folder, [])) == sorted(NAMES), listed
    for name in NAMES:
        r = comfy_server.get(f"/api/workflow_templates/{folder}/{name}.json")
        assert r.status_code == 200, (name, r.status_code)
        assert r.json() == load(os.path.join(WF_DIR, name + ".json"))
        thumb = comfy_server.get(f"/api/workflow_templates/{folder}/{name}.jpg")  # what the browser shows
        assert thumb.status_code == 200, (name, thumb.status_code)
        with Image.open(io.BytesIO(thumb.content)) as im:
            assert im.format == "JPEG" and min(im.size) >= 128, (name, im.format, im.size)


# --------------------------------------------------------------------------- tests: runs

def substitute(prompt: dict, checkpoint_kind: str, real_vae: bool = False, constant_captions: bool = False) -> dict:
    """Fixture nodes for the loaders that need files that do not exist here (outputs map 1:1) and
    for the captioner (``QTDTestCaptioner``: a caption from each crop's colour and size, or the
    same caption for all with ``constant_captions``); with ``real_vae`` the checkpoint's VAE
    output is replaced by a tiny real ComfyUI VAE. The split loaders of a model template
    (UNETLoader, CLIPLoader, VAELoader) become the tiny model of family ``checkpoint_kind``
    (tests/families.py), the fixture CLIP and a tiny real VAE with that family's latent."""
    p = copy.deepcopy(prompt)
    ckpts = set()
    for nid, node in p.items():
        split = checkpoint_kind in FAMILY_VAE_LATENT     # a family of tests/families.py behind split loaders
        if node["class_type"] == "CheckpointLoaderSimple" or (node["class_type"] == "UNETLoader" and not split):
            node["class_type"], node["inputs"] = "QTDTestCheckpointLoader", {"kind": checkpoint_kind, "seed": 0}
            ckpts.add(nid)
        elif node["class_type"] == "UNETLoader":
            node["class_type"], node["inputs"] = "QTDTestUNETLoader", {"family": checkpoint_kind}
        elif node["class_type"] == "VAELoader" and split:
            node["class_type"] = "QTDTestVAELoader"
            node["inputs"] = {"seed": 0, "latent": FAMILY_VAE_LATENT[checkpoint_kind]}
        elif node["class_type"] == "VAELoader":        # the video example's Wan VAE
            node["class_type"], node["inputs"] = "QTDTestVideoVAELoader", {}
        elif node["class_type"] == "ControlNetLoader":
            node["class_type"], node["inputs"] = "QTDTestControlNetLoader", {"seed": 0}
        elif node["class_type"] == "TextGenerate":     # the captioner: no captioning model here
            node["class_type"] = "QTDTestCaptioner"
            node["inputs"] = {"image": node["inputs"]["image"], "prompt": node["inputs"]["prompt"],
                              "constant": constant_captions}
    used = {v[0] for node in p.values() for v in node["inputs"].values() if isinstance(v, list)}
    for nid in [k for k, v in p.items() if v["class_type"] == "CLIPLoader"]:
        if nid in used:     # a text encoder (the video and Klein examples)
            p[nid] = {"class_type": "QTDTestCLIPLoader", "inputs": {}}
        else:
            del p[nid]      # the captioning model's loader (only the captioner used it)
    if real_vae:
        for node in p.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[0] in ckpts and value[1] == 2:  # the VAE output
                    node["inputs"][name] = ["vae_fixture", 0]
        p["vae_fixture"] = {"class_type": "QTDTestVAELoader", "inputs": {"seed": 0}}
    return p


def shrink(prompt: dict, image_name: str, steps: int, video_name: str | None = None) -> dict:
    """CPU-sized: canvases / 8, pixel tile settings / 8, few steps, the test image (and video);
    temporal context windows of 2 latent frames (5 real frames) overlapping by one."""
    p = copy.deepcopy(prompt)
    for node in p.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "EmptyLatentImage":
            inp["width"], inp["height"] = inp["width"] // 8, inp["height"] // 8
        elif ct == "LoadImage":
            inp["image"] = image_name
        elif ct == "LoadVideo":
            inp["file"] = video_name
        elif ct == "WanContextWindowsManual":
            inp["context_length"], inp["context_overlap"] = 5, 4
        elif ct == "ImageScaleBy":
            inp["scale_by"] = 1.0
        elif ct == "QuadtreeVisualizer":
            inp["min_tile_size"] = 32
        elif ct == "QuadtreeDiffusion":
            inp["tile_width"], inp["tile_height"] = max(64, inp["tile_width"] // 8), max(64, inp["tile_height"] // 8)
            inp["tile_overlap"] = inp["tile_overlap"] // 8 // 8 * 8
        elif ct in ("KSampler", "BasicScheduler", "Flux2Scheduler"):
            inp["steps"] = steps
        elif ct == "SaveImage":
            inp["filename_prefix"] = "example_wf/" + inp["filename_prefix"].split("/")[-1]
        elif ct in VAE_NODES:
            inp["tile_size"] = max(128, inp["tile_size"] // 8)
    return p


@pytest.fixture(scope="module")
def test_image(comfy_server):
    """A 128x128 photo-like image uploaded through the real upload endpoint."""
    name = "qtd_example_workflow_input.png"
    img = (fx.synthetic_photo(128, 128, seed=3)[0].numpy() * 255 + 0.5).astype(np.uint8)
    path = os.path.join(comfy_server.base_dir, name)
    Image.fromarray(img).save(path)
    with open(path, "rb") as f:
        r = comfy_server.post("/upload/image", files={"image": (name, f, "image/png")},
                              data={"overwrite": "true", "type": "input"})
    assert r.status_code == 200, r.text
    return r.json()["name"]


@pytest.fixture(scope="module")
def test_video(comfy_server):
    """A 9-frame 128x128 video (a moving synthetic photo) in the server's input folder, written with PyAV."""
    import av
    name = "qtd_example_workflow_input.mp4"
    frames = (fx.synthetic_photo(160, 128, seed=3)[0].numpy() * 255 + 0.5).astype(np.uint8)
    with av.open(os.path.join(comfy_server.input_dir, name), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        for k in range(9):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[:, 4 * k:4 * k + 128].copy(),
                                                                   format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return name


RUNS = {
    # name: (fixture checkpoint kind, steps, {SaveImage filename_prefix suffix: expected (W, H)}, real VAE)
    "quadtree_img2img_upscale": ("local", 3, {"upscale": (128, 128), "visualisation": (128, 128)}, True),
    "grid_txt2img_large": ("local", 3, {"grid_txt2img": (256, 128)}, False),
    "spotdiffusion_txt2img": ("local", 3, {"spotdiffusion": (384, 128)}, False),
    "quadtree_upscale_tile_controlnet": ("tiny_sd15", 2, {"tile_cn_upscale": (128, 128),
                                                          "tile_cn_visualisation": (128, 128)}, False),
    "quadtree_upscale_tile_prompts": ("local", 3, {"tile_prompts_upscale": (128, 128),
                                                   "tile_prompts_visualisation": (128, 128)}, True),
    "wan_video_upscale_context_windows": ("tiny_wan", 2, {}, False),
    "quadtree_noise_inversion_upscale": ("local", 3, {"inversion_upscale": (128, 128),
                                                      "inversion_visualisation": (128, 128)}, True),
    # split loaders: the tiny Flux.2 (128-channel latent, 16x) and a tiny real VAE with Flux.2's latent
    "flux2_klein_edit_upscale": ("Flux2", 3, {"klein_edit_upscale": (128, 128),
                                              "klein_edit_visualisation": (128, 128)}, True),
}
# The latent of the fixture VAE that stands in for a family's VAELoader.
FAMILY_VAE_LATENT = {"Flux2": "flux2"}


# What QTDTestUNETLoader's probe logs for each diffusion-model call (tests/fixture_nodes/split_loaders_fixture.py).
PROBE = re.compile(r"\[QTD fixture probe\] \w+ call: (\d+) rows of (\d+)x(\d+) latent px; references (.*)")
PROBE_REF = re.compile(r"(\d+)x(\d+) \((\d+) distinct rows\)")


def references_cropped_per_tile(log: str, calls: int, canvas: int = 128 // 16):
    """The edit-model example (Flux.2, 16x): every tile batch the model was given carries the reference
    (ReferenceLatent on the prompt; cfg 1 evaluates the positive only) cropped to the tile (reference_mode
    'crop to tile'), each tile its own crop, and the tiles are smaller than the canvas."""
    probes = [(int(m[1]), (int(m[2]), int(m[3])), [(int(r[1]), int(r[2]), int(r[3])) for r in PROBE_REF.finditer(m[4])])
              for m in PROBE.finditer(log)]
    assert len(probes) >= calls, (calls, log[-3000:])
    for rows, size, refs in probes:
        assert max(size) < canvas, (size, canvas)                  # a tile, not the canvas
        assert [(w, h) for w, h, _ in refs] == [size], (size, refs)    # one reference, the tile's crop of it
        assert refs[0][2] == rows, (rows, refs)                        # each tile its own crop
    assert sum(rows for rows, _, _ in probes) > len(probes)        # tiles batched: several crops per call


RUN_CHECKS = {"flux2_klein_edit_upscale": references_cropped_per_tile}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_api_workflow_runs_tiled_on_the_server(name, comfy_server, object_info, test_image, test_video):
    skip_unless_supported(name, object_info)
    kind, steps, expected, real_vae = RUNS[name]
    shipped = load(api_path(name))
    assert any(n["class_type"] == "VAEDecodeTiled_QuadtreeDiffusion" for n in shipped.values())
    prompt = shrink(substitute(shipped, kind, real_vae), test_image, steps, test_video)
    before = len(comfy_server.log_text())
    history = comfy_server.run(prompt, timeout=PROMPT_TIMEOUT)
    log = comfy_server.log_text()[before:]

    sizes = {}
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            paths = comfy_server.output_images(history, nid)
            assert len(paths) == 1, (nid, history.get("outputs"))
            assert os.path.isfile(paths[0])
            with Image.open(paths[0]) as im:
                sizes[node["inputs"]["filename_prefix"].split("/")[-1]] = im.size
    assert sizes == expected
    for nid, node in prompt.items():
        if node["class_type"] == "SaveVideo":     # the video example: a 9-frame video, tiles x temporal windows
            saved = [f for v in history["outputs"].get(nid, {}).values() if isinstance(v, list)
                     for f in v if isinstance(f, dict) and "filename" in f]
            assert len(saved) == 1 and saved[0]["filename"].endswith(".mp4"), history.get("outputs")
            assert "Context window" in log or "context windows" in log.lower(), log[-3000:]

    runs = [tuple(map(int, m.groups())) for m in RUN_DONE.finditer(log)]
    samplers = sum(n["class_type"] in ("KSampler", "SamplerCustom", "SamplerCustomAdvanced") for n in prompt.values())
    assert len(runs) == samplers, f"expected {samplers} tiled sampling run(s) in the log, got {runs}:\n{log[-3000:]}"
    for calls, evaluations in runs:
        assert calls >= steps and evaluations > calls, (calls, evaluations)  # several tiles per call
    if samplers == 2:       # the inversion example: its resampling found the inversion
        assert "noise inversion (ascending sigmas)" in log and "resampling this model's last inversion" in log
    vis = [nid for nid, n in prompt.items() if n["class_type"] == "QuadtreeVisualizer"]
    if vis and not set(vis) <= rl.cached_nodes(history):   # ComfyUI re-runs it only for a new image or settings
        assert "quadtree of 128x128px" in log

    if name in RUN_CHECKS:
        RUN_CHECKS[name](log, calls)

    # one log line per Quadtree VAE node ComfyUI ran (not served from its cache by an earlier workflow):
    # exact with the real VAE, ComfyUI's tiled VAE otherwise
    cached = rl.cached_nodes(history)
    vae_nodes = [n["class_type"] for nid, n in prompt.items() if n["class_type"] in VAE_NODES and nid not in cached]
    lines = VAE_LINE.findall(log)
    assert len(lines) == len(vae_nodes) >= 1, lines
    for line in lines:
        if real_vae:
            assert re.match(r"\[Quadtree VAE\] exact (en|de)code of 1 image\(s\)", line), line
        else:
            assert ("FixtureVAE" in line or "FixtureVideoVAE" in line) and "ComfyUI's own tiled VAE" in line, line


def test_tile_controlnet_changes_the_tiled_result(comfy_server, test_image):
    """The ControlNet of workflow (4) acts through the tiled sampling: strength 0 (ComfyUI then
    leaves the conditioning untouched) gives another image than the shipped strength."""
    # 6 steps: every tile (denoise >= 0.3) is then sampled in >= 2 steps (with variable_denoise
    # 'schedule' a tile is only sampled in the last round(denoise * steps) steps).
    prompt = shrink(substitute(load(api_path("quadtree_upscale_tile_controlnet")), "tiny_sd15"), test_image, 6)
    (apply_id,) = [k for k, v in prompt.items() if v["class_type"] == "ControlNetApplyAdvanced"]
    (save_id,) = [k for k, v in prompt.items() if v["inputs"].get("filename_prefix", "").endswith("tile_cn_upscale")]
    assert prompt[apply_id]["inputs"]["strength"] > 0

    def result(strength):
        p = copy.deepcopy(prompt)
        p[apply_id]["inputs"]["strength"] = strength
        p[save_id]["inputs"]["filename_prefix"] += f"_strength{strength}"
        (path,) = comfy_server.output_images(comfy_server.run(p, timeout=PROMPT_TIMEOUT), save_id)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    with_cn, without_cn = result(prompt[apply_id]["inputs"]["strength"]), result(0.0)
    assert with_cn.shape == without_cn.shape == (128, 128, 3)
    assert np.abs(with_cn - without_cn).mean() > 1.0


TILES_LOG = re.compile(r"\[Quadtree Diffusion\] quadtree of \d+x\d+px: (\d+) tiles")
CROPS_LOG = re.compile(r"\[Quadtree Diffusion\] (\d+) tile crops of a (\d+)x(\d+)px image")
PROMPTS_LOG = re.compile(r"\[Quadtree Diffusion\] (\d+) tile prompts for a (\d+)-tile layout")
PER_TILE_LOG = re.compile(r"a prompt per tile: (\d+) tile prompts")


def test_tile_prompt_loop_captions_every_tile_and_steers_each(comfy_server, test_image):
    """The whole loop of workflow (5) on the server: Quadtree Tile Crops gives one crop per tile,
    the captioner runs once per crop (ComfyUI's list execution), CLIP Text Encode once per
    caption, Tile Conditioning takes the list and the sampler uses it per tile; captions that
    differ per tile give another image than one caption for every tile."""
    shipped = load(api_path("quadtree_upscale_tile_prompts"))
    (cap_id,) = [k for k, v in shipped.items() if v["class_type"] == "TextGenerate"]
    (save_id,) = [k for k, v in shipped.items()
                  if v["inputs"].get("filename_prefix", "").endswith("tile_prompts_upscale")]

    def run(constant):
        p = shrink(substitute(shipped, "local", real_vae=True, constant_captions=constant), test_image, 3)
        p[save_id]["inputs"]["filename_prefix"] += f"_constant{int(constant)}"
        before = len(comfy_server.log_text())
        history = comfy_server.run(p, timeout=PROMPT_TIMEOUT)
        log = comfy_server.log_text()[before:]
        (path,) = comfy_server.output_images(history, save_id)
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
        return history["outputs"].get(cap_id, {}).get("text", []), log, pixels

    captions, log, per_tile = run(False)
    n_tiles = int(TILES_LOG.search(log).group(1))
    assert n_tiles > 4, log[-3000:]
    assert [int(v) for v in CROPS_LOG.search(log).groups()] == [n_tiles, 128, 128]
    assert len(captions) == n_tiles, captions
    assert len(set(captions)) > 1, captions            # the crops differ, so do their captions
    for caption in captions:
        assert re.fullmatch(r"a (dark|mid-toned|bright) \w+ region, \d+x\d+ pixels", caption), caption
    assert [int(v) for v in PROMPTS_LOG.search(log).groups()] == [n_tiles, n_tiles]
    assert int(PER_TILE_LOG.search(log).group(1)) == n_tiles, log[-3000:]   # the sampler used them

    constant_captions, _log, one_prompt = run(True)
    assert len(constant_captions) == n_tiles and len(set(constant_captions)) == 1
    assert per_tile.shape == one_prompt.shape == (128, 128, 3)
    assert np.abs(per_tile - one_prompt).mean() > 0.5
