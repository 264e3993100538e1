"""ComfyUI node classes (V3 schema): thin wrappers over quadtree.py and tiled_diffusion.py.

The API is pinned to ``comfy_api.v0_0_2`` (present in every ComfyUI this pack was tested on); a
ComfyUI without it gets the nodes defined with its newest API for the same schema,
``comfy_api.latest`` (``self_check.node_api``, logged). Importing this module runs the startup
self-check (self_check.py: one log line per ComfyUI feature that is missing or changed); a node
whose feature is missing still registers and, when run, fails with a clear message. ComfyUI
registers the nodes through ``comfy_entrypoint()`` (re-exported by ``__init__.py``); importing this
module patches nothing."""
from __future__ import annotations

import logging

import torch

from . import quadtree as qt
from . import self_check
from . import tile_conditioning as tcond
from . import tile_preview as tp
from . import tiled_vae
from .reference_latents import MODES as REFERENCE_MODES
from .tile_plan import TileConfig
from .tiled_diffusion import tiled_model
from .utils import METHODS, SHIFT_METHODS, SPOT_KEY
from .variable_denoise import MODES

log = logging.getLogger(__name__)

ComfyExtension, io = self_check.node_api()
self_check.log_report()

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


# The QUADTREE socket type (a quadtree.Layout, or a tuple of them for an IMAGE batch of different images).
Quadtree = io.Custom("QUADTREE")

# ComfyUI skips its own min/max check for every input validate_inputs takes, so
# QuadtreeVisualizer.validate_inputs checks these itself (in this order); the schema uses the same bounds.
CHECKED_RANGES = {
    "min_denoise": (0.0, 1.0),
    "max_denoise": (0.0, 1.0),
    "min_tile_size": (1, 4096),
    "max_tile_size": (64, 8192),
}


def _range_error(name, value):
    lo, hi = CHECKED_RANGES[name]
    if value is not None and not lo <= value <= hi:
        return f"{name} ({value}) is outside {lo}..{hi}: set {name} between {lo} and {hi}"
    return None


def _choice_error(name, value, choices):
    """Combo values are checked here too: ComfyUI 0.3.75 does not check V3 combo values at /prompt."""
    if value is not None and value not in choices:
        return f"{name}: '{value}' is not one of {', '.join(choices)}"
    return None


class QuadtreeVisualizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuadtreeVisualizer",
            display_name="Quadtree Visualizer",
            category=CATEGORY,
            description=("Builds a content-adaptive quadtree over the image (flat regions get large tiles, detailed "
                         "regions small ones), gives each tile a denoise strength (largest tile min_denoise, "
                         "smallest max_denoise) and draws the tiles coloured by denoise (blue low, red high). "
                         "Connect QUADTREE to Quadtree Diffusion."),
            inputs=[
                io.Image.Input("image", tooltip="The image the layout is built on: the one you encode into the "
                                                "latent you sample (after any upscale)."),
                io.Float.Input("content_threshold", default=25.0, min=0.0, max=255.0, step=0.1,
                               tooltip="Split a tile while the magnitude of its per-channel RGB standard deviation "
                                       "(0-255 units) exceeds this. Lower = more, smaller tiles."),
                io.Int.Input("min_tile_size", default=128, min=CHECKED_RANGES["min_tile_size"][0],
                             max=CHECKED_RANGES["min_tile_size"][1], step=1,
                             tooltip="Smallest tile side in pixels (values below 8 act as 8). Content never "
                                     "splits a tile below this."),
                io.Float.Input("min_denoise", default=0.2, min=CHECKED_RANGES["min_denoise"][0],
                               max=CHECKED_RANGES["min_denoise"][1], step=0.01,
                               tooltip="Denoise of the largest (flattest) tiles."),
                io.Float.Input("max_denoise", default=0.8, min=CHECKED_RANGES["max_denoise"][0],
                               max=CHECKED_RANGES["max_denoise"][1], step=0.01,
                               tooltip="Denoise of the smallest (most detailed) tiles."),
                io.Int.Input("line_thickness", default=2, min=0, max=16, step=1,
                             tooltip="Border width of the drawn tiles in pixels (0 = no borders)."),
                io.Int.Input("max_tile_size", default=1024, min=CHECKED_RANGES["max_tile_size"][0],
                             max=CHECKED_RANGES["max_tile_size"][1], step=8,
                             tooltip="Largest tile side in pixels: larger tiles are always split, so no tile "
                                     "exceeds what the model handles well."),
                io.Boolean.Input("draw_indices", default=False, optional=True,
                                 tooltip="Draw each tile's index (its order in Quadtree Tile Crops and Quadtree "
                                         "Tile Conditioning) at its top-left corner."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The image with tile borders coloured by denoise."),
                Quadtree.Output(display_name="quadtree", tooltip="The tile layout for Quadtree Diffusion."),
            ],
        )

    @classmethod
    def validate_inputs(cls, min_denoise=None, max_denoise=None, min_tile_size=None, max_tile_size=None):
        # ComfyUI flags every input named here when this fails, and leaves their range checks to it.
        # A linked (not yet computed) input arrives as None and is checked in execute instead.
        values = {"min_denoise": min_denoise, "max_denoise": max_denoise, "min_tile_size": min_tile_size,
                  "max_tile_size": max_tile_size}
        for name, value in values.items():
            err = _range_error(name, value)
            if err:
                return err
        return _denoise_range_error(min_denoise, max_denoise) or _tile_size_error(min_tile_size, max_tile_size) or True

    @classmethod
    def execute(cls, image, content_threshold, min_tile_size, min_denoise, max_denoise, line_thickness,
                max_tile_size=1024, draw_indices=False) -> io.NodeOutput:
        err = _denoise_range_error(min_denoise, max_denoise) or _tile_size_error(min_tile_size, max_tile_size)
        if err:
            raise ValueError(err)
        layouts = [qt.build_quadtree(img, content_threshold, max(min_tile_size, qt.MIN_TILE), max_tile_size,
                                     min_denoise, max_denoise) for img in image]
        drawn = [tp.draw_layout(img, lay, line_thickness) for img, lay in zip(image, layouts)]
        if draw_indices:
            drawn = [tp.draw_indices(img, lay) for img, lay in zip(drawn, layouts)]
        drawn = torch.stack(drawn)
        first = layouts[0]
        differ = any(lay.tiles != first.tiles for lay in layouts[1:])
        log.info("[Quadtree Diffusion] quadtree of %dx%dpx: %d tiles %s, denoise %.2f to %.2f%s", first.width,
                 first.height, len(first.tiles), first.size_histogram(), *first.denoise_range,
                 f" (one layout per image for {len(layouts)} images)" if differ else "")
        # One layout when the batch agrees; otherwise one per image, matched to the latent batch items.
        return io.NodeOutput(drawn, tuple(layouts) if differ else first)


class QuadtreeDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuadtreeDiffusion",
            display_name="Quadtree Diffusion",
            category=CATEGORY,
            description=("Samples the latent in tiles at the sampler's shared timestep and blends the x0 "
                         "predictions (MultiDiffusion, Mixture of Diffusers or SpotDiffusion). With a QUADTREE "
                         "connected, tiles follow the image's content and carry per-tile denoise; otherwise a "
                         "regular grid is used. Memory is bounded by the tile batch, not the canvas."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to tile (it is cloned, never changed)."),
                io.Combo.Input("method", options=list(METHODS), default="Mixture of Diffusers",
                               tooltip="MultiDiffusion: plain average of overlapping tiles. Mixture of Diffusers: "
                                       "Gaussian-weighted average (smoothest seams). SpotDiffusion: no overlap, "
                                       "tiles shifted every step (fastest)."),
                io.Boolean.Input("enable_overlap", default=True,
                                 tooltip="Give tiles overlapping context (not used by SpotDiffusion)."),
                io.Int.Input("tile_overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Pixels neighbouring tiles share. Clamped to half a tile (grid) or the "
                                     "smallest tile side (quadtree)."),
                io.Int.Input("tile_batch_size", default=0, min=0, max=256, step=1,
                             tooltip="Tiles per model call. 0 = auto: as many same-size tiles as fit the free "
                                     "memory of the model's device."),
                io.Int.Input("skip_diffusion_below", default=0, min=0, max=8192, step=8,
                             tooltip="Tiles whose smaller side (px) is below this are never sampled: they keep "
                                     "the input latent exactly (img2img). 0 = off."),
                io.Combo.Input("variable_denoise", options=list(MODES), default="schedule",
                               tooltip="schedule: a tile with denoise d is sampled only in the last "
                                       "round(d*steps) steps (true per-tile strength, fewer model calls). scale: "
                                       "every step of a tile is scaled by a factor rising to 1. off: all tiles "
                                       "full strength."),
                io.Int.Input("tile_width", default=1024, min=64, max=16384, step=8,
                             tooltip="Grid tile width in pixels (used when no quadtree is connected)."),
                io.Int.Input("tile_height", default=1024, min=64, max=16384, step=8,
                             tooltip="Grid tile height in pixels (used when no quadtree is connected)."),
                Quadtree.Input("quadtree", optional=True,
                               tooltip="Layout from Quadtree Visualizer, built on the image you encode into this "
                                       "latent. Leave empty for a regular grid."),
                io.Combo.Input("reference_mode", options=list(REFERENCE_MODES), default=REFERENCE_MODES[0],
                               optional=True,
                               tooltip="Reference images of edit models (ReferenceLatent: Kontext, Flux.2, "
                                       "Qwen-Image-Edit). Either way each tile meets the reference where the "
                                       "whole image would. crop to tile: a reference at least the image's size "
                                       "is cropped to each tile (cost and memory follow the tile). whole image: "
                                       "every tile gets the whole reference (each tile also sees the reference "
                                       "outside it; costs the reference's tokens in every tile)."),
            ],
            outputs=[
                io.Model.Output(tooltip="A clone of the model that samples in tiles; connect it to a KSampler."),
            ],
        )

    @classmethod
    def validate_inputs(cls, method=None, variable_denoise=None, reference_mode=None):
        return _choice_error("method", method, METHODS) or \
            _choice_error("variable_denoise", variable_denoise, MODES) or \
            (reference_mode is not None and _choice_error("reference_mode", reference_mode, REFERENCE_MODES)) or True

    @classmethod
    def execute(cls, model, method, enable_overlap, tile_overlap, tile_batch_size, skip_diffusion_below,
                variable_denoise, tile_width, tile_height, quadtree=None,
                reference_mode=REFERENCE_MODES[0]) -> io.NodeOutput:
        self_check.require("Quadtree Diffusion", "unet_wrapper")
        reference_mode = reference_mode or REFERENCE_MODES[0]
        err = _choice_error("method", method, METHODS) or _choice_error("variable_denoise", variable_denoise, MODES) \
            or _choice_error("reference_mode", reference_mode, REFERENCE_MODES)
        if err:
            raise ValueError(err)
        layouts = quadtree if isinstance(quadtree, (tuple, list)) else (quadtree,)
        if quadtree is not None and not all(isinstance(lay, qt.Layout) for lay in layouts):
            raise ValueError("quadtree: expected the QUADTREE output of Quadtree Visualizer")
        if isinstance(quadtree, list):
            quadtree = tuple(quadtree)
        cfg = TileConfig(method=method, enable_overlap=bool(enable_overlap), tile_overlap=int(tile_overlap),
                         tile_batch_size=int(tile_batch_size), skip_below=int(skip_diffusion_below),
                         variable_denoise=variable_denoise, tile_width=int(tile_width),
                         tile_height=int(tile_height), layout=quadtree, reference_mode=reference_mode)
        return io.NodeOutput(tiled_model(model, cfg))


