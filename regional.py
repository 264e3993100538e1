"""Regional prompts (``ConditioningSetArea`` and masks set to their bounds) under tiling.

ComfyUI evaluates a prompt with an area on the area's crop of the latent only: the unet wrapper
gets a call whose input is smaller than the canvas, and ComfyUI blends its x0 into the canvas
with the area's strength and feathering (``mult``).  Such a call is tiled here with the
canvas's own plan restricted to the area, so that per-tile denoise, skip and the tile blend hold
for regional prompts exactly as for the global one:

* only the evaluated canvas windows w that touch the area A cost model work; each is evaluated
  on w slid inside A (its size capped by A's), so its part w ∩ A sees as much context as a
  canvas window (a window that only grazes A is no sliver without context);
* its blend weight is the canvas's normalised weight on w ∩ A and 0 on the context: every window
  covering a point of A still covers it, so the weights keep summing to the canvas's;
* the activity maps and the source latent are the canvas's cropped to A, so
  x0' = src + A (x - src) + beta (M - x) keeps a d = 0 or skipped tile at the source latent.

With one tile covering the canvas, w slid inside A is A: the call is ComfyUI's untiled area call.

A prompt with a plain mask (``ConditioningSetMask`` without ``mask bounds``) is a canvas call:
ComfyUI weights its x0 by the mask, mult = mask * strength, so where the mask is 0 its x0 does not
count.  Its chunks are evaluated only on the windows holding a pixel of the mask's support
{mask != 0}: every window covering a pixel of the support is one of them, so there the blend
weights, normalised over these windows, are the canvas's; elsewhere its weight is 0.

Where the area sits is not in the model call: a keyed ``CALC_COND_BATCH`` wrapper
(:class:`RegionRecorder`) records, per cond ``uuid``, the area ComfyUI resolved for it (or its
mask's support), and the engine looks the call's chunks up by ``transformer_options['uuids']``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import model_families as mf
from . import variable_denoise as vd
from .tile_inputs import broadcast_source, chunk_subset, item_rows
from .tile_plan import TileConfig, plan_for
from .utils import (RUN_KEY, P, cond_dicts, counts_in, group_by_size, latent_compression, latent_patch_size,
                    summed_area)

log = logging.getLogger(__name__)

KEY = "quadtree_diffusion_regions"      # key of the keyed CALC_COND_BATCH wrapper


def area_box(area, H: int, W: int):
    """(y, x, h, w) in latent px of a resolved ComfyUI area (sizes..., offsets...) over its last two
    dims, clipped to the H x W canvas as ``get_area_and_mult`` clips it; None if it is not one."""
    if not isinstance(area, (tuple, list)) or len(area) < 4 or len(area) % 2 or isinstance(area[0], str):
        return None
    nd = len(area) // 2
    h, w, y, x = (int(v) for v in (area[nd - 2], area[nd - 1], area[2 * nd - 2], area[2 * nd - 1]))
    return y, x, min(H - y, h), min(W - x, w)


def mask_support(cond: dict, H: int, W: int) -> torch.Tensor | None:
    """Summed-area table of {mask * mask_strength != 0} over the H x W canvas (any batch item or
    frame) of a prompt with a plain mask; None without one, or with an area (an area call)."""
    mask = cond.get("mask")
    if "area" in cond or not torch.is_tensor(mask) or mask.ndim < 2 or tuple(mask.shape[-2:]) != (H, W):
        return None
    support = (mask != 0).reshape(-1, H, W).any(dim=0)
    if cond.get("mask_strength", 1.0) == 0:
        support = torch.zeros_like(support)
    return summed_area(support.cpu())


class RegionRecorder:
    """The keyed ``CALC_COND_BATCH`` wrapper that records each cond's area (or mask) on the run."""

    def __deepcopy__(self, memo):
        return self      # no state: shared by model clones

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        """Record the area or plain mask of every cond of this call by its uuid (the run keeps
        them), pass all on."""
        run = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is not None:
            H, W = int(x_in.shape[-2]), int(x_in.shape[-1])
            for _, c in cond_dicts(conds):
                uuid = c.get("uuid")
                if "area" in c and uuid not in run.areas:
                    run.areas[uuid] = area_box(c["area"], H, W)
                elif "mask" in c and uuid not in run.masks:
                    run.masks[uuid] = mask_support(c, H, W)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


def chunk_masks(run, to: dict, n_chunks: int) -> list | None:
    """Per chunk of a canvas call, the summed-area table of its mask prompt's support, or None for a
    prompt without a mask; None when no chunk has one."""
    uuids = to.get("uuids") or []
    if run is None or not run.masks or len(uuids) < n_chunks:
        return None
    sats = [run.masks.get(u) for u in uuids[:n_chunks]]
    return sats if any(s is not None for s in sats) else None


def touching(sat: torch.Tensor, windows, evaluated: tuple, cores: bool) -> tuple:
    """The evaluated windows holding a pixel of the mask's support: in their written part, the core
    (``cores``, SpotDiffusion's partition) or the whole window (blended windows)."""
    rects = [windows[i].core if cores else (windows[i].y0, windows[i].y1, windows[i].x0, windows[i].x1)
             for i in evaluated]
    return tuple(i for i, n in zip(evaluated, counts_in(sat, rects)) if n > 0)


