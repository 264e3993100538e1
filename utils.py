"""What the nodes and the tile engine both need: option keys, the model's latent geometry, and
counting set pixels per rectangle."""
from __future__ import annotations

import torch

P = "[Quadtree Diffusion]"                    # log line prefixes (the predecessor pack's, kept for users' log filters)
PV = "[Quadtree Variable Denoise]:"
PS = "[Quadtree Skip]:"

WRAPPER_KEY = "quadtree_diffusion"            # key of our keyed wrappers on the model clone
RUN_KEY = "quadtree_diffusion_run"            # transformer_options entry holding the per-run state
SPOT_KEY = "quadtree_diffusion_spot"          # transformer_options entry of SpotDiffusion parameters

METHODS = ("MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion")
SHIFT_METHODS = ("random", "sorted", "fibonacci")


# Image pixels per latent pixel of the latent formats that do not compress 8x, by class name, as
# ComfyUI declares them since 0.11 (``LatentFormat.spacial_downscale_ratio``).  Used only where the
# running ComfyUI declares no ratio (0.3.x), so pixel sizes mean the same on every version.
KNOWN_COMPRESSION = {
    "Flux2": 16, "Wan22": 16, "HunyuanVideo15": 16,
    "LTXV": 32, "LTXAV": 32, "HunyuanImage21": 32,
    "SC_Prior": 42, "SC_B": 4,
    "ChromaRadiance": 1, "HiDreamO1Pixel": 1, "PixelDiTPixel": 1, "ZImagePixelSpace": 1,
}


def latent_compression(base_model) -> int:
    """Image pixels per latent pixel along each spatial axis (8 for SD/SDXL/SD3/FLUX VAEs).

    The model's own ``latent_format.spacial_downscale_ratio`` where ComfyUI declares one, else
    :data:`KNOWN_COMPRESSION` for its latent format class (or an ancestor), else 8.
    """
    fmt = getattr(base_model, "latent_format", None)
    for name in ("spacial_downscale_ratio", "spatial_downscale_ratio"):
        v = getattr(fmt, name, None)
        if isinstance(v, int) and v > 0:
            return v
    for cls in type(fmt).__mro__:
        if cls.__name__ in KNOWN_COMPRESSION:
            return KNOWN_COMPRESSION[cls.__name__]
    return 8


def latent_patch_size(base_model) -> int:
    """Latent pixels per token side of a patchifying model (2 for SD3/FLUX, 1 for UNets), under
    whatever name the family gives it, times what the family's other token streams need
    (``model_families.tile_align``: SCAIL's half-resolution pose, S2V's motion frames).

    Tile edges are aligned to it so the model never pads a tile.
    """
    from .model_families import tile_align
    return tile_align(base_model)


def cond_dicts(conds):
    """(i, cond) for every cond dict of a ``CALC_COND_BATCH`` call: ``conds`` holds one list per
    cond kind (i = 0 positive, 1 negative), each a list of ComfyUI's cond dicts (or None)."""
    for i, cond_list in enumerate(conds):
        for c in cond_list or ():
            if isinstance(c, dict):
                yield i, c


def group_by_size(evaluated, windows) -> list[list[int]]:
    """The evaluated window indices grouped by window size, in first-seen order: windows of one
    size can share a model call."""
    by_size: dict = {}
    for i in evaluated:
        by_size.setdefault(windows[i].size, []).append(i)
    return list(by_size.values())


def summed_area(mask: torch.Tensor) -> torch.Tensor:
    """S[y, x] = number of set pixels of ``mask[:y, :x]`` ([H+1, W+1], int64)."""
    return torch.nn.functional.pad(mask.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))


def counts_in(sat: torch.Tensor, rects) -> list[int]:
    """Set pixels inside each rectangle (y0, y1, x0, x1): S(y1,x1) - S(y0,x1) - S(y1,x0) + S(y0,x0)."""
    if not rects:
        return []
    r = torch.tensor(rects, dtype=torch.int64)
    y0, y1, x0, x1 = r.unbind(1)
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]).tolist()
