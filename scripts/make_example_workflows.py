#!/usr/bin/env python3
"""Write the shipped example workflows, each in both of ComfyUI's formats, from one description.

    python scripts/make_example_workflows.py        # rewrites example_workflows/

* ``example_workflows/<name>.json``: the UI (litegraph) format the frontend saves and loads by
  drag-and-drop; ComfyUI's template browser lists exactly the ``*.json`` files directly in this
  folder of a custom node pack (``app/custom_node_manager.py``: ``*/example_workflows/*.json``).
* ``example_workflows/<name>.jpg``: the thumbnail the template browser shows for it (drawn from
  the generated sample photo and the pack's quadtree code);
* ``example_workflows/api/<name>.json``: the API format of the same graph (what ``POST /prompt``
  takes; the frontend's "Export (API)"). In a subfolder, so the template browser does not list it.

Widget values are given per input name and written in the order of the node's inputs (what
``/object_info`` reports as ``input_order``); ``KSampler``'s ``seed`` is followed by the
frontend's ``control_after_generate`` value ("fixed") in the UI format only, and so is every INT
widget named ``seed`` (the frontend adds that control to such widgets by name). ``tests/test_example_workflows.py``
checks every file against a running server's ``/object_info`` and runs the API forms.
"""
from __future__ import annotations

import json
import os
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
OUT = os.path.join(REPO, "example_workflows")

# Widget inputs per node type, in input order (links are declared separately).
# Optional widgets added to a node after the first examples (saved workflows load without them): their
# default where an example does not set them.
WIDGET_DEFAULTS = {("QuadtreeDiffusion", "reference_mode"): "crop to tile"}

WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "LoadImage": ["image"],
    "ImageScaleBy": ["upscale_method", "scale_by"],
    "QuadtreeVisualizer": ["content_threshold", "min_tile_size", "min_denoise", "max_denoise",
                           "line_thickness", "max_tile_size", "draw_indices"],
    "VAEEncodeTiled_QuadtreeDiffusion": ["tile_size", "fast", "color_fix"],
    "VAEDecodeTiled_QuadtreeDiffusion": ["tile_size", "fast"],
    "QuadtreeDiffusion": ["method", "enable_overlap", "tile_overlap", "tile_batch_size",
                          "skip_diffusion_below", "variable_denoise", "tile_width", "tile_height", "reference_mode"],
    "SpotDiffusionParams_QuadtreeDiffusion": ["shift_method", "seed", "context_margin"],
    "KSampler": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "SaveImage": ["filename_prefix"],
    "ControlNetLoader": ["control_net_name"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
    "QuadtreeTileCrops": [],
    "QuadtreeTileConditioning": [],
    "CLIPLoader": ["clip_name", "type", "device"],
    "TextGenerate": ["prompt", "max_length", "sampling_mode", "thinking", "use_default_template"],
    "StringConcatenate": ["string_a", "string_b", "delimiter"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "VAELoader": ["vae_name"],
    "LoadVideo": ["file"],
    "GetVideoComponents": [],
    "ModelSamplingSD3": ["shift"],
    "WanContextWindowsManual": ["context_length", "context_overlap", "context_schedule", "context_stride",
                                "closed_loop", "fuse_method", "freenoise", "retain_first_frame",
                                "split_conds_to_windows"],
    "CreateVideo": ["fps", "bit_depth"],
    "SaveVideo": ["filename_prefix", "format", "codec"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "FlipSigmas": [],
    "KSamplerSelect": ["sampler_name"],
    "SamplerCustom": ["add_noise", "noise_seed", "cfg"],
    # the split loaders and the custom sampler of ComfyUI's Flux.2 Klein template (flux2_klein_edit_upscale)
    "ConditioningZeroOut": [],
    "ReferenceLatent": [],
    "CFGGuider": ["cfg"],
    "RandomNoise": ["noise_seed"],
    "Flux2Scheduler": ["steps", "width", "height"],
    "SamplerCustomAdvanced": [],
    "MarkdownNote": ["text"],
}
# Widgets that take a link instead of their value (the frontend gives every widget an input slot).
WIDGET_TYPES = {("CLIPTextEncode", "text"): "STRING", ("StringConcatenate", "string_a"): "STRING",
                ("CreateVideo", "fps"): "FLOAT"}
# Link inputs per node type: (name, type), in input order (optional ones last).
INPUTS = {
    "CheckpointLoaderSimple": [],
    "CLIPTextEncode": [("clip", "CLIP")],
    "LoadImage": [],
    "ImageScaleBy": [("image", "IMAGE")],
    "QuadtreeVisualizer": [("image", "IMAGE")],
    "VAEEncodeTiled_QuadtreeDiffusion": [("pixels", "IMAGE"), ("vae", "VAE")],
    "VAEDecodeTiled_QuadtreeDiffusion": [("samples", "LATENT"), ("vae", "VAE")],
    "QuadtreeDiffusion": [("model", "MODEL"), ("quadtree", "QUADTREE")],
    "SpotDiffusionParams_QuadtreeDiffusion": [("model", "MODEL")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "EmptyLatentImage": [],
    "SaveImage": [("images", "IMAGE")],
    "ControlNetLoader": [],
    "ControlNetApplyAdvanced": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
    "QuadtreeTileCrops": [("image", "IMAGE"), ("quadtree", "QUADTREE")],
    "QuadtreeTileConditioning": [("conditioning", "CONDITIONING"), ("quadtree", "QUADTREE"),
                                 ("tile_conditioning", "CONDITIONING")],
    "CLIPLoader": [],
    "TextGenerate": [("clip", "CLIP"), ("image", "IMAGE")],
    "StringConcatenate": [],
    "UNETLoader": [],
    "VAELoader": [],
    "LoadVideo": [],
    "GetVideoComponents": [("video", "VIDEO")],
    "ModelSamplingSD3": [("model", "MODEL")],
    "WanContextWindowsManual": [("model", "MODEL")],
    "CreateVideo": [("images", "IMAGE"), ("audio", "AUDIO")],
    "SaveVideo": [("video", "VIDEO")],
    "BasicScheduler": [("model", "MODEL")],
    "FlipSigmas": [("sigmas", "SIGMAS")],
    "KSamplerSelect": [],
    "SamplerCustom": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
    "ConditioningZeroOut": [("conditioning", "CONDITIONING")],
    "ReferenceLatent": [("conditioning", "CONDITIONING"), ("latent", "LATENT")],
    "CFGGuider": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "RandomNoise": [],
    "Flux2Scheduler": [],
    "SamplerCustomAdvanced": [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                              ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
    "MarkdownNote": [],
}
OPTIONAL_INPUTS = {("QuadtreeDiffusion", "quadtree"), ("ControlNetApplyAdvanced", "vae"), ("TextGenerate", "image"),
                   ("CreateVideo", "audio"), ("ReferenceLatent", "latent")}
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageScaleBy": [("IMAGE", "IMAGE")],
    "QuadtreeVisualizer": [("image", "IMAGE"), ("quadtree", "QUADTREE")],
    "VAEEncodeTiled_QuadtreeDiffusion": [("LATENT", "LATENT")],
    "VAEDecodeTiled_QuadtreeDiffusion": [("IMAGE", "IMAGE")],
    "QuadtreeDiffusion": [("MODEL", "MODEL")],
    "SpotDiffusionParams_QuadtreeDiffusion": [("MODEL", "MODEL")],
    "KSampler": [("LATENT", "LATENT")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "SaveImage": [],
    "ControlNetLoader": [("CONTROL_NET", "CONTROL_NET")],
    "ControlNetApplyAdvanced": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "QuadtreeTileCrops": [("crops", "IMAGE")],
    "QuadtreeTileConditioning": [("CONDITIONING", "CONDITIONING")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "TextGenerate": [("generated_text", "STRING")],
    "StringConcatenate": [("STRING", "STRING")],
    "UNETLoader": [("MODEL", "MODEL")],
    "VAELoader": [("VAE", "VAE")],
    "LoadVideo": [("VIDEO", "VIDEO")],
    "GetVideoComponents": [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")],
    "ModelSamplingSD3": [("MODEL", "MODEL")],
    "WanContextWindowsManual": [("MODEL", "MODEL")],
    "CreateVideo": [("VIDEO", "VIDEO")],
    "SaveVideo": [],
    "BasicScheduler": [("SIGMAS", "SIGMAS")],
    "FlipSigmas": [("SIGMAS", "SIGMAS")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "SamplerCustom": [("output", "LATENT"), ("denoised_output", "LATENT")],
    "ConditioningZeroOut": [("CONDITIONING", "CONDITIONING")],
    "ReferenceLatent": [("CONDITIONING", "CONDITIONING")],
    "CFGGuider": [("GUIDER", "GUIDER")],
    "RandomNoise": [("NOISE", "NOISE")],
    "Flux2Scheduler": [("SIGMAS", "SIGMAS")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
    "MarkdownNote": [],
}
# Outputs that are lists (the frontend draws them with shape 6).
LIST_OUTPUTS = {("QuadtreeTileCrops", "crops")}
# Nodes of the frontend only (notes): no server node, no API form, no origin.
FRONTEND_ONLY = {"MarkdownNote"}
# Node types that ship with ComfyUI (the frontend records their origin in properties.cnr_id).
# (The video example is made for a current ComfyUI: its Wan Context Windows and Create Video
# nodes have the inputs of ComfyUI 0.28 and later.)
CORE = set(WIDGETS) - FRONTEND_ONLY - {"QuadtreeVisualizer", "QuadtreeDiffusion", "SpotDiffusionParams_QuadtreeDiffusion",
                                       "VAEEncodeTiled_QuadtreeDiffusion", "VAEDecodeTiled_QuadtreeDiffusion",
                                       "QuadtreeTileCrops", "QuadtreeTileConditioning"}
# The ComfyUI version a core node first appeared in, where later than COMFY_VERSION.
CORE_SINCE = {"TextGenerate": "0.15.0"}
# INT widgets the frontend follows with a control_after_generate widget: those that ask for it
# (KSampler's seed) and, by the frontend's legacy rule, every widget named seed or noise_seed.
SEED_WIDGETS = {"seed", "noise_seed"}
PACK_ID = "comfyui-quadtree-tiled-diffusion"
PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.3.75"

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
TILE_CN = "control_v11f1e_sd15_tile.pth"
CAPTION_VLM = "qwen3vl_8b_fp8_scaled.safetensors"   # Qwen3-VL 8B: a vision-language model ComfyUI runs itself
WAN_UNET = "wan2.1_t2v_1.3B_fp16.safetensors"        # Wan 2.1 text-to-video 1.3B (native 832x480)
WAN_TE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN_REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
# Model files a workflow names that ComfyUI's frontend offers to download when missing.
# Flux.2 Klein 4B distilled: the files and links of ComfyUI's template image_flux2_klein_image_edit_4b_distilled.
KLEIN_UNET = "flux-2-klein-4b-fp8.safetensors"
KLEIN_TEXT = "qwen_3_4b.safetensors"
KLEIN_VAE = "flux2-vae.safetensors"
MODEL_URLS = {CAPTION_VLM: {"name": CAPTION_VLM, "directory": "text_encoders",
                            "url": "https://huggingface.co/Comfy-Org/Qwen3-VL/resolve/main/text_encoders/" + CAPTION_VLM},
              WAN_UNET: {"name": WAN_UNET, "directory": "diffusion_models",
                         "url": WAN_REPO + "diffusion_models/" + WAN_UNET},
              WAN_TE: {"name": WAN_TE, "directory": "text_encoders", "url": WAN_REPO + "text_encoders/" + WAN_TE},
              WAN_VAE: {"name": WAN_VAE, "directory": "vae", "url": WAN_REPO + "vae/" + WAN_VAE},
              KLEIN_UNET: {"name": KLEIN_UNET, "directory": "diffusion_models",
                           "url": "https://huggingface.co/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/" + KLEIN_UNET},
              KLEIN_TEXT: {"name": KLEIN_TEXT, "directory": "text_encoders",
                           "url": "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/"
                                  + KLEIN_TEXT},
              KLEIN_VAE: {"name": KLEIN_VAE, "directory": "vae",
                          "url": "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/" + KLEIN_VAE}}
CAPTION_PROMPT = ("Describe this image in one short phrase for an image generator: the main subject, its "
                  "material and texture. Answer with the phrase only.")
TILE_STYLE = ", detailed photograph, sharp focus, high quality"
POSITIVE = "a detailed photograph, sharp focus, high quality"
NEGATIVE = "blurry, lowres, jpeg artifacts, watermark, text"


class Graph:
    def __init__(self, name: str, title: str, description: str):
        self.name, self.title, self.description = name, title, description
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, type_: str, pos, size, title: str | None = None, color=None, **widgets) -> int:
        nid = len(self.nodes) + 1
        widgets = {**{w: v for (t, w), v in WIDGET_DEFAULTS.items() if t == type_}, **widgets}
        missing = [w for w in WIDGETS[type_] if w not in widgets]
        extra = [w for w in widgets if w not in WIDGETS[type_]]
        if missing or extra:
            raise ValueError(f"{type_}: missing widgets {missing}, unknown {extra}")
        self.nodes.append(dict(id=nid, type=type_, pos=list(pos), size=list(size), title=title,
                               color=color, widgets=dict(widgets), links_in={}, links_out={},
                               widget_links=[]))
        return nid

    def link(self, src: int, out_name: str, dst: int, in_name: str) -> int:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        outs = OUTPUTS[s["type"]]
        slot = [n for n, _ in outs].index(out_name)
        typ = outs[slot][1]
        ins = INPUTS[d["type"]]
        if (d["type"], in_name) in WIDGET_TYPES:      # a widget fed by a link: its slot follows the link inputs
            in_type = WIDGET_TYPES[(d["type"], in_name)]
            tslot = len(ins) + len(d["widget_links"])
            d["widget_links"].append(in_name)
        else:
            tslot = [n for n, _ in ins].index(in_name)
            in_type = ins[tslot][1]
        if in_type != typ:
            raise ValueError(f"link {s['type']}.{out_name} ({typ}) -> {d['type']}.{in_name} ({in_type})")
        lid = len(self.links) + 1
        self.links.append([lid, src, slot, dst, tslot, typ])
        d["links_in"][in_name] = lid
        s["links_out"].setdefault(slot, []).append(lid)
        return lid

    def group(self, title: str, bounding, color: str):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    # ---- UI (litegraph) format
    def _order(self) -> dict:
        """Topological execution order, as the frontend stores it in ``order``."""
        deps = {n["id"]: {self.links[l - 1][1] for l in n["links_in"].values()} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(i for i in deps if i not in done and deps[i] <= done)
            for i in ready:
                order[i] = len(order)
                done.add(i)
        return order

    def ui(self) -> dict:
        order = self._order()
        nodes = []
        for n in self.nodes:
            t = n["type"]
            inputs = []
            for name, typ in INPUTS[t]:
                entry = {"name": name, "type": typ, "link": n["links_in"].get(name)}
                if (t, name) in OPTIONAL_INPUTS:
                    entry["shape"] = 7  # how the frontend draws optional inputs
                inputs.append(entry)
            for name in n["widget_links"]:
                inputs.append({"name": name, "type": WIDGET_TYPES[(t, name)], "widget": {"name": name},
                               "link": n["links_in"][name]})
            outputs = []
            for slot, (name, typ) in enumerate(OUTPUTS[t]):
                links = n["links_out"].get(slot, [])
                o = {"name": name, "type": typ, "links": links}
                if (t, name) in LIST_OUTPUTS:
                    o["shape"] = 6  # how the frontend draws list outputs
                if links:
                    o["slot_index"] = slot
                outputs.append(o)
            values = []
            for w in WIDGETS[t]:
                values.append(n["widgets"][w])
                if w in SEED_WIDGETS:
                    values.append("fixed")  # the frontend's control_after_generate widget
                if (t, w) in (("LoadImage", "image"), ("LoadVideo", "file")):
                    values.append("image")  # the frontend's upload button widget (named "image" for videos too)
            props = {} if t in FRONTEND_ONLY else {"Node name for S&R": t}
            if t in FRONTEND_ONLY:
                pass
            elif t in CORE:
                props.update({"cnr_id": "comfy-core", "ver": CORE_SINCE.get(t, COMFY_VERSION)})
                models = [MODEL_URLS[v] for v in n["widgets"].values() if isinstance(v, str) and v in MODEL_URLS]
                if models:
                    props["models"] = models
            else:
                props.update({"cnr_id": PACK_ID, "ver": PACK_VERSION})
            node = {"id": n["id"], "type": t, "pos": n["pos"], "size": n["size"], "flags": {},
                    "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": props, "widgets_values": values}
            if n["title"]:
                node["title"] = n["title"]
            if n["color"]:
                node["color"], node["bgcolor"] = n["color"]
            nodes.append(node)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": [list(l) for l in self.links],
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]},
                      "info": {"name": self.title, "description": self.description}},
            "version": 0.4,
        }

    # ---- API format
    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = {}
            t = n["type"]
            if t in FRONTEND_ONLY:
                continue
            names = [w for w in WIDGETS[t]] + [name for name, _ in INPUTS[t]]
            for name in names:  # the frontend writes widgets and links in input order; order is cosmetic
                if name in n["widgets"] and name not in n["links_in"]:
                    inputs[name] = n["widgets"][name]
                elif name in n["links_in"]:
                    l = self.links[n["links_in"][name] - 1]
                    inputs[name] = [str(l[1]), l[2]]
            out[str(n["id"])] = {"inputs": inputs, "class_type": t,
                                 "_meta": {"title": n["title"] or DISPLAY.get(t, t)}}
        return out


DISPLAY = {
    "CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "LoadImage": "Load Image", "ImageScaleBy": "Upscale Image By", "QuadtreeVisualizer": "Quadtree Visualizer",
    "VAEEncodeTiled_QuadtreeDiffusion": "Quadtree VAE Encode", "VAEDecodeTiled_QuadtreeDiffusion": "Quadtree VAE Decode",
    "QuadtreeDiffusion": "Quadtree Diffusion", "SpotDiffusionParams_QuadtreeDiffusion": "SpotDiffusion Parameters (Quadtree)",
    "KSampler": "KSampler", "EmptyLatentImage": "Empty Latent Image", "SaveImage": "Save Image",
    "ControlNetLoader": "Load ControlNet Model", "ControlNetApplyAdvanced": "Apply ControlNet",
    "QuadtreeTileCrops": "Quadtree Tile Crops", "QuadtreeTileConditioning": "Quadtree Tile Conditioning",
    "CLIPLoader": "Load CLIP", "TextGenerate": "Generate Text", "StringConcatenate": "Concatenate Text",
    "UNETLoader": "Load Diffusion Model", "VAELoader": "Load VAE", "LoadVideo": "Load Video",
    "GetVideoComponents": "Get Video Components", "ModelSamplingSD3": "ModelSamplingSD3",
    "WanContextWindowsManual": "Wan Context Windows", "CreateVideo": "Create Video", "SaveVideo": "Save Video",
    "BasicScheduler": "BasicScheduler", "FlipSigmas": "FlipSigmas", "KSamplerSelect": "KSamplerSelect",
    "SamplerCustom": "SamplerCustom",
    "ConditioningZeroOut": "ConditioningZeroOut", "ReferenceLatent": "ReferenceLatent", "CFGGuider": "CFGGuider",
    "RandomNoise": "RandomNoise", "Flux2Scheduler": "Flux2Scheduler", "SamplerCustomAdvanced": "SamplerCustomAdvanced",
}

# Quadtree VAE Encode / Decode, exact (equal to the untiled VAE); 1024-px tiles fit GPUs of 8 GB and more.
VAE_ENCODE = dict(tile_size=1024, fast=False, color_fix=True)
VAE_DECODE = dict(tile_size=1024, fast=False)


def _prompts(g: Graph, ckpt: int, x: int, y: int, positive: str = POSITIVE, negative: str = NEGATIVE):
    pos = g.node("CLIPTextEncode", (x, y), (420, 160), title="Positive prompt", color=("#232", "#353"), text=positive)
    neg = g.node("CLIPTextEncode", (x, y + 210), (420, 160), title="Negative prompt", color=("#322", "#533"),
                 text=negative)
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    return pos, neg


def _upscale_start(g: Graph, ckpt_name: str, min_denoise: float, max_denoise: float, vis_prefix: str,
                   min_tile_size: int = 128, draw_indices: bool = False, vis_title: str = "Save quadtree visualisation"):
    """The start the quadtree upscale examples share: checkpoint, prompts, image ×2, its quadtree and
    the quadtree's picture. Returns the nodes by role."""
    n = {"ckpt": g.node("CheckpointLoaderSimple", (40, 60), (340, 100), ckpt_name=ckpt_name)}
    n["pos"], n["neg"] = _prompts(g, n["ckpt"], 420, 40)
    n.update(_upscaled_quadtree(g, min_denoise, max_denoise, vis_prefix, min_tile_size, draw_indices, vis_title))
    return n


def _upscaled_quadtree(g: Graph, min_denoise: float, max_denoise: float, vis_prefix: str, min_tile_size: int = 128,
                       draw_indices: bool = False, vis_title: str = "Save quadtree visualisation", top: int = 460):
    """Load Image, ×2, its quadtree and the quadtree's picture (the column starting at y = ``top``).
    Returns {"up": the upscaled image's node, "vis": the Quadtree Visualizer}."""
    img = g.node("LoadImage", (40, top), (320, 330), image="example.png")
    n = {"up": g.node("ImageScaleBy", (400, top + 60), (320, 82), upscale_method="lanczos", scale_by=2.0)}
    n["vis"] = g.node("QuadtreeVisualizer", (400, top + 200), (320, 200), content_threshold=25.0,
                      min_tile_size=min_tile_size, min_denoise=min_denoise, max_denoise=max_denoise,
                      line_thickness=2, max_tile_size=1024, draw_indices=draw_indices)
    save_vis = g.node("SaveImage", (400, top + 460), (320, 300), title=vis_title, filename_prefix=vis_prefix)
    g.link(img, "IMAGE", n["up"], "image")
    g.link(n["up"], "IMAGE", n["vis"], "image")
    g.link(n["vis"], "image", save_vis, "images")
    g.group("Quadtree from the upscaled image", (380, top - 20, 360, 800), "#3f789e")
    return n


def _upscale_sampling(g: Graph, n: dict, positive: tuple, negative: tuple, prefix: str, enc_pos, cfg: float = 7.0):
    """The end the quadtree upscale examples share: Quadtree VAE Encode of the upscaled image,
    Quadtree Diffusion on its quadtree, KSampler with ``positive`` / ``negative`` ((node, output)),
    Quadtree VAE Decode, Save Image."""
    enc = g.node("VAEEncodeTiled_QuadtreeDiffusion", enc_pos, (300, 130), **VAE_ENCODE)
    qd = g.node("QuadtreeDiffusion", (880, 40), (340, 270), method="Mixture of Diffusers", enable_overlap=True,
                tile_overlap=64, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="schedule",
                tile_width=1024, tile_height=1024)
    ks = g.node("KSampler", (1260, 40), (320, 262), seed=0, steps=20, cfg=cfg, sampler_name="euler",
                scheduler="normal", denoise=1.0)
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1260, 360), (300, 110), **VAE_DECODE)
    save = g.node("SaveImage", (1600, 40), (420, 470), title="Save upscaled image", filename_prefix=prefix)
    g.link(n["up"], "IMAGE", enc, "pixels")
    g.link(n["ckpt"], "VAE", enc, "vae")
    g.link(n["ckpt"], "MODEL", qd, "model")
    g.link(n["vis"], "quadtree", qd, "quadtree")
    g.link(qd, "MODEL", ks, "model")
    g.link(*positive, ks, "positive")
    g.link(*negative, ks, "negative")
    g.link(enc, "LATENT", ks, "latent_image")
    g.link(ks, "LATENT", dec, "samples")
    g.link(n["ckpt"], "VAE", dec, "vae")
    g.link(dec, "IMAGE", save, "images")


def quadtree_img2img_upscale() -> Graph:
    g = Graph("quadtree_img2img_upscale", "Quadtree img2img upscale",
              "Upscale a photo and re-sample it in content-adaptive quadtree tiles: flat regions get large "
              "tiles and little denoise, detailed regions small tiles and more denoise.")
    n = _upscale_start(g, SD15, 0.2, 0.6, "quadtree/visualisation")
    _upscale_sampling(g, n, (n["pos"], "CONDITIONING"), (n["neg"], "CONDITIONING"), "quadtree/upscale", (760, 520))
    return g


def grid_txt2img_large() -> Graph:
    g = Graph("grid_txt2img_large", "Large txt2img in grid tiles",
              "Generate a 2048x1024 image with an SDXL checkpoint in 1024x1024 grid tiles blended by "
              "Mixture of Diffusers (memory bounded by the tile batch, not the canvas).")
    ckpt = g.node("CheckpointLoaderSimple", (40, 60), (340, 100), ckpt_name=SDXL)
    pos, neg = _prompts(g, ckpt, 420, 40, "a wide panoramic landscape of snowy mountains above a lake at sunrise, "
                                          "highly detailed photograph", NEGATIVE)
    lat = g.node("EmptyLatentImage", (420, 460), (320, 110), width=2048, height=1024, batch_size=1)
    qd = g.node("QuadtreeDiffusion", (880, 40), (340, 270), method="Mixture of Diffusers", enable_overlap=True,
                tile_overlap=128, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="off",
                tile_width=1024, tile_height=1024)
    ks = g.node("KSampler", (1260, 40), (320, 262), seed=0, steps=25, cfg=7.0, sampler_name="dpmpp_2m",
                scheduler="karras", denoise=1.0)
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1260, 360), (300, 110), **VAE_DECODE)
    save = g.node("SaveImage", (1600, 40), (560, 360), filename_prefix="quadtree/grid_txt2img")
    g.link(ckpt, "MODEL", qd, "model")
    g.link(qd, "MODEL", ks, "model")
    g.link(pos, "CONDITIONING", ks, "positive")
    g.link(neg, "CONDITIONING", ks, "negative")
    g.link(lat, "LATENT", ks, "latent_image")
    g.link(ks, "LATENT", dec, "samples")
    g.link(ckpt, "VAE", dec, "vae")
    g.link(dec, "IMAGE", save, "images")
    return g