def chunk_boxes(run, to: dict, n_chunks: int, h: int, w: int) -> list | None:
    """Per chunk of an area call, its (y, x, h, w) box on the canvas; None if any is unknown or
    does not have the call's size."""
    uuids = to.get("uuids") or []
    if run is None or len(uuids) < n_chunks:
        return None
    boxes = [run.areas.get(u) for u in uuids[:n_chunks]]
    if any(b is None or (b[2], b[3]) != (h, w) for b in boxes):
        return None
    return boxes


def slide_inside(a0: int, a1: int, length: int) -> tuple[int, int]:
    """[a0, a1) with its size capped at ``length``, moved the least to lie inside [0, length)."""
    size = min(a1 - a0, length)
    start = min(max(a0, 0), length - size)
    return start, start + size


@dataclass(frozen=True)
class Clipped:
    """A canvas window slid inside an area, in the area's coordinates (engine Window interface);
    ``core`` is the part of the canvas window inside the area."""
    y0: int
    y1: int
    x0: int
    x1: int
    core: tuple
    level: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)


class AreaPlan:
    """A canvas plan restricted to the box (y, x, h, w): what ``TiledDiffusion._evaluate`` needs
    (``windows``, ``H``, ``W``, ``groups``; ``frame`` places them on the canvas) plus each window's
    weights, in the box's coordinates.

    Window w touching the box is evaluated on w slid inside the box (its size capped by the box's),
    so the part w ∩ box gets the context a canvas window has; its weight is the canvas's normalised
    weight on w ∩ box and 0 on the context around it."""

    def __init__(self, plan, evaluated, weights: dict, box):
        y, x, h, w = box
        self.H, self.W = h, w
        self.frame = (y, x, plan.H, plan.W)     # the box's origin on the canvas, and the canvas
        self.windows, self.weights = [], {}
        for i in evaluated:
            win = plan.windows[i]
            cy0, cy1, cx0, cx1 = max(win.y0, y), min(win.y1, y + h), max(win.x0, x), min(win.x1, x + w)
            if cy1 <= cy0 or cx1 <= cx0:
                continue
            ey0, ey1 = slide_inside(win.y0 - y, win.y1 - y, h)
            ex0, ex1 = slide_inside(win.x0 - x, win.x1 - x, w)
            wt = weights[i].new_zeros(ey1 - ey0, ex1 - ex0)
            wt[cy0 - y - ey0:cy1 - y - ey0, cx0 - x - ex0:cx1 - x - ex0] = \
                weights[i][cy0 - win.y0:cy1 - win.y0, cx0 - win.x0:cx1 - win.x0]
            self.weights[len(self.windows)] = wt
            self.windows.append(Clipped(ey0, ey1, ex0, ex1, (cy0 - y, cy1 - y, cx0 - x, cx1 - x), win.level))
        self.evaluated = tuple(range(len(self.windows)))

    def groups(self, evaluated, windows=None) -> list[list[int]]:
        """Evaluated window indices grouped by window size (batchable together)."""
        return group_by_size(evaluated, self.windows if windows is None else windows)


# --------------------------------------------------------------------------- the engine's regional calls

