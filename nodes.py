"""ComfyUI node classes: thin wrappers over quadtree.py and tiled_diffusion.py."""
from __future__ import annotations

import logging

import torch

from . import quadtree as qt
from .tiled_diffusion import TileConfig, tiled_model
from .utils import METHODS, SHIFT_METHODS, SPOT_KEY
from .variable_denoise import MODES

log = logging.getLogger(__name__)

CATEGORY = "sampling/tiled_diffusion"


def _denoise_range_error(min_denoise, max_denoise):
    if min_denoise is not None and max_denoise is not None and min_denoise > max_denoise:
        return (f"min_denoise ({min_denoise}) is greater than max_denoise ({max_denoise}): "
                f"set min_denoise <= max_denoise (large flat tiles get min_denoise, small detailed tiles max_denoise)")
    return None


def _tile_size_error(min_tile_size, max_tile_size):
    if min_tile_size is not None and max_tile_size is not None and min_tile_size > max_tile_size:
        return (f"min_tile_size ({min_tile_size}px) is greater than max_tile_size ({max_tile_size}px): "
                f"lower min_tile_size or raise max_tile_size")
    return None


def draw_layout(image: torch.Tensor, layout: qt.Layout, thickness: int) -> torch.Tensor:
    """The image with each tile's border drawn, coloured by denoise: blue (0) to red (1)."""
    out = image[..., :3].clone()
    if thickness <= 0:
        return out
    H, W = out.shape[0], out.shape[1]
    for t in layout.tiles:
        color = torch.tensor([t.denoise, 0.15, 1.0 - t.denoise], dtype=out.dtype)
        x0, y0 = t.x, t.y
        x1, y1 = min(t.x + t.w, W), min(t.y + t.h, H)
        th = min(thickness, max(1, t.w // 2), max(1, t.h // 2))
        out[y0:y0 + th, x0:x1] = color
        out[max(y0, y1 - th):y1, x0:x1] = color
        out[y0:y1, x0:x0 + th] = color
        out[y0:y1, max(x0, x1 - th):x1] = color
    return out


class QuadtreeVisualizer:
    DESCRIPTION = ("Builds a content-adaptive quadtree over the image (flat regions get large tiles, detailed "
                   "regions small ones), gives each tile a denoise strength (largest tile min_denoise, smallest "
                   "max_denoise) and draws the tiles coloured by denoise (blue low, red high). Connect QUADTREE "
                   "to Quadtree Diffusion.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "QUADTREE")
    RETURN_NAMES = ("image", "quadtree")
    OUTPUT_TOOLTIPS = ("The image with tile borders coloured by denoise.", "The tile layout for Quadtree Diffusion.")
    FUNCTION = "visualize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the layout is built on: the one you encode into the latent "
                                           "you sample (after any upscale)."}),
            "content_threshold": ("FLOAT", {"default": 25.0, "min": 0.0, "max": 255.0, "step": 0.1,
                                            "tooltip": "Split a tile while the magnitude of its per-channel RGB "
                                                       "standard deviation (0-255 units) exceeds this. Lower = "
                                                       "more, smaller tiles."}),
            "min_tile_size": ("INT", {"default": 128, "min": 1, "max": 4096, "step": 1,
                                      "tooltip": "Smallest tile side in pixels (values below 8 act as 8). "
                                                 "Content never splits a tile below this."}),
            "min_denoise": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Denoise of the largest (flattest) tiles."}),
            "max_denoise": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Denoise of the smallest (most detailed) tiles."}),
            "line_thickness": ("INT", {"default": 2, "min": 0, "max": 16, "step": 1,
                                       "tooltip": "Border width of the drawn tiles in pixels (0 = no borders)."}),
            "max_tile_size": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8,
                                      "tooltip": "Largest tile side in pixels: larger tiles are always split, "
                                                 "so no tile exceeds what the model handles well."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, min_denoise, max_denoise, min_tile_size, max_tile_size):
        # ComfyUI leaves the range checks of the inputs named here to this function.
        spec = cls.INPUT_TYPES()["required"]
        for name, value in (("min_denoise", min_denoise), ("max_denoise", max_denoise),
                            ("min_tile_size", min_tile_size), ("max_tile_size", max_tile_size)):
            lo, hi = spec[name][1]["min"], spec[name][1]["max"]
            if value is not None and not lo <= value <= hi:
                return f"{name} ({value}) is outside {lo}..{hi}: set {name} between {lo} and {hi}"
        return _denoise_range_error(min_denoise, max_denoise) or _tile_size_error(min_tile_size, max_tile_size) or True

    def visualize(self, image, content_threshold, min_tile_size, min_denoise, max_denoise, line_thickness,
                  max_tile_size=1024):
        err = _denoise_range_error(min_denoise, max_denoise) or _tile_size_error(min_tile_size, max_tile_size)
        if err:
            raise ValueError(err)
        layouts = [qt.build_quadtree(img, content_threshold, max(min_tile_size, qt.MIN_TILE), max_tile_size,
                                     min_denoise, max_denoise) for img in image]
        drawn = torch.stack([draw_layout(img, lay, line_thickness) for img, lay in zip(image, layouts)])
        first = layouts[0]
        differ = any(lay.tiles != first.tiles for lay in layouts[1:])
        log.info("[Quadtree Diffusion] quadtree of %dx%dpx: %d tiles %s, denoise %.2f to %.2f%s", first.width,
                 first.height, len(first.tiles), first.size_histogram(), *first.denoise_range,
                 f" (one layout per image for {len(layouts)} images)" if differ else "")
        # One layout when the batch agrees; otherwise one per image, matched to the latent batch items.
        return (drawn, tuple(layouts) if differ else first)


