"""Per-tile model patches: spatial controls that live in ``transformer_options['patches']``.

ComfyUI's *model patch* controls (``comfy_extras/nodes_model_patch.py``: the Qwen-Image DiffSynth
ControlNet, the Z-Image Fun ControlNet, the USO style projector) are not ``ControlBase`` objects in
the cond: they are callables the diffusion model calls between its blocks, kept in the model's
``transformer_options['patches'][kind]`` lists.  An image patch holds the control ``image`` (IMAGE
``[B, H, W, C]``) and, when the model input's size differs from the size it last encoded, scales
the whole image to that size and encodes it.  Called on a tile, it would squash the whole control
image into the tile.  So, per tile batch, the engine hands the model a copy of
``transformer_options`` whose patch lists hold per-tile copies:

* **image patches** (an ``image`` / ``inpaint_image`` IMAGE, ``encoded_image``, ``vae``): the copy's
  images are the tile batch's crops of the image scaled to the canvas exactly as the patch scales it
  for a canvas-sized call (``common_upscale(..., "area", "center")`` to canvas x VAE compression),
  one row per model-input row (``[chunk][tile][batch item]``); its ``mask`` is the crop at the
  mask's own resolution; its encoding is cleared, so the patch encodes its own crop at the tile's
  size (a resize to the same size: the identity);
* **row patches** (:data:`ROW_PATCHES`: a non-spatial ``encoded_image`` whose batch must match the
  rows, USO's style tokens): the copy's tensor is repeated to the tile batch's rows, chunk-major;
* anything else is passed unchanged.

The copies are kept for the run (``RunState.hints``), one per (patch, tile windows, rows): each
encodes its crop once and reuses it at every later step, like the original patch does for the
canvas.  Nothing is written to the original patch.
"""
from __future__ import annotations

import copy

import torch

# Patches whose ``encoded_image`` is per model-input row at this dim (not spatial): class name -> dim.
ROW_PATCHES = {"UsoStyleProjectorPatch": 1}

IMAGE_ATTRS = ("image", "inpaint_image")


def is_image_patch(p) -> bool:
    """A patch that encodes a control image at the model input's size (DiffSynth / Z-Image Fun style)."""
    img = getattr(p, "image", None)
    inp = getattr(p, "inpaint_image", None)
    return hasattr(p, "encoded_image") and hasattr(p, "vae") and any(
        torch.is_tensor(v) and v.ndim == 4 for v in (img, inp))


def row_order(n_chunks: int, k: int, per_tile: int, n_images: int) -> list[tuple[int, int]]:
    """(tile, image index) of each model-input row, rows ``[chunk][tile][item]``; item b takes
    image b mod n_images (ComfyUI's broadcast of a hint over a batch)."""
    return [(j, b % n_images) for _ in range(n_chunks) for j in range(k) for b in range(per_tile)]


def crop_rows(v: torch.Tensor, windows, H: int, W: int, order, channels_last=False) -> torch.Tensor:
    """Rows of crops of ``v`` (canvas-sized at any scale: an IMAGE [B, H', W', C] with
    ``channels_last``, else [B, ..., H', W']) under each row's window (``tile_control.crop_window``:
    the window scaled to ``v``'s resolution): out[r] = crop(v[i_r], window of tile j_r)."""
    from .tile_control import crop_window
    t = v.movedim(-1, 1) if channels_last else v
    crops = [crop_window(t, w, H, W) for w in windows]
    if channels_last:
        crops = [c.movedim(1, -1) for c in crops]
    if len(crops) == 1 and v.shape[0] == 1:
        return crops[0]          # one crop for every row: batch 1 broadcasts, as for the canvas
    return torch.stack([crops[j][i % v.shape[0]] for j, i in order])


