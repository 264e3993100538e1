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
from .tile_blend import Evaluation, Group
from .chunk_parts import batchable
from .tile_inputs import broadcast_source, chunk_subset, item_rows
from .tile_plan import TileConfig, plan_for
from .tile_windows import WindowSet, counts_in
from .utils import RUN_KEY, P, cond_dicts, latent_compression, latent_patch_size, summed_area

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


def touching(sat: torch.Tensor, ev) -> torch.Tensor:
    """Ids of the windows of the evaluation ``ev`` holding a pixel of the mask's support in their
    written part: the core (SpotDiffusion's partition) or the whole window (blended windows)."""
    ws = ev.windows
    rects = ws.boxes[ev.ids] if ev.blended else ws.cores[ev.ids]
    return ev.ids[counts_in(sat, rects) > 0]


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
class AreaView:
    """Where an area call's windows lie: its box (h x w) at ``frame`` = (y, x, canvas H, canvas W)."""
    H: int
    W: int
    frame: tuple


def area_evaluation(ev: Evaluation, box) -> Evaluation:
    """A canvas evaluation restricted to the box (y, x, h, w), in the box's coordinates.

    Window w touching the box is evaluated on w slid inside the box (its size capped by the box's),
    so the part w ∩ box gets the context a canvas window has; its weight is the canvas's normalised
    weight on w ∩ box and 0 on the context around it; its core is w ∩ box.  Vectorised per window
    size (a gather of the canvas weights with a validity mask)."""
    y, x, h, w = box
    boxes, cores, levels, parts = [], [], [], {}
    n = 0
    for g in ev.groups:
        b = g.boxes
        cy0, cy1 = torch.clamp(b[:, 0], min=y), torch.clamp(b[:, 1], max=y + h)
        cx0, cx1 = torch.clamp(b[:, 2], min=x), torch.clamp(b[:, 3], max=x + w)
        sel = torch.nonzero((cy1 > cy0) & (cx1 > cx0)).reshape(-1)
        if sel.numel() == 0:
            continue
        (gh, gw), bb = g.size, b[sel]
        sh, sw = min(gh, h), min(gw, w)
        ey0 = torch.clamp(torch.clamp(bb[:, 0] - y, min=0), max=h - sh)
        ex0 = torch.clamp(torch.clamp(bb[:, 2] - x, min=0), max=w - sw)
        rows = (ey0 + y - bb[:, 0])[:, None] + torch.arange(sh)[None, :]      # rows of the canvas window
        cols = (ex0 + x - bb[:, 2])[:, None] + torch.arange(sw)[None, :]
        valid = ((rows >= 0) & (rows < gh))[:, :, None] & ((cols >= 0) & (cols < gw))[:, None, :]
        dev = g.weights.device
        wt = g.weights[sel.to(dev)[:, None, None], rows.clamp(0, gh - 1).to(dev)[:, :, None],
                       cols.clamp(0, gw - 1).to(dev)[:, None, :]]
        wt = wt * valid.to(dev)
        boxes.append(torch.stack((ey0, ey0 + sh, ex0, ex0 + sw), dim=1))
        cores.append(torch.stack((cy0[sel] - y, cy1[sel] - y, cx0[sel] - x, cx1[sel] - x), dim=1))
        levels.append(ev.windows.levels[g.ids[sel]])
        parts.setdefault((sh, sw), []).append((torch.arange(n, n + sel.numel()), wt))
        n += sel.numel()
    if not n:
        return Evaluation(WindowSet(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.int64), h, w,
                          ev.device, ev.dtype, None, groups=[])
    ws = WindowSet(torch.cat(boxes), torch.cat(cores), torch.cat(levels))
    groups = []
    for size, pieces in parts.items():
        ids = torch.cat([i for i, _ in pieces])
        bx = ws.boxes[ids]
        groups.append(Group(size, ids, bx, ws.cores[ids], bx[:, [0, 2]].to(ev.device),
                            torch.cat([wt for _, wt in pieces])))
    return Evaluation(ws, torch.arange(n), h, w, ev.device, ev.dtype, None, groups=groups)