class SpotDiffusionParams_QuadtreeDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpotDiffusionParams_QuadtreeDiffusion",
            display_name="SpotDiffusion Parameters (Quadtree)",
            category=CATEGORY,
            description=("Sets how SpotDiffusion shifts the tiles from step to step. Place before or after "
                         "Quadtree Diffusion (method SpotDiffusion)."),
            inputs=[
                io.Model.Input("model", tooltip="The model (before or after Quadtree Diffusion)."),
                io.Combo.Input("shift_method", options=list(SHIFT_METHODS), default="random",
                               tooltip="random: a new random shift each step. sorted: the same shifts in "
                                       "ascending order (the seam sweeps across once). fibonacci: golden-ratio "
                                       "sequence, evenly spread shifts."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the shifts (independent per axis)."),
                io.Int.Input("context_margin", default=0, min=0, max=1024, step=8, optional=True,
                             tooltip="Pixels of context around each tile: the model sees the tile plus this "
                                     "margin and only the tile is kept, so seams fade further. 0 = off (the "
                                     "tiles partition the image: fastest). Costs about ((tile + 2*margin) / "
                                     "tile)^2 the model work: 1.27x for 16 px on 256-px tiles."),
            ],
            outputs=[
                io.Model.Output(tooltip="A clone of the model carrying the SpotDiffusion parameters."),
            ],
        )

    @classmethod
    def validate_inputs(cls, shift_method=None):
        return _choice_error("shift_method", shift_method, SHIFT_METHODS) or True

    @classmethod
    def execute(cls, model, shift_method, seed, context_margin=0) -> io.NodeOutput:
        self_check.require("SpotDiffusion Parameters (Quadtree)", "unet_wrapper")
        err = _choice_error("shift_method", shift_method, SHIFT_METHODS)
        if err:
            raise ValueError(err)
        m = model.clone()
        # a new transformer_options dict: never write into one the input model may share
        to = dict(m.model_options.get("transformer_options", {}))
        to[SPOT_KEY] = {"shift_method": shift_method, "seed": int(seed), "context_margin": int(context_margin or 0)}
        m.model_options["transformer_options"] = to
        return io.NodeOutput(m)


class QuadtreeTileCrops(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuadtreeTileCrops",
            display_name="Quadtree Tile Crops",
            category=CATEGORY,
            description=("Cuts the image into its layout's tiles: a list with one image per tile, in tile order (the "
                         "indices Quadtree Visualizer draws). ComfyUI runs a node connected to it once per tile, "
                         "e.g. a captioner whose captions become per-tile prompts."),
            inputs=[
                io.Image.Input("image", tooltip="The image the layout was built on (an upscaled copy of it is scaled "
                                                "to; another aspect ratio is refused)."),
                Quadtree.Input("quadtree", tooltip="The layout: Quadtree Visualizer's or Quadtree Grid Layout's."),
            ],
            outputs=[
                io.Image.Output(display_name="crops", is_output_list=True,
                                tooltip="One image per tile, in tile order (a list: nodes after it run per tile)."),
            ],
        )

    @classmethod
    def execute(cls, image, quadtree) -> io.NodeOutput:
        if isinstance(quadtree, (tuple, list)):
            raise ValueError(f"quadtree: one layout per image ({len(quadtree)} images with different layouts): give "
                             f"Quadtree Visualizer and Quadtree Tile Crops one image")
        if not isinstance(quadtree, qt.Layout):
            raise ValueError("quadtree: expected the QUADTREE output of Quadtree Visualizer or Quadtree Grid Layout")
        crops = tp.tile_crops(image, quadtree)
        log.info("[Quadtree Diffusion] %d tile crops of a %dx%dpx image", len(crops), image.shape[2], image.shape[1])
        return io.NodeOutput(crops)


class QuadtreeTileConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuadtreeTileConditioning",
            display_name="Quadtree Tile Conditioning",
            category=CATEGORY,
            description=("A prompt per tile: each tile of the layout is sampled with its own prompt (cross-attention "
                         "context and pooled output), e.g. captions of Quadtree Tile Crops encoded by CLIP Text "
                         "Encode. Connect the output to the KSampler's positive, and the same quadtree to Quadtree "
                         "Diffusion. Tiles with different prompts still share model calls."),
            is_input_list=True,
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt for everything without a tile prompt of "
                                                              "its own (and for untiled calls)."),
                Quadtree.Input("quadtree", tooltip="The layout the tile prompts follow: the one Quadtree Diffusion "
                                                   "and Quadtree Tile Crops use."),
                io.Conditioning.Input("tile_conditioning", tooltip="One CONDITIONING per tile, in tile order (a "
                                                                   "list, e.g. CLIP Text Encode run over the "
                                                                   "captions of the tile crops)."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="The prompt with its tile prompts: connect to the KSampler's "
                                               "positive."),
            ],
        )

    @classmethod
    def execute(cls, conditioning, quadtree, tile_conditioning) -> io.NodeOutput:
        # the tile prompts are encoded and applied by Quadtree Diffusion's wrappers during sampling
        self_check.require("Quadtree Tile Conditioning", "tile_prompts", "sampler_sample", "calc_cond_batch")
        if len(conditioning) != 1:
            raise ValueError(f"conditioning: one CONDITIONING expected, got a list of {len(conditioning)}")
        if len(quadtree) != 1 or not isinstance(quadtree[0], qt.Layout):
            raise ValueError("quadtree: one layout expected (the QUADTREE output of Quadtree Visualizer or "
                             "Quadtree Grid Layout; one image, not a batch of different layouts)")
        out = tcond.attach(conditioning[0], quadtree[0], list(tile_conditioning))
        log.info("[Quadtree Diffusion] %d tile prompts for a %d-tile layout", len(tile_conditioning),
                 len(quadtree[0].tiles))
        return io.NodeOutput(out)


class QuadtreeGridLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuadtreeGridLayout",
            display_name="Quadtree Grid Layout",
            category=CATEGORY,
            description=("A regular grid as a QUADTREE layout (row by row, the last row and column take the rest), "
                         "for Quadtree Tile Crops and per-tile prompts on txt2img grids, or for Quadtree Diffusion "
                         "(tile_overlap then adds context around each cell)."),
            inputs=[
                io.Int.Input("width", default=2048, min=8, max=16384, step=8,
                             tooltip="Width in pixels of the image you sample (the latent's width x 8 for SD/SDXL)."),
                io.Int.Input("height", default=2048, min=8, max=16384, step=8,
                             tooltip="Height in pixels of the image you sample."),
                io.Int.Input("tile_width", default=1024, min=64, max=16384, step=8,
                             tooltip="Cell width in pixels."),
                io.Int.Input("tile_height", default=1024, min=64, max=16384, step=8,
                             tooltip="Cell height in pixels."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise of every cell (1.0 = full strength, as a plain grid)."),
            ],
            outputs=[
                Quadtree.Output(display_name="quadtree", tooltip="The grid as a tile layout."),
            ],
        )

    @classmethod
    def execute(cls, width, height, tile_width, tile_height, denoise=1.0) -> io.NodeOutput:
        layout = qt.grid_layout(int(width), int(height), int(tile_width), int(tile_height), float(denoise))
        log.info("[Quadtree Diffusion] grid layout of %dx%dpx: %d tiles %s", width, height, len(layout.tiles),
                 layout.size_histogram())
        return io.NodeOutput(layout)


