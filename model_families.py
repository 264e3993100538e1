"""What the tile engine must know about each model family, found on the model itself.

ComfyUI's model families differ in ways a tiler must respect; everything here is read from the
model (feature detection, never ComfyUI versions) with a small table where the model declares
nothing:

* **latent patch** (:func:`spatial_patch`): latent px per token side.  Diffusion models call it
  ``patch_size`` (SD3, FLUX, Wan: an int or a ``(t, h, w)`` tuple), ``patch_spatial`` (Cosmos /
  Anima), ``patch`` (Krea 2), ``patchifier.patch_size`` (LTXV), keep it on their input embedder
  (SeedVR2's ``vid_in``), or do it with a ``PixelUnshuffle`` as the first layer of their input
  ``embedding`` (Stable Cascade stage B: 4).  Tiles are aligned to it so the model never pads a tile
  (Cosmos refuses unaligned sizes; most others pad silently).
* **tile alignment** (:func:`tile_align`): the patch, or more where another token stream of the
  model is coarser (SCAIL's half-resolution pose: 4 latent px; Wan S2V's motion frames: 8).
* **minimum tile** (:func:`min_tile`): PixArt's positional embedding divides by
  ``round((h + w) / 2 / 64)`` (latent px; Python rounds half to even), zero for tiles under 33 latent
  px on average: smaller tiles are enlarged.
* **conditioning**: which model inputs are references (given whole to every tile even when they have
  the canvas's size, :data:`WHOLE_KEYS`) and which are spatial at another scale that the model
  resamples to its token grid (:data:`RESAMPLED`: Stable Cascade stage B's ``effnet``, PixelDiT
  PiD's ``lq_latent``): resampling them to the canvas's token grid once, as the model would, makes
  each tile's crop exactly what the model makes of it for that tile.  Inputs that are never a
  picture (audio features, a reference's vision tokens) are named (:data:`NOT_SPATIAL`) so that one
  with the canvas's proportions by chance is never cropped.  Inputs a crop gets wrong (per-frame
  mask means, token masks, guide lists) are handled in positional_inputs.py.
* **untileable** (:data:`UNTILEABLE`): a family whose conditioning encodes the canvas's token layout
  is refused with a clear error (:func:`check_tileable`) instead of failing inside the model; so is a
  run whose ``transformer_options`` carry state of the whole canvas across calls
  (:data:`CANVAS_STATE_OPTIONS`, :func:`check_transformer_options`).
"""
from __future__ import annotations

import math

import torch

from . import positional_inputs as pi

# Model inputs that are context for the whole picture, never a canvas: given whole to every tile
# (repeated per tile row), even when their last two dims happen to have the canvas's proportions.
#   ref_latents          FLUX Kontext / Flux.2 / Qwen-Image-Edit / Omnigen2 reference images (a list)
#   reference_latent     Wan reference image (tokens of its own, through ref_conv / patch embedding;
#                        but see SPATIAL_FOR: SCAIL concatenates it to the latent as frames)
#   encoder_hidden_states_llama3  HiDream per-layer text tokens [B, layers, tokens, dim]
#   face_pixel_values    Wan-Animate face crops [B, 3, T, 512, 512]
#   clip_fea             CLIP-vision tokens (Wan, HunyuanVideo 1.5)
WHOLE_KEYS = frozenset({"ref_latents", "reference_latent", "encoder_hidden_states_llama3", "face_pixel_values",
                        "clip_fea"})

# Model inputs that are never a picture (audio features, vision tokens of a reference): repeated per tile row,
# named so that one whose last two dims happen to have the canvas's proportions is never cropped as a canvas.
#   audio_embed          Wan S2V / HuMo / WanDancer audio features ([B, layers, dim, frames] and the like)
#   clip_fea_ref         CLIP-vision tokens of WanDancer's reference image
#   siglip_feats         SigLIP tokens of Z-Image Omni's reference images ([B, h/16, w/16, C] per image)
NOT_SPATIAL = frozenset({"audio_embed", "clip_fea_ref", "siglip_feats"})

