"""A plan's tile windows: a grid, a quadtree layout grown by the overlap, SpotDiffusion's partition.

Mixed into :class:`tile_plan.Plan` (its ``cfg``, canvas, compression, patch and ``notes``): every
window at once as int64 tensors, never one by one.  Pure geometry: no ComfyUI imports.
"""
from __future__ import annotations

import torch

from . import quadtree as qt
from . import spot_diffusion as sd
from .tile_windows import WindowSet


def expand_v(a0: torch.Tensor, a1: torch.Tensor, margin, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expand` over tensors: [a0 - m, a1 + m] moved inside [0, length) with its size kept."""
    size = torch.clamp(a1 - a0 + 2 * margin, max=length)
    start = torch.minimum(torch.clamp(a0 - margin, min=0), length - size)
    return start, start + size


def grow_v(a0: torch.Tensor, a1: torch.Tensor, size: int, length: int, align: int = 1):
    """[a0, a1) widened about its centre to at least ``size`` (on the ``align`` grid), inside
    [0, length); sides already that long are kept (tensors of many sides at once)."""
    m = torch.div(torch.clamp(size - (a1 - a0), min=0) + 1, 2, rounding_mode="floor")
    m = torch.div(m + align - 1, align, rounding_mode="floor") * align
    e0, e1 = expand_v(a0, a1, m, length)
    keep = (a1 - a0) >= size
    return torch.where(keep, a0, e0), torch.where(keep, a1, e1)


def snap_tile(tile: int, length: int, align: int) -> int:
    """A grid tile side rounded down to the model's patch (the whole axis if it covers it)."""
    if tile >= length or align <= 1:
        return min(tile, length)
    return max(align, tile // align * align)


def aligned_grid_starts(length: int, tile: int, overlap: int, align: int) -> list[int]:
    """:func:`quadtree.grid_starts` on the patch grid: every start a multiple of ``align`` except
    a last window flush with an axis end that is not (so no window needs padding by a
    patchifying model).  ``tile`` is a multiple of ``align`` or the whole axis.  Neighbours
    still share >= ``overlap``; a one-patch tile with an overlap (which only unaligned starts can
    give) keeps the unaligned starts."""
    if align <= 1 or tile >= length:
        return qt.grid_starts(length, tile, overlap)
    n_tile, n_overlap = tile // align, -(-overlap // align)
    if n_overlap >= n_tile and overlap > 0:
        return qt.grid_starts(length, tile, overlap)
    starts = [s * align for s in qt.grid_starts(length // align, n_tile, n_overlap)]
    last = length - tile
    if starts[-1] != last:       # an axis that is not a whole number of patches
        if len(starts) > 1 and starts[-2] + tile - last >= overlap:
            starts[-1] = last
        else:
            starts.append(last)
    return starts


def layout_cores(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(cores [n, 4] int64 (y0, y1, x0, x1), denoise [n] float64) of a layout already in latent units
    (a :class:`quadtree.Layout`, or such a pair as :func:`quadtree.scaled_cores` gives)."""
    if isinstance(layout, tuple):
        return layout
    r = qt.tile_rects(layout)
    cores = torch.stack((r[:, 1], r[:, 1] + r[:, 3], r[:, 0], r[:, 0] + r[:, 2]), dim=1).long()
    return cores, r[:, 4]


class TileGeometry:
    """The windows of a plan (``self.set``, a WindowSet) and its levels (``self.levels``)."""

    # ---- construction
    def _grid_tile_and_overlap(self, layout):
        """(grid tile height, width, overlap, layout) in latent px; tile sizes are None with a layout."""
        cfg, H, W, c = self.cfg, self.H, self.W, self.compression
        overlap = (cfg.tile_overlap // c) if cfg.enable_overlap and not self.spot else 0
        if layout is None:
            th, tw = max(1, min(H, cfg.tile_height // c)), max(1, min(W, cfg.tile_width // c))
            th, tw = max(th, min(H, self.align)), max(tw, min(W, self.align))
            mt = self.min_tile
            if th < min(H, mt) or tw < min(W, mt):
                self.notes.append(f"grid tile {tw * c}x{th * c}px enlarged to {max(tw, min(W, mt)) * c}x"
                                  f"{max(th, min(H, mt)) * c}px: this model takes no tile under {mt * c}px")
                th, tw = max(th, min(H, mt)), max(tw, min(W, mt))
            sh, sw = snap_tile(th, H, self.align), snap_tile(tw, W, self.align)
            if (sh, sw) != (th, tw):
                self.notes.append(f"grid tile {tw * c}x{th * c}px snapped to {sw * c}x{sh * c}px "
                                  f"(the model's {self.align}x{self.align} latent patch)")
            return sh, sw, overlap, None
        return None, None, overlap, layout

    def _skipped(self, cores: torch.Tensor) -> torch.Tensor:
        """skip_diffusion_below: a tile whose core's smaller side (in pixels) is under it."""
        skip = self.cfg.skip_below
        side = torch.minimum(cores[:, 1] - cores[:, 0], cores[:, 3] - cores[:, 2])
        return (side * self.compression < skip) if skip else torch.zeros_like(side, dtype=torch.bool)

    def _window_set(self, layout) -> WindowSet:
        boxes, cores, denoise = self._windows(layout)
        skipped = self._skipped(cores)
        keys = torch.stack((denoise, skipped.to(torch.float64)), dim=1)
        uniq, levels = torch.unique(keys, dim=0, return_inverse=True)
        self.levels = [(float(d), bool(sk)) for d, sk in uniq.tolist()]
        return WindowSet(boxes, cores, levels.reshape(-1), denoise, skipped)

    def _windows(self, layout):
        """(boxes, cores, denoise) of every tile: [n, 4], [n, 4] int64 and [n] float64."""
        cfg, H, W, c, a = self.cfg, self.H, self.W, self.compression, self.align
        th, tw, overlap, layout = self._grid_tile_and_overlap(layout)
        if layout is None and not self.spot:
            limit = min(th, tw) // 2
            if overlap > limit:
                self.notes.append(f"tile_overlap {cfg.tile_overlap}px clamped to {limit * c}px (half a tile)")
                overlap = limit
            ys = torch.tensor(aligned_grid_starts(H, th, overlap, a), dtype=torch.int64)
            xs = torch.tensor(aligned_grid_starts(W, tw, overlap, a), dtype=torch.int64)
            y0, x0 = ys.repeat_interleave(xs.numel()), xs.repeat(ys.numel())
            boxes = torch.stack((y0, y0 + min(th, H), x0, x0 + min(tw, W)), dim=1)
            return boxes, boxes, torch.ones(boxes.shape[0], dtype=torch.float64)
        if layout is not None:
            cores, dn = layout_cores(layout)
        if self.spot:        # the unshifted partition; each step shifts it (spot_diffusion.py)
            if layout is None:
                self.partition = sd.SpotPartition(H, W, a, tile=(th, tw))
            else:
                self.partition = sd.SpotPartition(H, W, a, cores=cores)
            cores = self.partition.cores(*self.partition.rest())
            side = torch.minimum(cores[:, 1] - cores[:, 0], cores[:, 3] - cores[:, 2])
            small = int((side < self.min_tile).sum())
            if small:
                raise ValueError(f"quadtree: {small} tiles are smaller than the {self.min_tile * c}px this model "
                                 f"takes and SpotDiffusion tiles cannot overlap: raise min_tile_size (or the tile "
                                 f"size) to {self.min_tile * c}px or use Mixture of Diffusers / MultiDiffusion")
            if layout is None:
                dn = torch.ones(cores.shape[0], dtype=torch.float64)
            return cores, cores, dn
        side = torch.minimum(cores[:, 1] - cores[:, 0], cores[:, 3] - cores[:, 2])
        margin = 0
        if overlap > 0:
            limit = int(side.min())
            if overlap > limit:
                self.notes.append(f"tile_overlap {cfg.tile_overlap}px clamped to {limit * c}px "
                                  f"(the smallest tile side)")
                overlap = limit
            margin = -(-overlap // 2)
            margin = -(-margin // a) * a
        small = int((side + 2 * margin < self.min_tile).sum())
        if small:
            self.notes.append(f"{small} quadtree tiles evaluated in windows enlarged to {self.min_tile * c}px "
                              f"(this model takes no tile under that)")
        y0, y1 = grow_v(*expand_v(cores[:, 0], cores[:, 1], margin, H), self.min_tile, H, a)
        x0, x1 = grow_v(*expand_v(cores[:, 2], cores[:, 3], margin, W), self.min_tile, W, a)
        return torch.stack((y0, y1, x0, x1), dim=1), cores, dn
