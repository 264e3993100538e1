"""Where the tiles are: a canvas's tile windows, their blend weights and per-tile denoise levels.

A :class:`Plan` holds everything about a (settings, canvas, device, dtype) that does not change
between steps: the windows of a grid, of a quadtree layout (scaled to the latent, each tile grown
by the overlap) or of SpotDiffusion's partition (spot_diffusion.py), each window's weight
(MultiDiffusion: 1; Mixture of Diffusers: Gaussian per axis, std = 0.1 of the window's side), the
normalised weights w_t / sum_s w_s of each set of evaluated windows, and the per-level weight maps
variable denoise combines (variable_denoise.py).  Pure geometry: no model, no sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quadtree as qt
from . import spot_diffusion as sd
from .utils import counts_in, group_by_size, summed_area

MOD_STD = 0.1          # Mixture of Diffusers: per-axis std as a fraction of the window side (var = 0.01)
ASPECT_TOLERANCE = 0.03


@dataclass(frozen=True)
class TileConfig:
    """The QuadtreeDiffusion node's settings (pixel units)."""
    method: str = "Mixture of Diffusers"
    enable_overlap: bool = True
    tile_overlap: int = 64
    tile_batch_size: int = 4           # 0 = auto
    skip_below: int = 0
    variable_denoise: str = "schedule"
    tile_width: int = 1024
    tile_height: int = 1024
    layout: qt.Layout | tuple | None = None   # one layout, or one per batch item (IMAGE batch)
    reference_mode: str = "crop to tile"       # reference images: "crop to tile" or "whole image" (reference_latents.py)

    @property
    def layouts(self) -> tuple:
        """The layouts as a tuple: (None,) for a grid, one entry per batch item for a batch."""
        if isinstance(self.layout, (tuple, list)):
            return tuple(self.layout)
        return (self.layout,)

    @property
    def denoise_range(self) -> tuple[float, float]:
        ranges = [lay.denoise_range for lay in self.layouts if lay is not None] or [(1.0, 1.0)]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)


@dataclass(frozen=True)
class Window:
    """A tile as the engine uses it (latent units): its evaluation window and its core."""
    y0: int
    y1: int
    x0: int
    x1: int
    core: tuple          # (y0, y1, x0, x1)
    denoise: float = 1.0
    skipped: bool = False
    level: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)


# --------------------------------------------------------------------------- geometry

expand = sd.expand


