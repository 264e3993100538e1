"""A model call cut into tile batches: the rows and model kwargs of a batch of tile windows.

ComfyUI's model call holds ``n_chunks`` cond chunks (positive, negative, ...) of B rows each,
chunk-major. A batch of k windows becomes n_chunks * k * B rows, chunk-major then window:
spatial conditioning (canvas-sized at any scale) is cropped to each window, everything else is
repeated per window; references the family needs whole pass unchanged (model_families.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import model_families as mf
from .tile_windows import positions


@dataclass(frozen=True)
class TileBatch:
    """Where a batch of tiles lies: passed to deferred per-tile conditioning (ControlNet).

    ``windows`` are in latent units on the canvas ``H`` x ``W`` (never rolled: SpotDiffusion
    shifts its partition, not the latent).
    """
    windows: tuple
    H: int
    W: int
    n_chunks: int


def chunk_repeat(v: torch.Tensor, n_chunks: int, k: int) -> torch.Tensor:
    """[n_chunks*B, ...] -> [n_chunks*k*B, ...], chunk-major: every chunk holds its k tiles in turn."""
    vv = v.reshape(n_chunks, 1, v.shape[0] // n_chunks, *v.shape[1:])
    return vv.expand(n_chunks, k, *vv.shape[2:]).reshape(-1, *v.shape[1:])


def spatial_scale(shape, H: int, W: int):
    """(sh, sw) if the last two dims are the canvas at one scale (e.g. pixel-space hints), else None."""
    h, w = shape[-2], shape[-1]
    sh, sw = h / H, w / W
    if abs(sh - sw) > 1e-6 * max(sh, sw) + 1.0 / min(H, W):
        return None
    return sh, sw


def crop_scaled(v: torch.Tensor, win, scale) -> torch.Tensor:
    """``v``'s crop to the window ``win`` (latent units) at ``scale`` (sh, sw) units per latent px."""
    sh, sw = scale
    y0, y1 = int(round(win.y0 * sh)), int(round(win.y1 * sh))
    x0, x1 = int(round(win.x0 * sw)), int(round(win.x1 * sw))
    return v[..., y0:y1, x0:x1]


def crop_batch(v: torch.Tensor, wins, scale) -> torch.Tensor:
    """The crops of ``v`` [n_chunks, B, ..., H', W'] under each window (at ``scale``), stacked on
    dim 1: [n_chunks, k, B, ..., h, w].  Windows with box tensors (a tile batch) are cut in one
    indexed read; any other sequence of windows one by one."""
    boxes = getattr(wins, "boxes", None)
    if boxes is not None:
        sh, sw = scale
        b = torch.round(boxes.to(torch.float64) * torch.tensor([sh, sh, sw, sw], dtype=torch.float64)).long()
        hs, ws = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
        if bool((hs == hs[0]).all()) and bool((ws == ws[0]).all()) and int(b[:, 1].max()) <= v.shape[-2] \
                and int(b[:, 3].max()) <= v.shape[-1] and int(b.min()) >= 0:
            h, w = int(hs[0]), int(ws[0])
            Hs, Ws = v.shape[-2], v.shape[-1]
            pos = positions(b[:, [0, 2]], h, w, Ws, v.device).reshape(-1)
            g = v.reshape(-1, Hs * Ws).index_select(1, pos).reshape(*v.shape[:-2], len(wins), h, w)
            return g.movedim(-3, 1)
    return torch.stack([crop_scaled(v, w, scale) for w in wins], dim=1)