class QuadtreeDiffusion:
    DESCRIPTION = ("Samples the latent in tiles at the sampler's shared timestep and blends the x0 predictions "
                   "(MultiDiffusion, Mixture of Diffusers or SpotDiffusion). With a QUADTREE connected, tiles "
                   "follow the image's content and carry per-tile denoise; otherwise a regular grid is used. "
                   "Memory is bounded by the tile batch, not the canvas.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model that samples in tiles; connect it to a KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to tile (it is cloned, never changed)."}),
                "method": (list(METHODS), {"default": "Mixture of Diffusers",
                                           "tooltip": "MultiDiffusion: plain average of overlapping tiles. "
                                                      "Mixture of Diffusers: Gaussian-weighted average (smoothest "
                                                      "seams). SpotDiffusion: no overlap, tiles shifted every step "
                                                      "(fastest)."}),
                "enable_overlap": ("BOOLEAN", {"default": True,
                                               "tooltip": "Give tiles overlapping context (not used by "
                                                          "SpotDiffusion)."}),
                "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                                         "tooltip": "Pixels neighbouring tiles share. Clamped to half a tile "
                                                    "(grid) or the smallest tile side (quadtree)."}),
                "tile_batch_size": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1,
                                            "tooltip": "Tiles per model call. 0 = auto: as many same-size tiles "
                                                       "as fit the free memory of the model's device."}),
                "skip_diffusion_below": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                                 "tooltip": "Tiles whose smaller side (px) is below this are never "
                                                            "sampled: they keep the input latent exactly (img2img). "
                                                            "0 = off."}),
                "variable_denoise": (list(MODES), {"default": "schedule",
                                                   "tooltip": "schedule: a tile with denoise d is sampled only in "
                                                              "the last round(d*steps) steps (true per-tile "
                                                              "strength, fewer model calls). scale: every step of "
                                                              "a tile is scaled by a factor rising to 1. off: all "
                                                              "tiles full strength."}),
                "tile_width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                                       "tooltip": "Grid tile width in pixels (used when no quadtree is "
                                                  "connected)."}),
                "tile_height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                                        "tooltip": "Grid tile height in pixels (used when no quadtree is "
                                                   "connected)."}),
            },
            "optional": {
                "quadtree": ("QUADTREE", {"tooltip": "Layout from Quadtree Visualizer, built on the image you "
                                                     "encode into this latent. Leave empty for a regular grid."}),
            },
        }

    def apply(self, model, method, enable_overlap, tile_overlap, tile_batch_size, skip_diffusion_below,
              variable_denoise, tile_width, tile_height, quadtree=None):
        if method not in METHODS:
            raise ValueError(f"method: '{method}' is not one of {', '.join(METHODS)}")
        if variable_denoise not in MODES:
            raise ValueError(f"variable_denoise: '{variable_denoise}' is not one of {', '.join(MODES)}")
        layouts = quadtree if isinstance(quadtree, (tuple, list)) else (quadtree,)
        if quadtree is not None and not all(isinstance(lay, qt.Layout) for lay in layouts):
            raise ValueError("quadtree: expected the QUADTREE output of Quadtree Visualizer")
        if isinstance(quadtree, list):
            quadtree = tuple(quadtree)
        cfg = TileConfig(method=method, enable_overlap=bool(enable_overlap), tile_overlap=int(tile_overlap),
                         tile_batch_size=int(tile_batch_size), skip_below=int(skip_diffusion_below),
                         variable_denoise=variable_denoise, tile_width=int(tile_width),
                         tile_height=int(tile_height), layout=quadtree)
        return (tiled_model(model, cfg),)


class SpotDiffusionParams_QuadtreeDiffusion:
    DESCRIPTION = ("Sets how SpotDiffusion shifts the tiles from step to step. Place before or after Quadtree "
                   "Diffusion (method SpotDiffusion).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model carrying the SpotDiffusion parameters.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (before or after Quadtree Diffusion)."}),
            "shift_method": (list(SHIFT_METHODS), {"default": "random",
                                                   "tooltip": "random: a new random shift each step. sorted: the "
                                                              "same shifts in ascending order (the seam sweeps "
                                                              "across once). fibonacci: golden-ratio sequence, "
                                                              "evenly spread shifts."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the shifts (independent per axis)."}),
        }}

    def apply(self, model, shift_method, seed):
        if shift_method not in SHIFT_METHODS:
            raise ValueError(f"shift_method: '{shift_method}' is not one of {', '.join(SHIFT_METHODS)}")
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[SPOT_KEY] = {"shift_method": shift_method,
                                                                          "seed": int(seed)}
        return (m,)


NODE_CLASS_MAPPINGS = {
    "QuadtreeVisualizer": QuadtreeVisualizer,
    "QuadtreeDiffusion": QuadtreeDiffusion,
    "SpotDiffusionParams_QuadtreeDiffusion": SpotDiffusionParams_QuadtreeDiffusion,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "QuadtreeVisualizer": "Quadtree Visualizer",
    "QuadtreeDiffusion": "Quadtree Diffusion",
    "SpotDiffusionParams_QuadtreeDiffusion": "SpotDiffusion Parameters (Quadtree)",
}