def spotdiffusion_txt2img() -> Graph:
    g = Graph("spotdiffusion_txt2img", "SpotDiffusion panorama",
              "Generate a 3072x1024 panorama with SpotDiffusion: non-overlapping tiles shifted every step, "
              "so seams never stay in one place (the fastest method).")
    ckpt = g.node("CheckpointLoaderSimple", (40, 60), (340, 100), ckpt_name=SDXL)
    pos, neg = _prompts(g, ckpt, 420, 40, "a panoramic photograph of a coastal town at golden hour, detailed",
                        NEGATIVE)
    lat = g.node("EmptyLatentImage", (420, 460), (320, 110), width=3072, height=1024, batch_size=1)
    qd = g.node("QuadtreeDiffusion", (880, 40), (340, 270), method="SpotDiffusion", enable_overlap=False,
                tile_overlap=0, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="off",
                tile_width=1024, tile_height=1024)
    sp = g.node("SpotDiffusionParams_QuadtreeDiffusion", (880, 360), (340, 134), shift_method="random", seed=0,
                context_margin=0)
    ks = g.node("KSampler", (1260, 40), (320, 262), seed=0, steps=25, cfg=7.0, sampler_name="euler",
                scheduler="normal", denoise=1.0)
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1260, 360), (300, 110), **VAE_DECODE)
    save = g.node("SaveImage", (1600, 40), (620, 300), filename_prefix="quadtree/spotdiffusion")
    g.link(ckpt, "MODEL", qd, "model")
    g.link(qd, "MODEL", sp, "model")
    g.link(sp, "MODEL", ks, "model")
    g.link(pos, "CONDITIONING", ks, "positive")
    g.link(neg, "CONDITIONING", ks, "negative")
    g.link(lat, "LATENT", ks, "latent_image")
    g.link(ks, "LATENT", dec, "samples")
    g.link(ckpt, "VAE", dec, "vae")
    g.link(dec, "IMAGE", save, "images")
    return g