def grow(a0: int, a1: int, size: int, length: int, align: int = 1) -> tuple[int, int]:
    """[a0, a1) widened about its centre to at least ``size`` (on the ``align`` grid), inside [0, length)."""
    if a1 - a0 >= size:
        return a0, a1
    m = -(-(size - (a1 - a0)) // 2)
    return expand(a0, a1, -(-m // align) * align, length)


def gaussian_1d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """g(i) = exp(-(i - (n-1)/2)^2 / (2 (0.1 n)^2)): Mixture of Diffusers' weights along one axis."""
    i = torch.arange(n, dtype=torch.float64)      # on the CPU: float64 is not on every device (MPS)
    s = MOD_STD * n
    return torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * s * s)).to(device=device, dtype=dtype)


def window_weight(method: str, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Blend weight of an h x w window: Gaussian per axis from that axis's own size (MoD), else 1."""
    if method == "Mixture of Diffusers":
        return gaussian_1d(h, device, dtype)[:, None] * gaussian_1d(w, device, dtype)[None, :]
    return torch.ones(h, w, device=device, dtype=dtype)


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


# --------------------------------------------------------------------------- plan

class Plan:
    """Everything about a (config, canvas, device, dtype) that does not change between steps.

    Windows, their weights, the per-level weight maps of variable denoise and the
    normalised weights of each set of evaluated tiles are built once and reused.  For
    SpotDiffusion ``windows`` is the unshifted partition (it defines the tiles' denoise levels
    and skip); each step evaluates ``partition``'s shifted windows (:meth:`spot_windows`).
    """

    def __init__(self, cfg: TileConfig, H: int, W: int, compression: int, align: int,
                 device, dtype, layout: qt.Layout | None, min_tile: int = 1):
        self.cfg, self.H, self.W, self.device, self.dtype = cfg, H, W, device, dtype
        self.compression, self.align, self.min_tile = compression, align, min_tile
        self.spot = cfg.method == "SpotDiffusion"
        self.notes: list[str] = []
        self.partition: sd.SpotPartition | None = None
        self.windows = self._windows(layout)
        levels = sorted({(w.denoise, w.skipped) for w in self.windows})
        self.levels = levels
        self.windows = [Window(w.y0, w.y1, w.x0, w.x1, w.core, w.denoise, w.skipped,
                               levels.index((w.denoise, w.skipped))) for w in self.windows]
        # Weights and their normalisation are computed in float32 (a Gaussian corner weight,
        # exp(-12.5)^2, underflows in float16) and cast to the latent's dtype once normalised.
        self.weights = [window_weight("MultiDiffusion" if self.spot else cfg.method, *w.size,
                                      device=device, dtype=torch.float32) for w in self.windows]
        self.n_skipped = sum(1 for w in self.windows if w.skipped)
        self._norm_cache: dict = {}
        self._maps_cache: dict = {}
        self._active_cache: dict = {}
        self.level_maps = self._level_maps()
        self.level_ids = self._level_id_map() if self.spot else None
        self.periods = self.partition.periods if self.spot else (0, 0)
        self._spot_cache: dict = {}
        self._sat_cache: dict = {}

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

    def _windows(self, layout):
        cfg, H, W, c, a = self.cfg, self.H, self.W, self.compression, self.align
        th, tw, overlap, layout = self._grid_tile_and_overlap(layout)
        skip = cfg.skip_below
        out = []
        if layout is None and not self.spot:
            limit = min(th, tw) // 2
            if overlap > limit:
                self.notes.append(f"tile_overlap {cfg.tile_overlap}px clamped to {limit * c}px (half a tile)")
                overlap = limit
            ys = aligned_grid_starts(H, th, overlap, a)
            xs = aligned_grid_starts(W, tw, overlap, a)
            for y in ys:
                for x in xs:
                    h, w = min(th, H), min(tw, W)
                    sk = bool(skip) and min(h, w) * c < skip
                    out.append(Window(y, y + h, x, x + w, (y, y + h, x, x + w), 1.0, sk))
            return out
        if self.spot:        # the unshifted partition; each step shifts it (spot_diffusion.py)
            if layout is None:
                self.partition = sd.SpotPartition(H, W, a, tile=(th, tw))
            else:
                self.partition = sd.SpotPartition(H, W, a, cores=[(t.y, t.y + t.h, t.x, t.x + t.w)
                                                                  for t in layout.tiles])
            cores = self.partition.cores(*self.partition.rest())
            small = [cc for cc in cores if min(cc[1] - cc[0], cc[3] - cc[2]) < self.min_tile]
            if small:
                raise ValueError(f"quadtree: {len(small)} tiles are smaller than the {self.min_tile * c}px this model "
                                 f"takes and SpotDiffusion tiles cannot overlap: raise min_tile_size (or the tile "
                                 f"size) to {self.min_tile * c}px or use Mixture of Diffusers / MultiDiffusion")
            dn = [1.0] * len(cores) if layout is None else [float(t.denoise) for t in layout.tiles]
            for (y0, y1, x0, x1), d in zip(cores, dn):
                sk = bool(skip) and min(y1 - y0, x1 - x0) * c < skip
                out.append(Window(y0, y1, x0, x1, (y0, y1, x0, x1), d, sk))
            return out
        cores = layout.tiles
        margin = 0
        if overlap > 0:
            limit = min(min(t.w, t.h) for t in cores)
            if overlap > limit:
                self.notes.append(f"tile_overlap {cfg.tile_overlap}px clamped to {limit * c}px "
                                  f"(the smallest tile side)")
                overlap = limit
            margin = -(-overlap // 2)
            margin = -(-margin // a) * a
        small = [t for t in cores if min(t.w, t.h) + 2 * margin < self.min_tile]
        if small:
            self.notes.append(f"{len(small)} quadtree tiles evaluated in windows enlarged to {self.min_tile * c}px "
                              f"(this model takes no tile under that)")
        for t in cores:
            y0, y1 = grow(*expand(t.y, t.y + t.h, margin, H), self.min_tile, H, a)
            x0, x1 = grow(*expand(t.x, t.x + t.w, margin, W), self.min_tile, W, a)
            sk = bool(skip) and t.min_side * c < skip
            out.append(Window(y0, y1, x0, x1, (t.y, t.y + t.h, t.x, t.x + t.w), float(t.denoise), sk))
        return out

    def _level_maps(self) -> torch.Tensor:
        """W_l[p] = sum over tiles t of level l of their normalised weight at p: [L, H, W]."""
        maps = torch.zeros(len(self.levels), self.H, self.W, device=self.device, dtype=self.dtype)
        if self.spot:
            for w in self.windows:
                y0, y1, x0, x1 = w.core
                maps[w.level, y0:y1, x0:x1] = 1.0
            return maps
        norm = self.normalized(tuple(range(len(self.windows))))
        for i, w in enumerate(self.windows):
            maps[w.level, w.y0:w.y1, w.x0:w.x1] += norm[i]
        return maps

    def _level_id_map(self):
        ids = torch.full((self.H, self.W), -1, dtype=torch.int32)
        for w in self.windows:
            y0, y1, x0, x1 = w.core
            ids[y0:y1, x0:x1] = w.level
        return ids

    # ---- per step, cached
    @property
    def frame(self) -> tuple:
        """(oy, ox, H, W): the windows' coordinates start at the canvas origin (an area plan's do not)."""
        return (0, 0, self.H, self.W)

    def normalized(self, evaluated: tuple) -> dict:
        """{window index: w_t / sum_{s in E} w_s over its window} for the evaluated set E."""
        hit = self._norm_cache.get(evaluated)
        if hit is not None:
            return hit
        denom = torch.zeros(self.H, self.W, device=self.device, dtype=torch.float32)
        for i in evaluated:
            w = self.windows[i]
            denom[w.y0:w.y1, w.x0:w.x1] += self.weights[i]
        out = {}
        for i in evaluated:
            w = self.windows[i]
            out[i] = (self.weights[i] / denom[w.y0:w.y1, w.x0:w.x1]).to(self.dtype)
        if len(self._norm_cache) < 64:
            self._norm_cache[evaluated] = out
        return out

    def activity_maps(self, coeffs) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, beta) = (sum_l a_l W_l, sum_l b_l W_l) for per-level coefficients (a_l, b_l).

        Host floats times device maps: no host-to-device copy; cached per coefficient set
        (schedule mode has a handful, scale mode one per step).
        """
        key = tuple(coeffs)
        hit = self._maps_cache.get(key)
        if hit is not None:
            return hit
        A = torch.zeros(self.H, self.W, device=self.device, dtype=self.dtype)
        beta = torch.zeros_like(A)
        for lvl, (a, b) in enumerate(coeffs):
            if a:
                A.add_(self.level_maps[lvl], alpha=a)
            if b:
                beta.add_(self.level_maps[lvl], alpha=b)
        if len(self._maps_cache) < 64:
            self._maps_cache[key] = (A, beta)
        return A, beta

    def windows_of(self, active_levels: set) -> tuple:
        """Indices of the windows whose level is active (cached per set of active levels)."""
        key = frozenset(active_levels)
        hit = self._active_cache.get(key)
        if hit is None:
            hit = self._active_cache[key] = tuple(i for i, w in enumerate(self.windows) if w.level in key)
        return hit

    def groups(self, evaluated, windows=None) -> list[list[int]]:
        """Evaluated window indices grouped by window size (batchable together)."""
        return group_by_size(evaluated, self.windows if windows is None else windows)

    # ---- SpotDiffusion (host-side, cached per step setting)
    def spot_windows(self, oy: int, ox: int, margin: int = 0) -> tuple:
        """The partition shifted to offsets (oy, ox) as Windows: each core, evaluated grown by ``margin``."""
        key = (oy, ox, margin)
        hit = self._spot_cache.get(key)
        if hit is None:
            hit = tuple(Window(*win, core) for win, core in self.partition.windows(oy, ox, margin))
            if len(self._spot_cache) < 256:
                self._spot_cache[key] = hit
        return hit

    def _sat(self, levels: frozenset) -> torch.Tensor:
        """Summed-area table of the pixels whose level is in ``levels`` (cached per level set)."""
        hit = self._sat_cache.get(levels)
        if hit is None:
            mask = torch.zeros(self.H, self.W, dtype=torch.bool)
            for lvl in levels:
                mask |= self.level_ids == lvl
            hit = self._sat_cache[levels] = summed_area(mask)
        return hit

    def spot_evaluated(self, active_levels: set, windows: tuple) -> tuple[tuple, int]:
        """(indices of the windows whose core holds a pixel of an active level, how many of the
        others hold only skipped pixels)."""
        if len(active_levels) == len(self.levels):
            return tuple(range(len(windows))), 0
        cores = [w.core for w in windows]
        active = counts_in(self._sat(frozenset(active_levels)), cores)
        evaluated = tuple(i for i, n in enumerate(active) if n > 0)
        if not self.n_skipped:
            return evaluated, 0
        unskipped = frozenset(lvl for lvl, (_, sk) in enumerate(self.levels) if not sk)
        live = counts_in(self._sat(unskipped), cores)
        return evaluated, sum(1 for n in live if n == 0)

    def max_window(self, margin: int = 0) -> tuple[int, int]:
        """The largest window (height, width) any step evaluates."""
        if self.spot:
            return self.partition.max_window(margin)
        return max(w.size[0] for w in self.windows), max(w.size[1] for w in self.windows)

    def describe(self) -> str:
        sizes: dict = {}
        for w in self.windows:
            sizes[w.size] = sizes.get(w.size, 0) + 1
        s = ", ".join(f"{n}x {h * self.compression}x{w * self.compression}px"
                      for (h, w), n in sorted(sizes.items(), key=lambda kv: -kv[0][0] * kv[0][1]))
        return f"{len(self.windows)} tiles ({s})"


def plan_for(cfg: TileConfig, H: int, W: int, compression: int, align: int, device, dtype,
             check_aspect: bool = True, item: int = 0, min_tile: int = 1) -> Plan:
    """Build the plan of a canvas (for batch item ``item`` when the config holds one layout per
    item); a layout from an image of another size is scaled to it."""
    layouts = cfg.layouts
    layout = layouts[item if item < len(layouts) else 0]
    note = None
    if layout is not None:
        mismatch = qt.aspect_mismatch(layout, W, H)
        if check_aspect and mismatch > ASPECT_TOLERANCE:
            raise ValueError(
                f"quadtree: the layout was built for a {layout.width}x{layout.height}px image but the "
                f"latent is {W * compression}x{H * compression}px (aspect ratios differ by "
                f"{mismatch:.0%}); connect QuadtreeVisualizer to the image you encode into this latent, "
                f"or disconnect the quadtree input to use a grid")
        if (layout.width, layout.height) != (W * compression, H * compression):
            note = (f"quadtree built for a {layout.width}x{layout.height}px image, scaled to the "
                    f"{W * compression}x{H * compression}px latent")
        layout = qt.scale_layout(layout, W, H, align)
    plan = Plan(cfg, H, W, compression, align, device, dtype, layout, min_tile)
    if note:
        plan.notes.insert(0, note)
    return plan


def plan_has_levels(cfg: TileConfig) -> bool:
    return cfg.layout is not None or cfg.skip_below > 0
