"""A prompt per tile: each tile's model calls use its own cross-attention context and pooled output.

Data flow, through ComfyUI's extension points only:

1. The Quadtree Tile Conditioning node puts a :class:`TilePrompts` (the layout and one
   CONDITIONING entry per tile) into the options of the base prompt under :data:`KEY`.  ComfyUI
   keeps unknown option keys on its cond dicts, and the base prompt is what tiles without a
   prompt of their own (and every untiled call) use.
2. A keyed ``CALC_COND_BATCH`` wrapper (:meth:`TilePromptConds.calc_cond_batch`) finds those
   cond dicts and, once per sampling run, encodes every tile's prompt into model conds with
   ComfyUI's own ``convert_cond`` / ``encode_model_conds`` / ``model.extra_conds`` (so
   ``c_crossattn``, SDXL's ``y``, FLUX's pooled vector and guidance are what ComfyUI would
   build for that prompt).  They are kept on the run, by the cond's ``uuid``.
3. The engine, per tile batch, calls :func:`apply`: every chunk of the call whose ``uuid``
   (``transformer_options['uuids']``) has tile prompts gets, row by row, its tile's own model
   conds; other chunks (the negative) keep theirs.  Cross-attention contexts of different token
   counts share one call, padded the way ComfyUI's ``CONDCrossAttn.concat`` pads them (repeat to
   the least common multiple, which leaves attention unchanged).

A window takes the prompt of the layout tile under the centre of its core, so a prompt layout
and a sampling layout that are the same (the intended use) pair tile i with tile i.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import quadtree as qt
from .utils import RUN_KEY, P, cond_dicts

log = logging.getLogger(__name__)

KEY = "quadtree_tile_prompts"        # option key of the base prompt's cond dicts


@dataclass(frozen=True, eq=False)
class TilePrompts:
    """One CONDITIONING entry ``(cross_attn, options)`` per tile of ``layout`` (pixel units)."""
    layout: qt.Layout
    entries: tuple


def attach(conditioning: list, layout: qt.Layout, tile_conditioning: list) -> list:
    """The base ``conditioning`` with ``TilePrompts(layout, first entry of each tile_conditioning)``
    in every entry's options.  One tile conditioning per tile, in the layout's tile order."""
    n = len(layout.tiles)
    if len(tile_conditioning) != n:
        raise ValueError(f"tile_conditioning: {len(tile_conditioning)} prompts for the {n} tiles of the quadtree: "
                         f"give one per tile, in tile order (e.g. encode the captions of Quadtree Tile Crops "
                         f"of the same quadtree)")
    entries = []
    for i, cond in enumerate(tile_conditioning):
        if not isinstance(cond, (list, tuple)) or not cond or len(cond[0]) != 2:
            raise ValueError(f"tile_conditioning: item {i} is not a CONDITIONING (connect e.g. CLIP Text Encode)")
        entries.append((cond[0][0], dict(cond[0][1])))
    prompts = TilePrompts(layout, tuple(entries))
    return [[t, {**opts, KEY: prompts}] for t, opts in conditioning]


# --------------------------------------------------------------------------- per run

@dataclass
class PreparedPrompts:
    """A TilePrompts encoded for one run: per tile, ComfyUI's model conds; windows mapped to tiles."""
    prompts: TilePrompts
    model_conds: list            # per tile: {name: COND object}
    _index: dict

    def tile_of(self, win, H: int, W: int, oy: int = 0, ox: int = 0) -> int:
        """Index of the layout tile (scaled to the H x W latent) under the centre of ``win``'s core,
        the core offset by (oy, ox) on the canvas (a window of an area call)."""
        key = (H, W, oy, ox, win.core)
        hit = self._index.get(key)
        if hit is None:
            lay = self.prompts.layout
            sx, sy = lay.width / W, lay.height / H
            y0, y1, x0, x1 = win.core
            cx, cy = (ox + (x0 + x1) / 2) * sx, (oy + (y0 + y1) / 2) * sy
            hit = next((i for i, t in enumerate(lay.tiles) if t.x <= cx < t.x + t.w and t.y <= cy < t.y + t.h),
                       min(range(len(lay.tiles)), key=lambda i: _distance(lay.tiles[i], cx, cy)))
            self._index[key] = hit
        return hit


def _distance(t: qt.Tile, x: float, y: float) -> float:
    dx = max(t.x - x, 0.0, x - (t.x + t.w))
    dy = max(t.y - y, 0.0, y - (t.y + t.h))
    return dx * dx + dy * dy


