"""What the tile engine must know about each model family, found on the model itself.

ComfyUI's model families differ in ways a tiler must respect; everything here is read from the
model (feature detection, never ComfyUI versions) with a small table where the model declares
nothing:

* **latent patch** (:func:`spatial_patch`): latent px per token side.  Diffusion models call it
  ``patch_size`` (SD3, FLUX, Wan: an int or a ``(t, h, w)`` tuple), ``patch_spatial`` (Cosmos /
  Anima), ``patchifier.patch_size`` (LTXV), or do it with a ``PixelUnshuffle`` as the first layer
  of their input ``embedding`` (Stable Cascade stage B: 4).  Tiles are aligned to it so the model
  never pads a tile (Cosmos refuses unaligned sizes; most others pad silently).
* **minimum tile** (:func:`min_tile`): PixArt's positional embedding divides by
  ``round((h + w) / 2 / 64)`` (latent px; Python rounds half to even), zero for tiles under 33 latent
  px on average: smaller tiles are enlarged.
* **conditioning**: which model inputs are references (given whole to every tile even when they have
  the canvas's size, :data:`WHOLE_KEYS`) and which are spatial at another scale that the model
  resamples to the latent (:data:`RESAMPLED_KEYS`: Stable Cascade stage B's ``effnet``): resampling
  them to the canvas once, as the model would, makes each tile's crop exact.
"""
from __future__ import annotations

import torch

# Model inputs that are context for the whole picture, never a canvas: given whole to every tile
# (repeated per tile row), even when their last two dims happen to have the canvas's proportions.
#   ref_latents          FLUX Kontext / Flux.2 / Qwen-Image-Edit / Omnigen2 reference images (a list)
#   reference_latent     Wan reference image (tokens of its own, through ref_conv / patch embedding)
#   encoder_hidden_states_llama3  HiDream per-layer text tokens [B, layers, tokens, dim]
#   face_pixel_values    Wan-Animate face crops [B, 3, T, 512, 512]
#   clip_fea             CLIP-vision tokens (Wan, HunyuanVideo 1.5)
WHOLE_KEYS = frozenset({"ref_latents", "reference_latent", "encoder_hidden_states_llama3", "face_pixel_values",
                        "clip_fea"})

# Spatial inputs at another scale that the model resamples to its (embedded) latent itself:
# key -> (torch interpolate mode, align_corners).  Stable Cascade stage B upsamples ``effnet`` (the
# stage-C latent, ~1/10.7 of its own) bilinearly to the latent after its 4x4 PixelUnshuffle.
RESAMPLED_KEYS = {"effnet": ("bilinear", True)}

# Smallest tile side (latent px) a diffusion-model class takes, by class name.
MIN_TILE = {"PixArtMS": 33}

PATCH_ATTRS = ("patch_size", "patch_spatial")


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
    emb = getattr(dm, "embedding", None)
    first = emb[0] if isinstance(emb, torch.nn.Sequential) and len(emb) else None
    if isinstance(first, torch.nn.PixelUnshuffle):
        return int(first.downscale_factor)
    return 1


def min_tile(base_model) -> int:
    """Smallest tile side in latent px the model takes (:data:`MIN_TILE`), on its patch grid; 1 if any."""
    dm = getattr(base_model, "diffusion_model", None)
    m = max((v for k, v in MIN_TILE.items() if any(c.__name__ == k for c in type(dm).__mro__)), default=1)
    p = spatial_patch(base_model)
    return -(-m // p) * p


def is_whole(key: str) -> bool:
    return key in WHOLE_KEYS


def canvas_cond(c: dict, base_model, H: int, W: int) -> dict:
    """The model kwargs with every :data:`RESAMPLED_KEYS` input resampled to the canvas the way the
    model resamples it (to H/p x W/p, p its patch), so a tile's crop of it is what the model would
    resample for that tile: v' = interpolate(v, (H/p, W/p), mode, align_corners)."""
    hit = [k for k in RESAMPLED_KEYS if torch.is_tensor(c.get(k)) and c[k].ndim == 4]
    if not hit:
        return c
    p = spatial_patch(base_model)
    size = (max(1, H // p), max(1, W // p))
    out = dict(c)
    for k in hit:
        mode, corners = RESAMPLED_KEYS[k]
        v = c[k]
        if tuple(v.shape[-2:]) != size:
            out[k] = torch.nn.functional.interpolate(v, size=size, mode=mode, align_corners=corners)
    return out