def _vae_tile_error(tile_size):
    lo, hi = tiled_vae.MIN_TILE, tiled_vae.MAX_TILE
    if tile_size is not None and not lo <= tile_size <= hi:
        return f"tile_size ({tile_size}) is outside {lo}..{hi} px: set tile_size between {lo} and {hi}"
    return None


def _vae_tile_input(kind: str):
    return io.Int.Input("tile_size", default=tiled_vae.default_tile_size(kind), min=tiled_vae.MIN_TILE,
                        max=tiled_vae.MAX_TILE, step=tiled_vae.TILE_STEP,
                        tooltip=("Tile side in pixels (of the image). Larger tiles are faster and use more "
                                 "memory; the result does not depend on it unless fast is on. The default "
                                 "fits this machine's device memory."))


class VAEEncodeTiled_QuadtreeDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAEEncodeTiled_QuadtreeDiffusion",
            display_name="Quadtree VAE Encode",
            category=CATEGORY,
            description=("Encodes an image in tiles with device memory bounded by one tile. With fast off the "
                         "latent equals VAE Encode's (GroupNorm statistics and attention over the whole image). "
                         "VAEs other than the SD/SDXL/SD3/FLUX family use ComfyUI's tiled encode (logged)."),
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode."),
                io.Vae.Input("vae", tooltip="The VAE to encode with."),
                _vae_tile_input("encode"),
                io.Boolean.Input("fast", default=False,
                                 tooltip=("Off: exact (equals VAE Encode), whole feature maps kept in RAM. On: one "
                                          "pass per tile with GroupNorm statistics estimated from a downscaled "
                                          "pass (faster, less RAM, slightly different).")),
                io.Boolean.Input("color_fix", default=True,
                                 tooltip=("Fast mode only: keep the GroupNorms of the first resolution level "
                                          "exact, so colours do not shift.")),
            ],
            outputs=[io.Latent.Output(tooltip="The encoded latent.")],
        )

    @classmethod
    def execute(cls, pixels, vae, tile_size, fast, color_fix) -> io.NodeOutput:
        err = _vae_tile_error(tile_size)
        if err:
            raise ValueError(err)
        return io.NodeOutput({"samples": tiled_vae.encode(vae, pixels, int(tile_size), bool(fast), bool(color_fix))})


class VAEDecodeTiled_QuadtreeDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAEDecodeTiled_QuadtreeDiffusion",
            display_name="Quadtree VAE Decode",
            category=CATEGORY,
            description=("Decodes a latent in tiles with device memory bounded by one tile. With fast off the "
                         "image equals VAE Decode's (GroupNorm statistics and attention over the whole image). "
                         "VAEs other than the SD/SDXL/SD3/FLUX family use ComfyUI's tiled decode (logged)."),
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                _vae_tile_input("decode"),
                io.Boolean.Input("fast", default=False,
                                 tooltip=("Off: exact (equals VAE Decode), whole feature maps kept in RAM. On: one "
                                          "pass per tile with GroupNorm statistics estimated from a downscaled "
                                          "pass (faster, less RAM, slightly different).")),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image.")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size, fast) -> io.NodeOutput:
        err = _vae_tile_error(tile_size)
        if err:
            raise ValueError(err)
        return io.NodeOutput(tiled_vae.decode(vae, samples, int(tile_size), bool(fast)))


NODES = (QuadtreeVisualizer, QuadtreeDiffusion, SpotDiffusionParams_QuadtreeDiffusion,
         VAEEncodeTiled_QuadtreeDiffusion, VAEDecodeTiled_QuadtreeDiffusion, QuadtreeTileCrops,
         QuadtreeTileConditioning, QuadtreeGridLayout)


class QuadtreeDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> QuadtreeDiffusionExtension:
    """ComfyUI's V3 registration hook (re-exported by ``__init__.py``)."""
    return QuadtreeDiffusionExtension()