def encode(model, prompts: TilePrompts, x_in: torch.Tensor, prompt_type: str) -> PreparedPrompts:
    """Every tile's prompt as model conds, built by ComfyUI itself as for a prompt of its own."""
    import comfy.sampler_helpers
    import comfy.samplers
    conds = comfy.sampler_helpers.convert_cond([[t, opts] for t, opts in prompts.entries])
    conds = comfy.samplers.encode_model_conds(model.extra_conds, conds, x_in, x_in.device, prompt_type)
    return PreparedPrompts(prompts, [c["model_conds"] for c in conds], {})


class TilePromptConds:
    """The keyed ``CALC_COND_BATCH`` wrapper that encodes tile prompts once per run."""

    def __init__(self):
        self._warned = False     # the one warning for calls outside a sampler run

    def __deepcopy__(self, memo):
        return self      # shared by model clones: per-run state lives on the run

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        """Encode the tile prompts of this call's conds (first call of a run) and pass everything on."""
        run = model_options.get("transformer_options", {}).get(RUN_KEY)
        for i, c in cond_dicts(conds):
            prompts = c.get(KEY)
            if prompts is None or (run is not None and c.get("uuid") in run.prompts):
                continue
            if run is None:
                if not self._warned:
                    self._warned = True
                    log.warning("%s tile prompts need a KSampler run: every tile uses the base prompt", P)
                continue
            run.prompts[c.get("uuid")] = encode(model, prompts, x_in, "positive" if i == 0 else "negative")
            if run.once("tile_prompts"):
                log.info("%s a prompt per tile: %d tile prompts over a %dx%dpx layout", P,
                         len(prompts.entries), prompts.layout.width, prompts.layout.height)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


# --------------------------------------------------------------------------- per tile batch

def chunk_prompts(run, to: dict, n_chunks: int) -> list | None:
    """Per chunk of the call, its PreparedPrompts or None; None when no chunk has tile prompts."""
    if run is None or not run.prompts:
        return None
    uuids = to.get("uuids") or []
    if len(uuids) < n_chunks:
        if run.once("no_uuids"):      # how tile prompts find their chunks: never silently lost
            log.warning("%s ComfyUI gave the model call no 'uuids' for its cond chunks: tile prompts cannot be "
                        "matched to their chunks, every tile uses the base prompt", P)
        return None
    out = [run.prompts.get(u) for u in uuids[:n_chunks]]
    return out if any(p is not None for p in out) else None


def pad_tokens(contexts: list) -> torch.Tensor:
    """ComfyUI's ``CONDCrossAttn.concat``: each context repeated along its tokens to the least common
    multiple of all token counts (attention over repeated keys is unchanged), then concatenated."""
    import comfy.conds
    first, *rest = [comfy.conds.CONDCrossAttn(c) for c in contexts]
    return first.concat(rest)


def apply(ct: dict, wins, frame: tuple, n_chunks: int, B: int, prompts: list) -> dict:
    """The tile batch's model kwargs with each prompted chunk's rows [tile][item] taken from its tile's
    own model conds: ``c_crossattn`` (token counts padded across the call) and every other
    non-spatial cond of the prompt whose per-row shape matches (pooled ``y``, guidance, ...).
    ``frame`` (oy, ox, H, W): where the windows' coordinates start on the H x W canvas."""
    oy, ox, H, W = frame
    k = len(wins)
    rows = k * B
    out = dict(ct)
    names = {name for p in prompts if p is not None for mc in p.model_conds for name in mc}
    for name in names:
        base = ct.get(name)
        if not torch.is_tensor(base) or base.shape[0] != n_chunks * rows:
            continue
        chunks = []
        for j, p in enumerate(prompts):
            own = base[j * rows:(j + 1) * rows]
            if p is not None:
                tiles = [p.model_conds[p.tile_of(w, H, W, oy, ox)].get(name) for w in wins]
                if all(c is not None for c in tiles):
                    parts = [c.process_cond(batch_size=B, device=base.device, area=None).cond.to(base)
                             for c in tiles]
                    spatial = parts[0].ndim >= 4      # canvas-shaped conds (concat latents) stay the tile's crop
                    if name == "c_crossattn" or (not spatial and all(t.shape[1:] == own.shape[1:] for t in parts)):
                        own = parts
            chunks.extend(own if isinstance(own, list) else [own])
        if name == "c_crossattn":
            out[name] = pad_tokens(chunks)
        elif all(c.shape[1:] == chunks[0].shape[1:] for c in chunks):
            out[name] = torch.cat(chunks)
    return out