class RegionalCalls:
    """The tile engine's handling of regional prompts (mixed into ``tiled_diffusion.TiledDiffusion``,
    whose ``_plan``, ``_step``, ``_coefficients`` and ``_evaluate`` it uses): calls of a prompt with
    an area, and the chunks of prompts with a plain mask in a canvas call."""

    def _evaluate_masked(self, model, x, t, c, cou, n_chunks, plan, windows, evaluated, weights,
                         run, masks):
        """``_evaluate`` with the chunks of each mask prompt evaluated only on the windows holding a
        pixel of its mask's support (:func:`touching`); ComfyUI weights its x0 by 0 everywhere else.
        Chunks that need the same windows share model calls."""
        groups: dict = {}           # windows to evaluate -> the chunks that need them
        for j, sat in enumerate(masks):
            ev = evaluated if sat is None else touching(sat, windows, evaluated, cores=weights is None)
            if sat is not None and run.once(f"mask{id(sat)}"):
                log.info("%s prompt with a mask: evaluated on the %d of %d tile windows that hold its mask", P,
                         len(ev), len(evaluated))
            run.stats["mask_saved"] += len(evaluated) - len(ev)
            groups.setdefault(ev, []).append(j)
        run.stats["tiles"] += sum(len(ev) for ev in groups) - len(evaluated)
        run.stats["mask_apart"] += sum(len(ev) for ev in groups if ev != evaluated)
        out = torch.zeros_like(x)           # x0 of a mask prompt where its mask is 0: weighted 0 by ComfyUI
        for ev, chunks in groups.items():
            if not ev:
                continue
            wts = plan.normalized(ev) if weights is not None and ev != evaluated else weights
            if len(chunks) == n_chunks:
                return self._evaluate(model, x, t, c, cou, n_chunks, plan, windows, ev, wts, run)
            rows, tr, cr, coul = chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] = self._evaluate(model, x[rows], tr, cr, coul, len(chunks), plan, windows, ev, wts, run)
        return out

    def _area_call(self, model, x, t, c, cou, n_chunks, base, run):
        """A call on part of the canvas (a prompt with an area): each group of chunks with the same
        box on the canvas is evaluated with the canvas plan restricted to that box (:class:`AreaPlan`);
        with one layout per IMAGE-batch item, each item with its own plan."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        to = c.get("transformer_options", {})
        boxes = chunk_boxes(run, to, n_chunks, h, w)
        if boxes is None:
            return self._area_grid_call(model, x, t, c, cou, n_chunks, base, run)
        items = len(self.cfg.layouts)
        if items == 1:
            return self._area_boxes(model, x, t, c, cou, n_chunks, run, base, boxes, 0)
        out = torch.empty_like(x)
        for b, rows, xb, tb, cb in item_rows(x, t, c, n_chunks, items):
            out[rows] = self._area_boxes(model, xb, tb, cb, cou, n_chunks, run, base, boxes, b)
        return out

    def _area_boxes(self, model, x, t, c, cou, n_chunks, run, base, boxes, item):
        """The chunks of an area call grouped by their box, each group evaluated on its box."""
        out = torch.empty_like(x)
        for box in dict.fromkeys(boxes):          # the distinct boxes, in call order
            chunks = [j for j, b in enumerate(boxes) if b == box]
            if len(chunks) == n_chunks:
                return self._area_item(model, x, t, c, cou, n_chunks, run, base, box, item)
            rows, tr, cr, coul = chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] = self._area_item(model, x[rows], tr, cr, coul, len(chunks), run, base, box, item)
        return out

    def _area_item(self, model, x, t, c, cou, n_chunks, run, base, box, item=0):
        """x0' = src + A (x - src) + beta (M - x) on the box, with the canvas plan's windows clipped to it."""
        y, x0, h, w = box
        Hc, Wc = run.canvas
        plan = self._plan(run, Hc, Wc, base, x, item)
        step, n = self._step(run, t, c.get("transformer_options", {}))
        src = run.source
        B = x.shape[0] // n_chunks
        if src is not None and len(self.cfg.layouts) > 1 and src.shape[0] == len(self.cfg.layouts):
            src = src[item:item + 1]
        src = src[..., y:y + h, x0:x0 + w] if src is not None and src.shape[-2:] == (Hc, Wc) and \
            src.shape[0] in (1, B) and src.shape[1:-2] == x.shape[1:-2] else None
        coeffs = self._coefficients(plan, run, step, n, src, x)
        evaluated = plan.windows_of({lvl for lvl, (a, _) in enumerate(coeffs) if a > 0})
        # SpotDiffusion: the unshifted partition (normalised weights 1), whose tiles carry the levels
        area = AreaPlan(plan, evaluated, plan.normalized(evaluated), box)
        run.stats["tiles"] += len(area.windows)
        if run.once(f"area{box}"):
            log.info("%s prompt with an area (%d,%d %dx%d latent px): %d of the canvas's tile windows, clipped to it",
                     P, x0, y, w, h, len(area.windows))
        if not area.windows:
            return broadcast_source(src, x, n_chunks)
        blend = self._evaluate(model, x, t, c, cou, n_chunks, area, area.windows, area.evaluated, area.weights, run)
        if all(a == 1.0 and b == 1.0 for a, b in coeffs):
            return blend
        A, beta = plan.activity_maps(coeffs)
        A, beta = A[y:y + h, x0:x0 + w], beta[y:y + h, x0:x0 + w]
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        mv = blend.reshape(n_chunks, B, *x.shape[1:])
        sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
        return vd.combine_x0(sv, xv, mv, A, beta).reshape(x.shape)

    def _area_grid_call(self, model, x, t, c, cou, n_chunks, base, run):
        """A call on part of the canvas whose place is unknown (no run): tiled on its own grid, at
        full strength."""
        H, W = int(x.shape[-2]), int(x.shape[-1])
        cfg = self.cfg
        grid_cfg = TileConfig(method="MultiDiffusion" if cfg.method == "SpotDiffusion" else cfg.method,
                              enable_overlap=cfg.enable_overlap, tile_overlap=cfg.tile_overlap,
                              tile_batch_size=cfg.tile_batch_size, skip_below=0, variable_denoise="off",
                              tile_width=cfg.tile_width, tile_height=cfg.tile_height, layout=None)
        plan = plan_for(grid_cfg, H, W, latent_compression(base), latent_patch_size(base), x.device, x.dtype,
                        min_tile=mf.min_tile(base))
        if run is not None and run.once(f"area{H}x{W}"):
            log.info("%s area-conditioned call on %dx%d latent px: %s, at full strength", P, W, H,
                     plan.describe())
        evaluated = tuple(range(len(plan.windows)))
        return self._evaluate(model, x, t, c, cou, n_chunks, plan, plan.windows, evaluated,
                              plan.normalized(evaluated), run)