def quadtree_upscale_tile_controlnet() -> Graph:
    g = Graph("quadtree_upscale_tile_controlnet", "Quadtree upscale with a Tile ControlNet",
              "Quadtree img2img upscale guided by a Tile ControlNet whose hint is the upscaled image itself: "
              "each tile is steered by its own crop of the hint, so higher denoise keeps the composition.")
    n = _upscale_start(g, SD15, 0.3, 0.75, "quadtree/tile_cn_visualisation")
    cnl = g.node("ControlNetLoader", (40, 860), (320, 60), control_net_name=TILE_CN)
    cna = g.node("ControlNetApplyAdvanced", (880, 360), (340, 190), strength=0.6, start_percent=0.0,
                 end_percent=1.0)  # with variable_denoise=schedule low-denoise tiles are sampled only in
    # the last steps: an end_percent below 1 would leave them without control
    g.link(n["pos"], "CONDITIONING", cna, "positive")
    g.link(n["neg"], "CONDITIONING", cna, "negative")
    g.link(cnl, "CONTROL_NET", cna, "control_net")
    g.link(n["up"], "IMAGE", cna, "image")
    _upscale_sampling(g, n, (cna, "positive"), (cna, "negative"), "quadtree/tile_cn_upscale", (760, 620))
    return g