def canvas_image(p, attr: str, H: int, W: int, cache: dict):
    """The patch's image scaled to the H x W latent canvas as the patch scales it for a canvas-sized call."""
    import comfy.utils
    img = getattr(p, attr, None)
    if not torch.is_tensor(img):
        return None
    c = p.vae.spacial_compression_encode()
    key = ("patch_image", id(p), attr, H, W)
    hit = cache.get(key)
    if hit is not None and hit[0] is img:
        return hit[1]
    out = comfy.utils.common_upscale(img.movedim(-1, 1), W * c, H * c, "area", "center").movedim(1, -1)
    cache[key] = (img, out)
    return out


def tile_image_patch(p, tb, per_tile: int, cache: dict):
    """A copy of image patch ``p`` whose images (and mask) are the tile batch's crops, row by row."""
    c = copy.copy(p)
    k = len(tb.windows)
    for attr in IMAGE_ATTRS:
        full = canvas_image(p, attr, tb.H, tb.W, cache)
        if full is None:
            continue
        order = row_order(tb.n_chunks, k, per_tile, full.shape[0])
        setattr(c, attr, crop_rows(full, tb.windows, tb.H, tb.W, order, channels_last=True))
    mask = getattr(p, "mask", None)
    if torch.is_tensor(mask):          # at its own resolution ([B, 1, 1, h, w] in nodes_model_patch)
        order = row_order(tb.n_chunks, k, per_tile, mask.shape[0])
        c.mask = crop_rows(mask, tb.windows, tb.H, tb.W, order)
    c.encoded_image = None
    if hasattr(c, "encoded_image_size"):
        c.encoded_image_size = None
    if hasattr(c, "temp_data"):
        c.temp_data = None
    return c


def tile_row_patch(p, dim: int, tb, per_tile: int, canvas_rows: int):
    """A copy of row patch ``p`` whose ``encoded_image`` has one entry per model-input row along ``dim``:
    the canvas call's row (chunk, item) for every tile row (chunk, tile, item); a single entry is
    repeated to all rows."""
    v = getattr(p, "encoded_image", None)
    if not torch.is_tensor(v):
        return p
    k = len(tb.windows)
    rows = tb.n_chunks * k * per_tile
    n = v.shape[dim]
    if n == canvas_rows and canvas_rows == tb.n_chunks * per_tile:
        idx = [ch * per_tile + b for ch in range(tb.n_chunks) for _ in range(k) for b in range(per_tile)]
    elif n == 1:
        idx = [0] * rows
    else:
        return p
    c = copy.copy(p)
    c.encoded_image = v.index_select(dim, torch.tensor(idx, device=v.device))
    return c


def tile_transformer_options(to: dict, tb, rows: int, cache: dict, device=None) -> dict:
    """``transformer_options`` for one tile batch of ``rows`` model-input rows on ``device``: every
    image / row patch in ``to['patches']`` replaced by its per-tile copy (kept in ``cache`` for the run,
    per device: ComfyUI's multi-GPU path samples on several)."""
    patches = to.get("patches") if isinstance(to, dict) else None
    if not patches:
        return to
    k = len(tb.windows)
    per_tile = max(1, rows // (tb.n_chunks * k))
    canvas_rows = tb.n_chunks * per_tile
    new = {}
    changed = False
    for kind, lst in patches.items():
        out = []
        for p in lst:
            dim = ROW_PATCHES.get(type(p).__name__)
            if dim is None and not is_image_patch(p):
                out.append(p)
                continue
            key = ("patch", id(p), tuple((w.y0, w.y1, w.x0, w.x1) for w in tb.windows), rows, tb.H, tb.W,
                   str(device))
            hit = cache.get(key)
            if hit is None or hit[0] is not p:
                q = tile_row_patch(p, dim, tb, per_tile, canvas_rows) if dim is not None else \
                    tile_image_patch(p, tb, per_tile, cache)
                hit = cache[key] = (p, q)
            out.append(hit[1])
            changed = True
        new[kind] = out
    if not changed:
        return to
    to = dict(to)
    to["patches"] = new
    return to
