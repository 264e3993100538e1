"""Per-tile model patches: spatial controls that live in ``transformer_options['patches']``.

ComfyUI's *model patch* controls (``comfy_extras/nodes_model_patch.py``: the Qwen-Image DiffSynth
ControlNet, the Z-Image Fun ControlNet, the Wan Uni3C camera control, the USO style projector) are
not ``ControlBase`` objects in the cond: they are callables the diffusion model calls between its
blocks, kept in the model's ``transformer_options['patches'][kind]`` lists.  A spatial patch holds
a control image (or video) and, when the model input's size differs from the size it last encoded,
scales the whole of it to that size and encodes it.  Called on a tile, it would squash the whole
control into the tile.  So, per tile batch, the engine hands the model a copy of
``transformer_options`` whose patch lists hold per-tile copies, each patch met by the first of
these that fits (all feature-detected):

* **patches that crop themselves** (``spatial_crop_inputs(regions=, source_width=, source_height=,
  target_width=, target_height=)``, ComfyUI's own per-tile copy on newer DiffSynth / Z-Image patches):
  called on a copy whose images are scaled to the canvas exactly as the patch scales them for a
  canvas-sized call, with one pixel-space region per model-input row (``[chunk][tile][batch item]``),
  so ComfyUI's crop is exactly the tile's part of what the canvas call would use;
* **image patches** (an ``image`` / ``inpaint_image`` IMAGE, ``encoded_image``, ``vae``): the copy's
  images are the tile batch's crops of the image scaled to the canvas as above
  (``common_upscale(..., "area", "center")`` to canvas x VAE compression), one row per model-input
  row; its ``mask`` is the crop at the mask's own resolution; its encoding is cleared, so the patch
  encodes its own crop at the tile's size (a resize to the same size: the identity);
* **video patches** (``render_video`` IMAGE frames, ``encode_render_video``, ``prepared_render``: Wan
  Uni3C): every tile's crop of the render scaled to the canvas (``"bilinear", "center"``, as the
  patch does), every frame kept, is encoded by the patch's own ``encode_render_video`` (which trims
  or repeats frames as for the canvas); the copy's ``prepared_render`` holds them, one row per tile
  and batch item of the first cond chunk (the patch builds its control input from that chunk only);
* **row patches** (:data:`ROW_PATCHES`: a non-spatial ``encoded_image`` whose batch must match the
  rows, USO's style tokens): the copy's tensor is repeated to the tile batch's rows, chunk-major;
* anything else is passed unchanged, and named once per run (INFO): a control in it is not cropped.

The copies are kept for the run (``RunState.hints``), one per (patch, tile windows, rows): each
encodes its crop once and reuses it at every later step, like the original patch does for the
canvas.  Nothing is written to the original patch.
"""
from __future__ import annotations

import copy
import inspect
import logging

import torch

from .utils import P

log = logging.getLogger(__name__)

# Patches whose ``encoded_image`` is per model-input row at this dim (not spatial): class name -> dim.
ROW_PATCHES = {"UsoStyleProjectorPatch": 1}

IMAGE_ATTRS = ("image", "inpaint_image")


def is_image_patch(p) -> bool:
    """A patch that encodes a control image at the model input's size (DiffSynth / Z-Image Fun style)."""
    img = getattr(p, "image", None)
    inp = getattr(p, "inpaint_image", None)
    return hasattr(p, "encoded_image") and hasattr(p, "vae") and any(
        torch.is_tensor(v) and v.ndim == 4 for v in (img, inp))


def is_video_patch(p) -> bool:
    """A patch that encodes a render video at the model input's size (Wan Uni3C style)."""
    v = getattr(p, "render_video", None)
    return (torch.is_tensor(v) and v.ndim == 4 and callable(getattr(p, "encode_render_video", None))
            and hasattr(p, "prepared_render") and hasattr(p, "vae"))


def crops_itself(p) -> bool:
    """A patch with ComfyUI's own per-tile copy (``spatial_crop_inputs``)."""
    return callable(getattr(p, "spatial_crop_inputs", None))


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


def _pixels_per_latent(p, compression: int) -> int:
    """The patch's own image pixels per latent pixel (its VAE's), else the model's."""
    vae = getattr(p, "vae", None)
    f = getattr(vae, "spacial_compression_encode", None)
    return int(f()) if callable(f) else int(compression)


def canvas_image(p, attr: str, H: int, W: int, cache: dict, mode: str = "area", c: int | None = None):
    """The patch's IMAGE ``attr`` scaled to the H x W latent canvas (``c`` px per latent px) as the patch
    scales it for a canvas-sized call: ``common_upscale(.., mode, "center")``; kept as is when it
    already has that size (the video patch's rule).  None if the patch has no such image."""
    import comfy.utils
    img = getattr(p, attr, None)
    if not torch.is_tensor(img) or img.ndim != 4:
        return None
    c = _pixels_per_latent(p, 8) if c is None else c
    key = ("patch_image", id(p), attr, H, W, mode, c)
    hit = cache.get(key)
    if hit is not None and hit[0] is img:
        return hit[1]
    if mode != "area" and tuple(img.shape[1:3]) == (H * c, W * c):
        out = img
    else:
        out = comfy.utils.common_upscale(img.movedim(-1, 1), W * c, H * c, mode, "center").movedim(1, -1)
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