def quadtree_upscale_tile_prompts() -> Graph:
    g = Graph("quadtree_upscale_tile_prompts", "Quadtree upscale with a prompt per tile",
              "Quadtree img2img upscale where every tile has its own prompt: each tile's crop is captioned "
              "by a vision-language model (Generate Text, ComfyUI 0.15+) and the captions become per-tile "
              "prompts, so no tile is pushed toward what the global prompt describes elsewhere.")
    n = _upscale_start(g, SDXL, 0.2, 0.6, "quadtree/tile_prompts_visualisation", min_tile_size=256,
                       draw_indices=True, vis_title="Save quadtree with tile indices")
    crops = g.node("QuadtreeTileCrops", (780, 660), (260, 50))
    vlm = g.node("CLIPLoader", (780, 760), (320, 110), title="Load captioning model (vision-language)",
                 clip_name=CAPTION_VLM, type="stable_diffusion", device="default")
    cap = g.node("TextGenerate", (1140, 660), (360, 260), title="Caption each tile", prompt=CAPTION_PROMPT,
                 max_length=48, sampling_mode="off", thinking=False, use_default_template=True)
    style = g.node("StringConcatenate", (1540, 660), (320, 200), title="Caption + style", string_a="",
                   string_b=TILE_STYLE, delimiter="")
    tile_text = g.node("CLIPTextEncode", (1900, 660), (320, 120), title="Tile prompts (one per tile)",
                       color=("#232", "#353"), text="")
    tcond = g.node("QuadtreeTileConditioning", (1900, 840), (320, 90))
    g.link(n["up"], "IMAGE", crops, "image")
    g.link(n["vis"], "quadtree", crops, "quadtree")
    g.link(vlm, "CLIP", cap, "clip")
    g.link(crops, "crops", cap, "image")
    g.link(cap, "generated_text", style, "string_a")
    g.link(n["ckpt"], "CLIP", tile_text, "clip")
    g.link(style, "STRING", tile_text, "text")
    g.link(n["pos"], "CONDITIONING", tcond, "conditioning")
    g.link(n["vis"], "quadtree", tcond, "quadtree")
    g.link(tile_text, "CONDITIONING", tcond, "tile_conditioning")
    _upscale_sampling(g, n, (tcond, "CONDITIONING"), (n["neg"], "CONDITIONING"), "quadtree/tile_prompts_upscale",
                      (880, 380), cfg=6.0)
    g.group("A prompt per tile: crop, caption, encode", (760, 580, 1500, 400), "#8a5a9e")
    return g


