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

from dataclasses import dataclass

import torch

from .utils import RUN_KEY, cond_dicts, counts_in, group_by_size, summed_area

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