def crop_regions(tb, per_tile: int, n_images: int, c: int):
    """Pixel-space ``(left, top, right, bottom)`` regions for ``spatial_crop_inputs`` whose crops, each
    region giving one crop per image of the patch (region-major), are the model-input rows
    ``[chunk][tile][item]`` (item b: image b mod n_images); None when no list of regions gives those
    rows (items that do not cycle through whole sets of images).  A single tile with a single image
    gives one region: one crop for every row, as the canvas call broadcasts its single image."""
    boxes = [(w.x0 * c, w.y0 * c, w.x1 * c, w.y1 * c) for w in tb.windows]
    if len(boxes) == 1 and n_images == 1:
        return boxes
    if per_tile % n_images:
        return None
    return [box for _ in range(tb.n_chunks) for box in boxes for _ in range(per_tile // n_images)]


def tile_crop_patch(p, tb, per_tile: int, cache: dict, compression: int):
    """ComfyUI's own per-tile copy of ``p`` (``spatial_crop_inputs``), made from a copy whose images are
    scaled to the canvas as for a canvas-sized call, so that the crop it makes of them is the tile's
    exact part; None when the rows cannot be given as regions (then the pack's own crop is used)."""
    c = _pixels_per_latent(p, compression)
    src = copy.copy(p)
    n_images = 1
    for attr in IMAGE_ATTRS:
        full = canvas_image(p, attr, tb.H, tb.W, cache, c=c)
        if full is not None:
            setattr(src, attr, full)
            n_images = max(n_images, full.shape[0])
    regions = crop_regions(tb, per_tile, n_images, c)
    if regions is None:
        return None
    h, w = tb.windows[0].size
    return src.spatial_crop_inputs(regions=regions, source_width=tb.W * c, source_height=tb.H * c,
                                   target_width=w * c, target_height=h * c)


def tile_video_patch(p, tb, per_tile: int, frames: int, cache: dict):
    """A copy of video patch ``p`` whose ``prepared_render`` is, row by row ([tile][item] of one cond
    chunk), the patch's own encoding (``encode_render_video``) of its tile's crop of the render scaled to
    the canvas, every frame kept (the patch trims or repeats frames to the latent's as for the canvas)."""
    from .tile_control import crop_window
    full = canvas_image(p, "render_video", tb.H, tb.W, cache, mode="bilinear")
    h, w = tb.windows[0].size
    encoded = []
    for win in tb.windows:
        one = copy.copy(p)
        one.render_video = crop_window(full.movedim(-1, 1), win, tb.H, tb.W).movedim(1, -1)
        one.prepared_render = None
        encoded.append(one.encode_render_video((frames, h, w)))
    q = copy.copy(one)
    if len(encoded) > 1:
        encoded = [e.expand(per_tile, *e.shape[1:]) if e.shape[0] == 1 else e for e in encoded]
    q.prepared_render = torch.cat(encoded)
    if hasattr(q, "temp_data"):
        q.temp_data = None
    return q


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


def patch_name(p) -> str:
    """The name of a patch's class (of a patch function: its own) for a log line."""
    return p.__qualname__ if inspect.isfunction(p) or inspect.ismethod(p) else type(p).__name__


def tile_patch(p, tb, xt: torch.Tensor, cache: dict, compression: int):
    """Patch ``p``'s copy for the tile batch ``xt`` (``tb``), or None if the tiler does not know it."""
    k = len(tb.windows)
    per_tile = max(1, xt.shape[0] // (tb.n_chunks * k))
    if crops_itself(p):
        try:
            q = tile_crop_patch(p, tb, per_tile, cache, compression)
        except (TypeError, ValueError) as e:      # the protocol changed: the pack's own crop where it knows one
            q = None
            key = ("patch_crop_failed", patch_name(p))
            if key not in cache:
                cache[key] = True
                log.warning("%s %s.spatial_crop_inputs failed (%s: %s): the tiler crops it itself where it can", P,
                            patch_name(p), type(e).__name__, e)
        if q is not None:
            return q
    dim = ROW_PATCHES.get(type(p).__name__)
    if dim is not None:
        return tile_row_patch(p, dim, tb, per_tile, tb.n_chunks * per_tile)
    if is_image_patch(p):
        return tile_image_patch(p, tb, per_tile, cache)
    if is_video_patch(p):
        return tile_video_patch(p, tb, per_tile, xt.shape[2] if xt.ndim == 5 else 1, cache)
    return None


def tile_transformer_options(to: dict, tb, xt: torch.Tensor, cache: dict, compression: int = 8) -> dict:
    """``transformer_options`` for the tile batch ``xt`` (``tb``; the model's ``compression`` image px per
    latent px): every patch in ``to['patches']`` the tiler knows replaced by its per-tile copy (kept in
    ``cache`` for the run, per device: ComfyUI's multi-GPU path samples on several); a patch it does not
    know is passed on unchanged and named once per ``cache`` (run)."""
    patches = to.get("patches") if isinstance(to, dict) else None
    if not patches:
        return to
    rows = xt.shape[0]
    windows = tuple((w.y0, w.y1, w.x0, w.x1) for w in tb.windows)
    new = {}
    changed = False
    for kind, lst in patches.items():
        out = []
        for p in lst:
            key = ("patch", id(p), windows, rows, tb.H, tb.W, str(xt.device))
            hit = cache.get(key)
            if hit is None or hit[0] is not p:
                hit = cache[key] = (p, tile_patch(p, tb, xt, cache, compression))
            if hit[1] is None:
                _note_unknown(p, kind, cache)
                out.append(p)
                continue
            out.append(hit[1])
            changed = True
        new[kind] = out
    if not changed:
        return to
    to = dict(to)
    to["patches"] = new
    return to


def _note_unknown(p, kind: str, cache: dict) -> None:
    """One INFO line per run (``cache``) for each patch class the tiler passes on unchanged."""
    name = patch_name(p)
    key = ("unknown_patch", name)
    if key in cache:
        return
    cache[key] = True
    log.info("%s model patch %s ('%s') is not one the tiler knows: passed on unchanged to every tile (a control "
             "image in it is not cropped per tile)", P, name, kind)