def wan_video_upscale_context_windows() -> Graph:
    g = Graph("wan_video_upscale_context_windows", "Wan video upscale in tiles and temporal windows",
              "Upscale a video 2x and re-sample it with Wan 2.1 in spatial tiles (Quadtree Diffusion) and temporal "
              "context windows (Wan Context Windows): every model call holds one window of frames of one tile batch, "
              "so memory follows the tile and the window, not the frame size or the video length.")
    unet = g.node("UNETLoader", (40, 60), (340, 82), unet_name=WAN_UNET, weight_dtype="default")
    clip = g.node("CLIPLoader", (40, 190), (340, 106), clip_name=WAN_TE, type="wan", device="default")
    vae = g.node("VAELoader", (40, 340), (340, 58), vae_name=WAN_VAE)
    pos, neg = _prompts(g, clip, 420, 40, "a detailed, sharp video, natural motion, high quality",
                        "blurry, lowres, flicker, jpeg artifacts, watermark, text")
    video = g.node("LoadVideo", (40, 460), (320, 330), file="input.mp4")
    parts = g.node("GetVideoComponents", (400, 460), (260, 90))
    up = g.node("ImageScaleBy", (400, 600), (300, 82), upscale_method="lanczos", scale_by=2.0)
    enc = g.node("VAEEncodeTiled_QuadtreeDiffusion", (400, 730), (300, 130), **VAE_ENCODE)
    shift = g.node("ModelSamplingSD3", (880, 40), (300, 58), shift=8.0)
    ctx = g.node("WanContextWindowsManual", (880, 140), (340, 280), context_length=81, context_overlap=30,
                 context_schedule="standard_uniform", context_stride=1, closed_loop=False, fuse_method="pyramid",
                 freenoise=True, retain_first_frame=False, split_conds_to_windows=False)
    qd = g.node("QuadtreeDiffusion", (880, 460), (340, 270), method="Mixture of Diffusers", enable_overlap=True,
                tile_overlap=64, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="off",
                tile_width=832, tile_height=480)
    ks = g.node("KSampler", (1260, 40), (320, 262), seed=0, steps=20, cfg=6.0, sampler_name="euler",
                scheduler="simple", denoise=0.4)
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1260, 360), (300, 110), **VAE_DECODE)
    make = g.node("CreateVideo", (1260, 520), (300, 110), fps=16.0, bit_depth=8)
    save = g.node("SaveVideo", (1600, 40), (560, 520), filename_prefix="video/quadtree_wan_upscale", format="auto",
                  codec="auto")
    g.link(video, "VIDEO", parts, "video")
    g.link(parts, "images", up, "image")
    g.link(up, "IMAGE", enc, "pixels")
    g.link(vae, "VAE", enc, "vae")
    g.link(unet, "MODEL", shift, "model")
    g.link(shift, "MODEL", ctx, "model")
    g.link(ctx, "MODEL", qd, "model")
    g.link(qd, "MODEL", ks, "model")
    g.link(pos, "CONDITIONING", ks, "positive")
    g.link(neg, "CONDITIONING", ks, "negative")
    g.link(enc, "LATENT", ks, "latent_image")
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    g.link(dec, "IMAGE", make, "images")
    g.link(parts, "audio", make, "audio")
    g.link(parts, "fps", make, "fps")
    g.link(make, "VIDEO", save, "video")
    g.group("Tiles x temporal windows", (860, 0, 380, 760), "#3f789e")
    return g


def quadtree_noise_inversion_upscale() -> Graph:
    g = Graph("quadtree_noise_inversion_upscale", "Quadtree upscale by noise inversion",
              "Upscale a photo, invert it to noise through the tiled model (Flip Sigmas + SamplerCustom: each "
              "quadtree tile only up to its own denoise), then resample that noise with the prompt: the result "
              "keeps the photo's structure more closely than adding fresh noise.")
    n = _upscale_start(g, SD15, 0.2, 0.6, "quadtree/inversion_visualisation")
    enc = g.node("VAEEncodeTiled_QuadtreeDiffusion", (760, 520), (300, 130), **VAE_ENCODE)
    qd = g.node("QuadtreeDiffusion", (880, 40), (340, 270), method="Mixture of Diffusers", enable_overlap=True,
                tile_overlap=64, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="schedule",
                tile_width=1024, tile_height=1024)
    sched = g.node("BasicScheduler", (880, 360), (300, 106), scheduler="normal", steps=24, denoise=1.0)
    flip = g.node("FlipSigmas", (880, 500), (200, 30))
    sampler = g.node("KSamplerSelect", (880, 570), (300, 58), sampler_name="euler")
    invert = g.node("SamplerCustom", (1260, 40), (320, 230), title="Invert: image to noise", add_noise=False,
                    noise_seed=0, cfg=1.0)
    resample = g.node("SamplerCustom", (1260, 320), (320, 230), title="Resample the inverted noise", add_noise=False,
                      noise_seed=0, cfg=7.0)
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1620, 320), (300, 110), **VAE_DECODE)
    save = g.node("SaveImage", (1620, 480), (420, 470), title="Save upscaled image",
                  filename_prefix="quadtree/inversion_upscale")
    g.link(n["up"], "IMAGE", enc, "pixels")
    g.link(n["ckpt"], "VAE", enc, "vae")
    g.link(n["ckpt"], "MODEL", qd, "model")
    g.link(n["vis"], "quadtree", qd, "quadtree")
    g.link(qd, "MODEL", sched, "model")
    g.link(sched, "SIGMAS", flip, "sigmas")
    for node, sigmas, latent, positive in ((invert, (flip, "SIGMAS"), (enc, "LATENT"), n["neg"]),
                                           (resample, (sched, "SIGMAS"), (invert, "output"), n["pos"])):
        g.link(qd, "MODEL", node, "model")       # one tiled model: the resampling finds its inversion
        g.link(positive, "CONDITIONING", node, "positive")
        g.link(n["neg"], "CONDITIONING", node, "negative")
        g.link(sampler, "SAMPLER", node, "sampler")
        g.link(*sigmas, node, "sigmas")
        g.link(*latent, node, "latent_image")
    g.link(resample, "output", dec, "samples")
    g.link(n["ckpt"], "VAE", dec, "vae")
    g.link(dec, "IMAGE", save, "images")
    g.group("Inversion, then resampling", (860, 0, 740, 620), "#8a5a9e")
    return g