# Inputs of WHOLE_KEYS that a model class uses on the canvas's own token grid, so a tile needs its crop:
# class name (and subclasses) -> keys.  Every Wan model: its reference_latent is frame 0 of the canvas's grid
# (ref_conv: Wan 2.2 Fun / Animate; whole, it does not even fit a tile), frames after the canvas's (S2V,
# HuMo) or frames concatenated to the latent (SCAIL); reference_latents.check_canvas_grid refuses other sizes.
SPATIAL_FOR = {"WanModel": frozenset({"reference_latent"})}



def _effnet_size(dm, H: int, W: int, p: int):
    """Stable Cascade stage B: ``effnet`` (the stage-C latent, ~1/10.7 of its latent) is upsampled
    bilinearly (align_corners) to the latent after its p x p PixelUnshuffle: (H/p, W/p)."""
    return (max(1, H // p), max(1, W // p)), "bilinear", True


def _pid_lq_size(dm, H: int, W: int, p: int):
    """PixelDiT PiD: ``lq_latent`` is resized (nearest) to the token grid (H/p, W/p), or to f x that grid
    and folded when a latent px is smaller than a patch; None (left alone) for packed latents."""
    lq = getattr(dm, "lq_proj", None)
    if lq is None or getattr(lq, "latent_unpatchify_factor", 1) > 1:
        return None
    f = 1 if getattr(lq, "z_to_patch_ratio", 1) >= 1 else int(getattr(lq, "latent_fold_factor", 1))
    return (max(1, H // p) * f, max(1, W // p) * f), "nearest", None


# Spatial inputs at another scale that the model resamples to its token grid itself:
# (diffusion-model class name, key) -> fn(diffusion_model, H, W, patch) -> (size, mode, align_corners) or None.
RESAMPLED = {("StageB", "effnet"): _effnet_size, ("PidNet", "lq_latent"): _pid_lq_size}

# Families whose conditioning encodes the canvas's token layout, so a tile cannot be sampled with it:
# diffusion-model class name -> why.
UNTILEABLE = {
    "HiDreamO1Transformer": "HiDream-O1 builds its text+image token sequence (input ids, positions, masks) for the "
                            "canvas's size when the prompt is encoded, and a tile has another size",
}

# Smallest tile side (latent px) a diffusion-model class takes, by class name.
MIN_TILE = {"PixArtMS": 33}

# Tile alignment (latent px) a diffusion-model class needs beyond its patch, by class name:
#   SCAILWanModel  the pose stream (pose_latents, SCAIL-2 sam_latents) comes at half resolution and is embedded
#                  in 2x2 patches: one pose token per 4 latent px.  A window starting at 2 (mod 4) would embed
#                  pose tokens the canvas never has, and an odd half-resolution crop is padded, which changes
#                  the scale of the pose ids (h / H_pose).
#   WanModel_S2V   the motion frames (reference_motion) are embedded at strides of 2, 4 and 8 latent px
#                  (FramePackMotioner): a window on the 8 grid holds whole canvas motion tokens.
TILE_ALIGN = {"SCAILWanModel": 4, "WanModel_S2V": 8}

# transformer_options entries that hold state of the whole canvas across model calls, which tiles
# cannot share: key -> why.
CANVAS_STATE_OPTIONS = {
    "ar_state": "the ar_video sampler keeps a KV cache of every token of the frames it has generated, "
                "across calls",
}

PATCH_ATTRS = ("patch_size", "patch_spatial", "patch")


def _side(v) -> int | None:
    """The spatial side of a patch value: an int, or the last entry of a (t, h, w) / (h, w) tuple."""
    if isinstance(v, (tuple, list)) and v:
        v = v[-1]
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def spatial_patch(base_model) -> int:
    """Latent px per token side of the model (1 for UNets): the first of ``patch_size``,
    ``patch_spatial``, ``patchifier.patch_size`` and an input ``PixelUnshuffle`` it has."""
    dm = getattr(base_model, "diffusion_model", None)
    if dm is None:
        return 1
    for name in PATCH_ATTRS:
        p = _side(getattr(dm, name, None))
        if p:
            return p
    p = _side(getattr(getattr(dm, "patchifier", None), "patch_size", None))
    if p:
        return p
    for name, child in dm.named_children():      # the input embedder (SeedVR2: vid_in)
        if name.endswith("_in") or "embed" in name:
            p = _side(getattr(child, "patch_size", None))
            if p:
                return p
    emb = getattr(dm, "embedding", None)
    first = emb[0] if isinstance(emb, torch.nn.Sequential) and len(emb) else None
    if isinstance(first, torch.nn.PixelUnshuffle):
        return int(first.downscale_factor)
    return 1


def min_tile(base_model) -> int:
    """Smallest tile side in latent px the model takes (:data:`MIN_TILE`), on its patch grid; 1 if any."""
    names = _classes(base_model)
    m = max((v for k, v in MIN_TILE.items() if k in names), default=1)
    p = spatial_patch(base_model)
    return -(-m // p) * p


def tile_align(base_model) -> int:
    """Latent px tile windows are aligned to: the least common multiple of the model's patch
    (:func:`spatial_patch`) and what its class needs (:data:`TILE_ALIGN`)."""
    p = spatial_patch(base_model)
    for name in _classes(base_model):
        p = math.lcm(p, TILE_ALIGN.get(name, 1))
    return p


def _classes(base_model) -> list[str]:
    return [c.__name__ for c in type(getattr(base_model, "diffusion_model", None)).__mro__]


def whole_keys(base_model) -> frozenset:
    """The model inputs this model gets whole in every tile: :data:`WHOLE_KEYS` less what its class
    uses as canvas (:data:`SPATIAL_FOR`), and the inputs that are never a picture (:data:`NOT_SPATIAL`)."""
    spatial = frozenset().union(*(SPATIAL_FOR.get(n, frozenset()) for n in _classes(base_model)))
    return (WHOLE_KEYS - spatial) | NOT_SPATIAL


def canvas_cond(c: dict, base_model, H: int, W: int) -> dict:
    """The model kwargs with every :data:`RESAMPLED` input resampled to the canvas's token grid the way
    the model resamples it: v' = interpolate(v, size(H, W), mode, align_corners).  A tile's crop of v'
    (at its scale, which the windows' patch alignment makes whole) is then already at the tile's grid,
    where the model's own resampling is the identity: each tile sees what the canvas call would.  Inputs
    a crop gets wrong are wrapped for their tiles (positional_inputs.py: per-frame mask means, token
    masks, refused guide lists)."""
    names = _classes(base_model)
    p = spatial_patch(base_model)
    c = pi.canvas_inputs(c, names + [k.__name__ for k in type(base_model).__mro__], H, W, p)
    hit = [(k, fn) for (cls, k), fn in RESAMPLED.items()
           if cls in names and torch.is_tensor(c.get(k)) and c[k].ndim == 4]
    if not hit:
        return c
    dm = base_model.diffusion_model
    out = dict(c)
    for k, fn in hit:
        spec = fn(dm, H, W, p)
        if spec is None:
            continue
        size, mode, corners = spec
        if tuple(c[k].shape[-2:]) != size:
            out[k] = torch.nn.functional.interpolate(c[k], size=size, mode=mode, align_corners=corners)
    return out


def check_tileable(base_model) -> None:
    """Refuse a model in :data:`UNTILEABLE` with a clear error naming it and the fix."""
    for name in _classes(base_model):
        if name in UNTILEABLE:
            raise ValueError(f"model: Quadtree Diffusion cannot tile this model ({name}): {UNTILEABLE[name]}; "
                             f"remove Quadtree Diffusion for this model")


def check_transformer_options(to: dict) -> None:
    """Refuse a model call whose ``transformer_options`` hold canvas-wide state (:data:`CANVAS_STATE_OPTIONS`)."""
    for key, why in CANVAS_STATE_OPTIONS.items():
        if isinstance(to, dict) and to.get(key) is not None:
            raise ValueError(f"sampler: Quadtree Diffusion cannot tile this run ({key}): {why}, and a tile has "
                             f"other tokens; use another sampler, or remove Quadtree Diffusion")