def map_tensors(v, fn):
    """Apply ``fn`` to every tensor in a (nested) dict / list / tuple of model kwargs; a deferred
    control marker (it has ``tile_control``) goes to ``fn`` too; everything else is kept as is."""
    if torch.is_tensor(v) or hasattr(v, "tile_control"):
        return fn(v)
    if isinstance(v, dict):
        return {k: map_tensors(x, fn) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(map_tensors(e, fn) for e in v)
    return v


def tile_value(v, wins, n_chunks: int, N: int, H: int, W: int, spatial: bool = True, cache=None):
    """One conditioning value for a batch of tile windows, chunk-major.

    Tensors of batch N: spatial ones (>= 4-D, canvas-sized at some scale) are cropped to each
    window; others are repeated per tile.  Dicts and lists are handled element-wise; anything
    else (and tensors of another batch) passes unchanged.
    """
    k = len(wins)

    def one(v):
        if not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] != N:
            return v
        if spatial and v.ndim >= 4:
            scale = spatial_scale(v.shape, H, W)
            if scale is not None:
                vv = v.reshape(n_chunks, N // n_chunks, *v.shape[1:])
                crops = crop_batch(vv, wins, scale)
                return crops.reshape(-1, *crops.shape[3:])
        if cache is None:
            return chunk_repeat(v, n_chunks, k)
        key = (id(v), k)      # the same tensor repeated for the same tile count: one copy per call
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = chunk_repeat(v, n_chunks, k)
        return hit

    return map_tensors(v, one)


def tile_cond(c: dict, wins, n_chunks: int, N: int, H: int, W: int, cache=None, whole=mf.WHOLE_KEYS) -> dict:
    """The model kwargs for a batch of tiles (see :func:`tile_value`); keys in ``whole`` are never cropped."""
    out = {}
    for key, v in c.items():
        if key == "transformer_options" or hasattr(v, "tile_control"):
            out[key] = v    # deferred control is computed per tile batch in TiledDiffusion._evaluate
        elif hasattr(v, "for_windows"):     # a tile needs more than a crop (positional_inputs.py)
            out[key] = v.for_windows(wins, n_chunks, N, H, W)
        else:
            out[key] = tile_value(v, wins, n_chunks, N, H, W, spatial=key not in whole, cache=cache)
    return out


def select_rows(c: dict, rows: slice, N: int) -> dict:
    """The model kwargs restricted to some rows of the batch (tensors of batch N, at any depth)."""
    def one(v):
        if hasattr(v, "select_rows"):     # deferred per-tile control (tile_control.DeferredControl)
            return v.select_rows(rows, N)
        return v[rows] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == N else v
    return {k: (v if k == "transformer_options" else map_tensors(v, one)) for k, v in c.items()}


def check_items(B: int, items: int) -> None:
    """One layout per image of an IMAGE batch needs a latent batch of as many items."""
    if B != items:
        raise ValueError(f"quadtree: {items} layouts (one per image of the IMAGE batch) but the latent batch "
                         f"is {B}; encode the same image batch you gave QuadtreeVisualizer, or give it one "
                         f"image")


def item_rows(x, t, c: dict, n_chunks: int, items: int):
    """With one layout per image of an IMAGE batch: (b, rows, x, t, model kwargs) of item b in every
    cond chunk, for each item (rows are chunk-major: a strided slice, no index tensor)."""
    N = x.shape[0]
    B = N // n_chunks
    check_items(B, items)
    for b in range(B):
        rows = slice(b, None, B)
        yield b, rows, x[rows], (t[rows] if t.ndim > 0 and t.shape[0] == N else t), select_rows(c, rows, N)


def chunk_subset(x, t, c, cou, n_chunks: int, chunks: list):
    """(rows, timestep, model kwargs, cond_or_uncond) of some cond chunks of a call (rows are
    chunk-major), with ``transformer_options``' per-chunk lists cut to match."""
    N = x.shape[0]
    B = N // n_chunks
    to = c.get("transformer_options", {})
    rows = [j * B + b for j in chunks for b in range(B)]
    tr = t[rows] if t.ndim > 0 and t.shape[0] == N else t
    cr = select_rows(c, rows, N)
    coul = [cou[j] for j in chunks]
    cr["transformer_options"] = {**to, "cond_or_uncond": coul}
    if "uuids" in to:
        cr["transformer_options"]["uuids"] = [to["uuids"][j] for j in chunks]
    return rows, tr, cr, coul


def source_fits(src: torch.Tensor, x: torch.Tensor, n_chunks: int) -> bool:
    B = x.shape[0] // n_chunks
    return src.shape[1:] == x.shape[1:] and src.shape[0] in (1, B)


def broadcast_source(src, x, n_chunks):
    B = x.shape[0] // n_chunks
    sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
    return sv.expand(n_chunks, B, *x.shape[1:]).reshape(x.shape).clone()