EDIT_PROMPT = ("Upscale this image: sharpen fine detail and texture, keep the composition, colours, lighting "
               "and any text unchanged.")
KLEIN_NOTE = f"""## Flux.2 Klein as a tiled upscaler

ComfyUI's template **Image Edit (Flux.2 Klein 4B Distilled)**, unpacked, with the Quadtree Diffusion nodes added:

- **Upscale Image By** ×2, and **Quadtree Visualizer** splits the upscaled image into tiles by its content
  (small tiles and more denoise where there is detail, large tiles and little denoise where it is flat).
- **Quadtree VAE Encode** encodes the upscaled image once: it is the latent the sampler refines *and* the
  **reference** (ReferenceLatent) the edit model keeps the result aligned with.
- **Quadtree Diffusion** samples it tile by tile (memory bounded by the tile). With *reference_mode* =
  *crop to tile* each tile is given the part of the reference under it, at the positions the whole image
  would give it, so no tile redraws another part of the picture.
- **Quadtree VAE Decode** decodes in tiles, exactly.

**Flux2Scheduler** is set to 1024×1024, the largest tile: what one model call sees.

## Model links

**text_encoders**

- [{KLEIN_TEXT}]({MODEL_URLS[KLEIN_TEXT]["url"]})

**diffusion_models**

- [{KLEIN_UNET}]({MODEL_URLS[KLEIN_UNET]["url"]})

**vae**

- [{KLEIN_VAE}]({MODEL_URLS[KLEIN_VAE]["url"]})

Model storage location

```
📂 ComfyUI/
├── 📂 models/
│   ├── 📂 text_encoders/
│   │      └── {KLEIN_TEXT}
│   ├── 📂 diffusion_models/
│   │      └── {KLEIN_UNET}
│   └── 📂 vae/
│          └── {KLEIN_VAE}
```
"""