# --------------------------------------------------------------------------- the engine's regional calls

class RegionalCalls:
    """The tile engine's handling of regional prompts (mixed into ``tiled_diffusion.TiledDiffusion``,
    whose ``_plan``, ``_step``, ``_coefficients`` and ``_evaluate`` it uses): calls of a prompt with
    an area, and the chunks of prompts with a plain mask in a canvas call."""

    def _evaluate_masked(self, model, x, t, c, cou, n_chunks, plan, ev, run, masks):
        """``_evaluate`` with the chunks of each mask prompt evaluated only on the windows holding a
        pixel of its mask's support (:func:`touching`); ComfyUI weights its x0 by 0 everywhere else.

        Each window is evaluated once for all the chunks that need it: windows are grouped by that set
        of chunks (with one mask prompt: its windows with every chunk, the others without it), and
        each chunk's weights are normalised over its own windows."""
        per_chunk = []
        for j, sat in enumerate(masks):
            ids = ev.ids if sat is None else touching(sat, ev)
            if sat is not None and run.once(f"mask{id(sat)}"):
                log.info("%s prompt with a mask: evaluated on the %d of %d tile windows that hold its mask", P,
                         ids.numel(), len(ev))
            run.stats["mask_saved"] += len(ev) - ids.numel()
            per_chunk.append(ids)
        member = torch.stack([torch.isin(ev.ids, ids) for ids in per_chunk])       # [chunks, windows]
        code = (member.long() << torch.arange(n_chunks)[:, None]).sum(0)
        out = torch.zeros_like(x)           # x0 of a mask prompt where its mask is 0: weighted 0 by ComfyUI
        full = (1 << n_chunks) - 1
        for cd in torch.unique(code).tolist():
            chunks = [j for j in range(n_chunks) if cd >> j & 1]
            ids = ev.ids[code == cd]
            if not chunks:
                continue
            run.stats["tiles"] += ids.numel()
            if cd != full:
                run.stats["mask_apart"] += ids.numel()
            if ev.blended:
                sets = [per_chunk[j] for j in chunks]
                distinct = list({s.numpy().tobytes(): s for s in sets}.values())
                sub = ev.subset(ids, sets if len(distinct) > 1 else sets[:1])
            else:
                sub = ev.subset(ids)
            if cd == full:
                out += self._evaluate(model, x, t, c, cou, n_chunks, plan, sub, run)
                continue
            rows, tr, cr, coul = chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] += self._evaluate(model, x[rows], tr, cr, coul, len(chunks), plan, sub, run)
        run.stats["tiles"] -= len(ev)
        return out

    def _area_call(self, model, x, t, c, cou, n_chunks, base, run):
        """A call on part of the canvas (a prompt with an area): each group of chunks with the same
        box on the canvas is evaluated with the canvas plan restricted to that box
        (:func:`area_evaluation`); with one layout per IMAGE-batch item, each item with its own plan."""
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
        """The chunks of an area call grouped by their box, each group evaluated on its box; where the
        call's inputs allow (:func:`batchable`), windows of one size from different boxes share model
        calls (:meth:`_evaluate_parts`)."""
        distinct = list(dict.fromkeys(boxes))          # the distinct boxes, in call order
        if len(distinct) == 1:
            return self._area_item(model, x, t, c, cou, n_chunks, run, base, distinct[0], item)
        parts = [(box, [j for j, b in enumerate(boxes) if b == box]) for box in distinct]
        if batchable(run, c, n_chunks, x.shape[0]):
            return self._area_parts(model, x, t, c, cou, n_chunks, run, base, parts, item)
        out = torch.empty_like(x)
        for box, chunks in parts:
            rows, tr, cr, coul = chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] = self._area_item(model, x[rows], tr, cr, coul, len(chunks), run, base, box, item)
        return out

    def _area_setup(self, x, t, c, n_chunks, run, base, box, item):
        """(plan, coefficients, source crop, area evaluation) of one box of an area call."""
        y, x0, h, w = box
        Hc, Wc = run.canvas
        plan = self._plan(run, Hc, Wc, base, x, item)
        step, n = self._step(run, t, c.get("transformer_options", {}))
        src = run.source_frames(c.get("transformer_options", {}), x)
        B = x.shape[0] // n_chunks
        if src is not None and len(self.cfg.layouts) > 1 and src.shape[0] == len(self.cfg.layouts):
            src = src[item:item + 1]
        src = src[..., y:y + h, x0:x0 + w] if src is not None and src.shape[-2:] == (Hc, Wc) and \
            src.shape[0] in (1, B) and src.shape[1:-2] == x.shape[1:-2] else None
        coeffs = self._coefficients(plan, run, step, n, src, x)
        # SpotDiffusion: the unshifted partition (normalised weights 1), whose tiles carry the levels
        canvas = plan.evaluation(plan.windows_of({lvl for lvl, (a, _) in enumerate(coeffs) if a > 0}))
        key = (box, canvas.ids.numpy().tobytes())
        area = plan.area_cache.get(key)
        if area is None:
            area = area_evaluation(canvas, box)
            if len(plan.area_cache) >= 32:
                plan.area_cache.pop(next(iter(plan.area_cache)))
            plan.area_cache[key] = area
        run.stats["tiles"] += len(area)
        if run.once(f"area{box}"):
            log.info("%s prompt with an area (%d,%d %dx%d latent px): %d of the canvas's tile windows, clipped to it",
                     P, x0, y, w, h, len(area))
        return plan, coeffs, src, area

    def _area_finish(self, mixed, x, n_chunks, plan, coeffs, src, box):
        """x0' = src + A (x - src) + beta (M - x) on the box."""
        if all(a == 1.0 and b == 1.0 for a, b in coeffs):
            return mixed
        y, x0, h, w = box
        B = x.shape[0] // n_chunks
        A, beta = plan.activity_maps(coeffs)
        A, beta = A[y:y + h, x0:x0 + w], beta[y:y + h, x0:x0 + w]
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        mv = mixed.reshape(n_chunks, B, *x.shape[1:])
        sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
        return vd.combine_x0(sv, xv, mv, A, beta).reshape(x.shape)

    def _area_item(self, model, x, t, c, cou, n_chunks, run, base, box, item=0):
        """x0' = src + A (x - src) + beta (M - x) on the box, with the canvas plan's windows clipped to it."""
        plan, coeffs, src, area = self._area_setup(x, t, c, n_chunks, run, base, box, item)
        if not len(area):
            return broadcast_source(src, x, n_chunks)
        view = AreaView(box[2], box[3], (box[0], box[1], plan.H, plan.W))
        mixed = self._evaluate(model, x, t, c, cou, n_chunks, view, area, run)
        return self._area_finish(mixed, x, n_chunks, plan, coeffs, src, box)

    def _area_parts(self, model, x, t, c, cou, n_chunks, run, base, parts, item):
        """An area call whose chunks lie in different boxes: each box's windows of one size batched
        with the other boxes' windows of that size (:meth:`_evaluate_parts`), then each box's chunks
        combined with its own source crop and activity maps."""
        setups = [(chunks, self._area_setup(x, t, c, n_chunks, run, base, box, item)) for box, chunks in parts]
        if run.once("area parts"):
            log.info("%s %d prompts with areas of one size in one call: their windows of one size share model calls",
                     P, len(parts))
        mixed = self._evaluate_parts(model, x, t, c, cou, n_chunks, [(chunks, s[3]) for chunks, s in setups], run)
        out = torch.empty_like(x)
        B = x.shape[0] // n_chunks
        for (box, _), (chunks, (plan, coeffs, src, area)) in zip(parts, setups):
            rows = [j * B + b for j in chunks for b in range(B)]
            if not len(area):
                out[rows] = broadcast_source(src, x[rows], len(chunks))
            else:
                out[rows] = self._area_finish(mixed[rows], x[rows], len(chunks), plan, coeffs, src, box)
        return out

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
        return self._evaluate(model, x, t, c, cou, n_chunks, plan, plan.evaluation(plan.all), run)