def flux2_klein_edit_upscale() -> Graph:
    g = Graph("flux2_klein_edit_upscale", "Flux.2 Klein edit-model upscale in quadtree tiles",
              "ComfyUI's Flux.2 Klein 4B image-edit template as a tiled upscaler: the upscaled image is both the "
              "latent and the reference image, and every quadtree tile meets the part of the reference under it.")
    unet = g.node("UNETLoader", (40, 60), (340, 82), unet_name=KLEIN_UNET, weight_dtype="default")
    clip = g.node("CLIPLoader", (40, 180), (340, 106), clip_name=KLEIN_TEXT, type="flux2", device="default")
    vae = g.node("VAELoader", (40, 330), (340, 58), vae_name=KLEIN_VAE)
    g.group("Models (Flux.2 Klein 4B distilled)", (20, -20, 380, 440), "#444")
    n = _upscaled_quadtree(g, 0.3, 0.75, "quadtree/klein_edit_visualisation", top=480)
    pos = g.node("CLIPTextEncode", (420, 40), (420, 160), title="CLIP Text Encode (Positive Prompt)",
                 color=("#232", "#353"), text=EDIT_PROMPT)
    neg = g.node("ConditioningZeroOut", (420, 250), (260, 26))
    enc = g.node("VAEEncodeTiled_QuadtreeDiffusion", (880, 660), (300, 130), **VAE_ENCODE)
    ref_pos = g.node("ReferenceLatent", (880, 440), (260, 46), title="ReferenceLatent (positive)")
    ref_neg = g.node("ReferenceLatent", (880, 540), (260, 46), title="ReferenceLatent (negative)")
    qd = g.node("QuadtreeDiffusion", (880, 40), (340, 294), method="Mixture of Diffusers", enable_overlap=True,
                tile_overlap=64, tile_batch_size=0, skip_diffusion_below=0, variable_denoise="schedule",
                tile_width=1024, tile_height=1024, reference_mode="crop to tile")
    guider = g.node("CFGGuider", (1260, 40), (300, 98), cfg=1.0)
    noise = g.node("RandomNoise", (1260, 180), (300, 82), noise_seed=0)
    sampler = g.node("KSamplerSelect", (1260, 300), (300, 58), sampler_name="euler")
    sched = g.node("Flux2Scheduler", (1260, 400), (300, 106), steps=8, width=1024, height=1024)
    sca = g.node("SamplerCustomAdvanced", (1600, 40), (300, 330))
    dec = g.node("VAEDecodeTiled_QuadtreeDiffusion", (1600, 420), (300, 110), **VAE_DECODE)
    save = g.node("SaveImage", (1940, 40), (460, 500), title="Save upscaled image",
                  filename_prefix="quadtree/klein_edit_upscale")
    g.link(clip, "CLIP", pos, "clip")
    g.link(pos, "CONDITIONING", neg, "conditioning")
    g.link(n["up"], "IMAGE", enc, "pixels")
    g.link(vae, "VAE", enc, "vae")
    for ref, cond in ((ref_pos, pos), (ref_neg, neg)):
        g.link(cond, "CONDITIONING", ref, "conditioning")
        g.link(enc, "LATENT", ref, "latent")
    g.link(unet, "MODEL", qd, "model")
    g.link(n["vis"], "quadtree", qd, "quadtree")
    g.link(qd, "MODEL", guider, "model")
    g.link(ref_pos, "CONDITIONING", guider, "positive")
    g.link(ref_neg, "CONDITIONING", guider, "negative")
    g.link(noise, "NOISE", sca, "noise")
    g.link(guider, "GUIDER", sca, "guider")
    g.link(sampler, "SAMPLER", sca, "sampler")
    g.link(sched, "SIGMAS", sca, "sigmas")
    g.link(enc, "LATENT", sca, "latent_image")
    g.link(sca, "output", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    g.link(dec, "IMAGE", save, "images")
    g.group("Reference: the upscaled image", (860, 390, 340, 430), "#8a5a9e")
    g.node("MarkdownNote", (1260, 580), (700, 520), title="Read me: models and what this workflow does",
           color=("#222", "#000"), text=KLEIN_NOTE)
    return g


WORKFLOWS = [quadtree_img2img_upscale, grid_txt2img_large, spotdiffusion_txt2img, quadtree_upscale_tile_controlnet,
             quadtree_upscale_tile_prompts, wan_video_upscale_context_windows, quadtree_noise_inversion_upscale,
             flux2_klein_edit_upscale]


def write_all(out_dir: str = OUT) -> list[str]:
    os.makedirs(os.path.join(out_dir, "api"), exist_ok=True)
    written = []
    for make in WORKFLOWS:
        g = make()
        for path, data in ((os.path.join(out_dir, g.name + ".json"), g.ui()),
                           (os.path.join(out_dir, "api", g.name + ".json"), g.api())):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            written.append(path)
    return written




# ---------------------------------------------------------------------------------------------
# Thumbnails: the template browser shows example_workflows/<name>.jpg next to each template.
# Drawn here from the generated sample photo (scripts/make_sample_photo.py) and the pack's own
# quadtree code, so they carry no third-party material.

def _pack_module(module: str):
    import importlib
    import sys
    import types
    name = "qtd_examples_pack"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [REPO]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.{module}")


def _pack_quadtree():
    return _pack_module("quadtree")


def _photo(size=512):
    import importlib.util
    spec = importlib.util.spec_from_file_location("qtd_sample_photo", os.path.join(REPO, "scripts", "make_sample_photo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_photo(size, mod.DEFAULT_SEED)


def _quadtree_thumb(min_denoise, max_denoise, indices=False):
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    qt = _pack_quadtree()
    img = _photo(512).convert("RGB")
    pixels = torch.from_numpy(np.asarray(img, np.float32) / 255.0)
    lay = qt.build_quadtree(pixels, 25.0, 48, 1024, min_denoise, max_denoise)
    if indices:     # each tile's index, as Quadtree Visualizer draws it (draw_indices)
        drawn = _pack_module("tile_preview").draw_indices(pixels, lay)
        img = Image.fromarray((drawn.numpy() * 255 + 0.5).astype(np.uint8))
    d = ImageDraw.Draw(img)
    span = max(1e-6, max_denoise - min_denoise)
    for t in lay.tiles:
        a = (t.denoise - min_denoise) / span
        d.rectangle([t.x, t.y, t.x + t.w - 1, t.y + t.h - 1], outline=(int(255 * a), 40, int(255 * (1 - a))), width=2)
    return img


def _grid_thumb(width, height, tile, overlap, shifted=False):
    import numpy as np
    from PIL import Image, ImageDraw
    W, H = width // 4, height // 4
    ys = np.linspace(0, 1, H)[:, None, None]
    xs = np.linspace(0, 1, W)[None, :, None]
    sky = np.array([0.45, 0.62, 0.88]) * (1 - ys) + np.array([0.95, 0.78, 0.55]) * ys + 0 * xs
    ridge = (0.55 + 0.08 * np.sin(xs[..., 0] * 9) + 0.05 * np.sin(xs[..., 0] * 23 + 1))[0]
    rows = np.arange(H)[:, None] / H
    arr = np.where((rows > ridge[None, :])[..., None], np.array([0.25, 0.35, 0.45]), sky)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img, "RGBA")
    t, o = tile // 4, overlap // 4
    if not shifted:  # the engine's grid windows (quadtree.grid_starts), overlaps shaded
        xs0 = _pack_quadtree().grid_starts(W, t, o)
        for k, x in enumerate(xs0):
            if k:
                d.rectangle([x, 0, xs0[k - 1] + t - 1, H - 1], fill=(255, 255, 255, 70))
        for k, x in enumerate(xs0):
            inset = 3 + 8 * (k % 2)
            d.rectangle([x + inset, inset, x + t - 1 - inset, H - 1 - inset], outline=(255, 255, 255, 230), width=3)
    else:  # two steps' partitions (spot_diffusion.grid_cuts): the seams move, the canvas edges stay
        sd = _pack_module("spot_diffusion")
        for shift, inset, col in ((0, 3, (255, 255, 255, 230)), (t // 3, 11, (255, 120, 60, 200))):
            for x0, x1 in sd.segments(sd.grid_cuts(W, t, shift), W):
                d.rectangle([x0 + inset, inset, x1 - 1 - inset, H - 1 - inset], outline=col, width=3)
    return img


def _video_thumb(width, height, tile_w, tile_h, overlap, frames=3):
    """Three frames of a video side by side, each with the same grid of tile windows, and the frames
    grouped by two overlapping temporal windows underneath."""
    from PIL import Image, ImageDraw
    frame = _grid_thumb(width, height, tile_w, overlap).resize((width // 8, height // 8))
    fw, fh = frame.size
    img = Image.new("RGB", (frames * (fw + 8) + 8, fh + 40), (24, 24, 28))
    d = ImageDraw.Draw(img)
    for k in range(frames):
        img.paste(frame, (8 + k * (fw + 8), 8))
    for k, (a, b) in enumerate(((0, 2), (1, 3))):       # temporal windows over the frames
        y = fh + 16 + 10 * k
        d.rectangle([8 + a * (fw + 8), y, 8 + b * (fw + 8) - 8, y + 6], fill=((255, 160, 60), (90, 200, 255))[k])
    return img


def _edit_upscale_thumb(min_denoise, max_denoise):
    """The quadtree thumbnail, its left half the low-resolution source (the reference): ×8 pixels."""
    from PIL import Image, ImageDraw
    img = _quadtree_thumb(min_denoise, max_denoise)
    w, h = img.size
    src = _photo(w).convert("RGB").resize((w // 8, h // 8), Image.BILINEAR).resize((w, h), Image.NEAREST)
    img.paste(src.crop((0, 0, w // 2, h)), (0, 0))
    ImageDraw.Draw(img).line([(w // 2, 0), (w // 2, h - 1)], fill=(255, 255, 255), width=3)
    return img


def write_thumbnails(out_dir: str = OUT) -> list[str]:
    thumbs = {
        "quadtree_img2img_upscale": lambda: _quadtree_thumb(0.2, 0.6),
        "quadtree_upscale_tile_controlnet": lambda: _quadtree_thumb(0.3, 0.75),
        "quadtree_upscale_tile_prompts": lambda: _quadtree_thumb(0.2, 0.6, indices=True),
        "grid_txt2img_large": lambda: _grid_thumb(2048, 1024, 1024, 128),
        "spotdiffusion_txt2img": lambda: _grid_thumb(3072, 1024, 1024, 0, shifted=True),
        "wan_video_upscale_context_windows": lambda: _video_thumb(1664, 960, 832, 480, 64),
        "quadtree_noise_inversion_upscale": lambda: _quadtree_thumb(0.2, 0.6),
        "flux2_klein_edit_upscale": lambda: _edit_upscale_thumb(0.3, 0.75),
    }
    written = []
    for name, make in thumbs.items():
        path = os.path.join(out_dir, name + ".jpg")
        make().save(path, quality=85)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all() + write_thumbnails():
        print(os.path.relpath(p, REPO))
