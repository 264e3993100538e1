"""SpotDiffusion geometry: a partition of the canvas whose seams move every step, without wrap-around.

Pure functions over integers and tensors; no ComfyUI imports.  Units are latent pixels.

Each step the partition itself is shifted; the latent never is, so the canvas edges stay canvas
edges (rolling the latent with wrap-around would make the opposite edges neighbours inside a
tile, a seam the untiled model never has).  Two kinds of partition:

* **grid** (tile ``t`` per axis): the cuts are ``{o + k t : k integer}`` for the step's offset
  ``o`` in ``[0, t)``, minus every cut that would leave an edge piece below half a tile
  (``2 c < t`` or ``2 (L - c) < t``): that sliver joins its neighbour.  Interior tiles are
  ``t`` (so they batch), edge tiles lie in ``[t/2, 3t/2)`` (the whole axis, < ``2t``, when it
  is shorter than two tiles).
* **layout** (a quadtree's cores): every internal tile edge moves by ``d = o - P/2`` with ``o``
  in ``[0, P)`` and ``P`` the smallest core side along that axis; the canvas edges stay.  As
  ``|d| <= P/2`` and every core is at least ``P``, the result is the same partition (same tiles,
  same order), interior tiles keep their size and an edge tile of side ``h`` becomes ``h +- d``,
  within ``[h/2, 3h/2]``.

Offsets are multiples of the model's patch (``align``), so tiles stay on its patch grid.
Optionally each tile is evaluated with a context margin (core + margin, clamped to the canvas,
as :func:`expand` keeps its size) and only its core is written back.
"""
from __future__ import annotations

import math

import torch

from .tile_blend import Evaluation
from .tile_windows import WindowSet, counts_in
from .utils import SPOT_KEY, summed_area

SCHEDULES = ("both", "alternate", "alternate_hold")
DEFAULT_SCHEDULE = "both"


# --------------------------------------------------------------------------- offsets

def spot_offsets(n: int, period: int, method: str, seed: int, align: int = 1) -> list[int]:
    """Per-step offsets in [0, period) along one axis, multiples of ``align``.

    random: u_k ~ U[0, 1) (seeded); sorted: the same draws ascending (the seam sweeps once
    across the tile); fibonacci: u_k = frac(u_0 + k / phi), the golden-ratio sequence.
    offset_k = floor(u_k * period) rounded down to ``align``.
    """
    if period <= 1:
        return [0] * n
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFF)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if method == "sorted":
        u = torch.sort(u).values
    elif method == "fibonacci":
        u = torch.remainder(u[0] + torch.arange(n, dtype=torch.float64) * (2 / (1 + math.sqrt(5))), 1.0)
    return [int(v * period) // align * align for v in u.tolist()]


def step_offsets(n: int, periods: tuple, method: str, seed: int, align: int = 1,
                 schedule: str = DEFAULT_SCHEDULE, rest: tuple = (0, 0)) -> tuple[list[int], list[int]]:
    """(y offsets, x offsets) for the n steps: y from ``seed``, x from ``seed + 1``.

    both: both axes take their k-th offset at step k.  alternate: step k moves y if k is even,
    x if odd, the other axis at its ``rest`` offset (that of the unshifted partition).
    alternate_hold: as alternate, but the other axis keeps its previous offset.
    """
    ys = spot_offsets(n, periods[0], method, seed, align)
    xs = spot_offsets(n, periods[1], method, seed + 1, align)
    if schedule == "both":
        return ys, xs
    if schedule not in SCHEDULES:
        raise ValueError(f"SpotDiffusion schedule '{schedule}' is not one of {', '.join(SCHEDULES)}")
    oy, ox = [], []
    y, x = rest
    for k in range(n):
        if k % 2 == 0:
            y = ys[k]
            x = x if schedule == "alternate_hold" else rest[1]
        else:
            x = xs[k]
            y = y if schedule == "alternate_hold" else rest[0]
        oy.append(y)
        ox.append(x)
    return oy, ox


# --------------------------------------------------------------------------- one axis

def grid_cuts(length: int, tile: int, offset: int) -> tuple[int, ...]:
    """Internal cuts of a grid of ``tile`` shifted by ``offset``, edge slivers merged.

    cuts = {c = offset + k tile, 0 < c < length : 2 c >= tile and 2 (length - c) >= tile}.
    """
    if tile <= 0 or tile >= length:
        return ()
    first = offset % tile or tile
    return tuple(c for c in range(first, length, tile) if 2 * c >= tile and 2 * (length - c) >= tile)


def segments(cuts, length: int) -> list[tuple[int, int]]:
    """[(a0, a1)] between consecutive points of 0, cuts..., length."""
    pts = [0, *cuts, length]
    return [(a, b) for a, b in zip(pts, pts[1:])]


def move_edge(e: int, d: int, length: int) -> int:
    """e + d for an internal edge (0 < e < length); the canvas edges 0 and length stay."""
    return e + d if 0 < e < length else e


def layout_shift(offset: int, period: int, align: int) -> int:
    """d = offset - floor(period / 2) rounded down to ``align``: the shift of a layout's edges."""
    return offset - (period // 2) // align * align


def min_side(cores, axis: int) -> int:
    """Smallest core side along ``axis`` (0: y, 1: x) of cores (y0, y1, x0, x1)."""
    return min(c[2 * axis + 1] - c[2 * axis] for c in cores)


def expand(a0: int, a1: int, margin: int, length: int) -> tuple[int, int]:
    """[a0 - m, a1 + m] shifted to lie inside [0, length) with its size kept (clamped to length)."""
    size = min(a1 - a0 + 2 * margin, length)
    start = min(max(a0 - margin, 0), length - size)
    return start, start + size


# --------------------------------------------------------------------------- the canvas

def fit(a0: torch.Tensor, a1: torch.Tensor, size: torch.Tensor, length: int, align: int) -> torch.Tensor:
    """Start of a window of ``size`` around [a0, a1) inside [0, length): the core centred (the
    offset rounded down to ``align``), then moved the least to lie inside the axis."""
    start = a0 - torch.div(torch.div(size - (a1 - a0), 2, rounding_mode="floor"), align,
                           rounding_mode="floor") * align
    return torch.minimum(torch.clamp(start, min=0), length - size)


class SpotPartition:
    """The per-step partitions of one canvas: a grid of ``tile`` = (th, tw) or a layout's ``cores``.

    ``periods`` = the offset range per axis (0: that axis never moves).  A step's cores come from
    :meth:`cores`; each is evaluated in a window of a size fixed for the run (:meth:`windows`):
    along each axis its base side b (the grid's tile, the layout tile's own side) when the core
    is no longer, else the longest core of that base over every offset.  So a run's windows take at
    most two sizes per base side and axis (a grid: at most four shapes), whatever the offsets;
    an edge piece shorter than b is evaluated with the context around it, only its core written.
    """

    def __init__(self, H: int, W: int, align: int = 1, tile=None, cores=None):
        self.H, self.W, self.align = H, W, max(1, align)
        self.tile = tile
        if tile is not None:
            self.periods = tuple(0 if t >= L else t for t, L in zip(tile, (H, W)))
        else:
            self._base = torch.as_tensor(cores, dtype=torch.int64).reshape(-1, 4)
            sides = (self._base[:, 1] - self._base[:, 0], self._base[:, 3] - self._base[:, 2])
            self.periods = tuple(0 if int(s.min()) >= L else int(s.min()) for s, L in zip(sides, (H, W)))
        self._cache: dict = {}
        self._long = tuple(self._longest(axis) for axis in (0, 1))

    def rest(self) -> tuple[int, int]:
        """The offsets of the unshifted partition (shift 0)."""
        if self.tile is not None:
            return (0, 0)
        return tuple((p // 2) // self.align * self.align for p in self.periods)

    def offset_range(self, axis: int) -> range:
        p = self.periods[axis]
        return range(0, p, self.align) if p else range(0, 1)

    # ---- one axis of a step
    def _axis(self, axis: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a0, a1) of every core along ``axis`` at ``offset``: a grid's segments, or each layout
        core's side with its internal edges moved."""
        L = (self.H, self.W)[axis]
        if self.tile is not None:
            pts = torch.tensor([0, *grid_cuts(L, self.tile[axis], offset), L], dtype=torch.int64)
            return pts[:-1], pts[1:]
        d = layout_shift(offset, self.periods[axis], self.align) if self.periods[axis] else 0
        e = self._base[:, 2 * axis:2 * axis + 2]
        moved = torch.where((e > 0) & (e < L), e + d, e)
        return moved[:, 0], moved[:, 1]

    def _longest(self, axis: int):
        """Along ``axis``, (base side, longest side over every offset) per core: a grid's tile (the
        axis if shorter) and its longest segment, as ints; a layout's per-tile tensors [n] (a tile on
        the axis's start edge grows by the largest shift d, one on its end edge by the largest -d)."""
        L = (self.H, self.W)[axis]
        if self.tile is not None:
            t = min(self.tile[axis], L)
            return t, max(max(b - a for a, b in segments(grid_cuts(L, t, o), L)) for o in self.offset_range(axis))
        e = self._base[:, 2 * axis:2 * axis + 2]
        base = e[:, 1] - e[:, 0]
        if not self.periods[axis]:
            return base, base
        offs = self.offset_range(axis)
        d_lo = layout_shift(offs[0], self.periods[axis], self.align)
        d_hi = layout_shift(offs[-1], self.periods[axis], self.align)
        start, end = e[:, 0] == 0, e[:, 1] == L
        longest = torch.where(start & ~end, base + d_hi, torch.where(end & ~start, base - d_lo, base))
        return base, longest

    def _sides(self, axis: int, a0, a1, margin: int, exact: bool = False) -> torch.Tensor:
        """Window side of each core: its base b if the core fits, else the longest core of its base
        (``exact``: the core's own side); plus 2 ``margin``, at most the axis."""
        L = (self.H, self.W)[axis]
        base, longest = self._long[axis]
        side = (a1 - a0) if exact else torch.where(a1 - a0 <= base, torch.as_tensor(base), torch.as_tensor(longest))
        return torch.clamp(side + 2 * margin, max=L)

    # ---- the canvas
    def cores(self, oy: int, ox: int) -> torch.Tensor:
        """The partition at offsets (oy, ox): cores [n, 4] (y0, y1, x0, x1), row-major for a grid."""
        return self.windows(oy, ox, 0, exact=True)[1]

    def windows(self, oy: int, ox: int, margin: int = 0, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(evaluated windows [n, 4], cores [n, 4]) at offsets (oy, ox): each core in its window
        (:meth:`_sides`; ``exact``: the core itself, grown by ``margin``), centred and moved inside
        the canvas."""
        key = (oy, ox, margin, exact)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        (y0, y1), (x0, x1) = self._axis(0, oy), self._axis(1, ox)
        hy, wx = self._sides(0, y0, y1, margin, exact), self._sides(1, x0, x1, margin, exact)
        sy, sx = fit(y0, y1, hy, self.H, self.align), fit(x0, x1, wx, self.W, self.align)
        if self.tile is not None:        # every y segment with every x segment, row-major
            ny, nx = y0.numel(), x0.numel()
            rep = lambda v: v.repeat_interleave(nx)          # noqa: E731
            til = lambda v: v.repeat(ny)                       # noqa: E731
            y0, y1, sy, hy = rep(y0), rep(y1), rep(sy), rep(hy)
            x0, x1, sx, wx = til(x0), til(x1), til(sx), til(wx)
        cores = torch.stack((y0, y1, x0, x1), dim=1)
        boxes = torch.stack((sy, sy + hy, sx, sx + wx), dim=1)
        hit = (boxes, cores)
        if len(self._cache) < 256:
            self._cache[key] = hit
        return hit

    def max_tiles(self) -> int:
        """The most tiles a step's partition has."""
        if self.tile is None:
            return int(self._base.shape[0])
        return math.prod(max(len(grid_cuts(L, self.tile[axis], o)) + 1 for o in self.offset_range(axis))
                         for axis, L in ((0, self.H), (1, self.W)))

    def max_window(self, margin: int = 0) -> tuple[int, int]:
        """The largest window height and width over every offset (for memory planning)."""
        return tuple(min(L, int(torch.as_tensor(self._long[axis][1]).max()) + 2 * margin)
                     for axis, L in ((0, self.H), (1, self.W)))

    def window_sizes(self, margin: int = 0) -> tuple[set, set]:
        """Every window height and every window width a run can evaluate (its shapes are among their
        combinations; a grid has at most two of each)."""
        out = []
        for axis, L in ((0, self.H), (1, self.W)):
            base, longest = (torch.as_tensor(v).reshape(-1) for v in self._long[axis])
            out.append({min(L, s + 2 * margin) for s in torch.cat((base, longest)).tolist()})
        return out[0], out[1]


class SpotSteps:
    """A plan's SpotDiffusion steps (mixed into ``tile_plan.Plan``: its ``partition``, canvas, levels,
    ``level_ids`` and caches): each step's shifted windows, and the Evaluation of those holding an
    active pixel (host-side, cached per step setting)."""

    def spot_set(self, oy: int, ox: int, margin: int = 0, exact: bool = False) -> WindowSet:
        """The partition shifted to offsets (oy, ox): each core in its window of the run's sizes
        (``exact``: of its own size), grown by ``margin``."""
        key = (oy, ox, margin, exact)
        hit = self._spot_cache.get(key)
        if hit is None:
            hit = WindowSet(*self.partition.windows(oy, ox, margin, exact))
            if len(self._spot_cache) >= 8:
                self._spot_cache.pop(next(iter(self._spot_cache)))
            self._spot_cache[key] = hit
        return hit

    def spot_windows(self, oy: int, ox: int, margin: int = 0, exact: bool = False) -> list:
        """:meth:`spot_set` as Window objects (for inspection)."""
        return self.spot_set(oy, ox, margin, exact).as_list()

    def _sat(self, levels: frozenset) -> torch.Tensor:
        """Summed-area table of the pixels whose level is in ``levels`` (cached per level set)."""
        hit = self._sat_cache.get(levels)
        if hit is None:
            mask = torch.isin(self.level_ids, torch.tensor(sorted(levels), dtype=torch.int32))
            hit = self._sat_cache[levels] = summed_area(mask)
        return hit

    def spot_evaluation(self, active_levels: set, oy: int, ox: int, margin: int = 0, exact: bool = False):
        """(Evaluation of the shifted windows whose core holds a pixel of an active level, how many
        windows the step has, how many of the others hold only skipped pixels)."""
        ws = self.spot_set(oy, ox, margin, exact)
        key = (oy, ox, margin, exact, frozenset(active_levels))
        hit = self._spot_cache.get(key)
        if hit is not None:
            return hit
        skipped = 0
        if len(active_levels) == len(self.levels):
            ids = torch.arange(len(ws))
        else:
            on = counts_in(self._sat(frozenset(active_levels)), ws.cores) > 0
            ids = torch.nonzero(on).reshape(-1)
            if self.n_skipped:
                unskipped = frozenset(lvl for lvl, (_, sk) in enumerate(self.levels) if not sk)
                live = counts_in(self._sat(unskipped), ws.cores) > 0
                skipped = int((~on & ~live).sum())
        hit = (Evaluation(ws, ids, self.H, self.W, self.device, self.dtype, None), len(ws), skipped)
        if len(self._spot_cache) >= 8:
            self._spot_cache.pop(next(iter(self._spot_cache)))
        self._spot_cache[key] = hit
        return hit


EDGE_WINDOWS = ("fixed", "exact")


def spot_exact(to: dict) -> bool:
    """The SpotDiffusion parameters' developer key ``edge_windows``: "exact" evaluates every tile in
    a window of its own size (the fewest pixels; edge tiles change shape every step), "fixed" (the
    default) in windows of the run's fixed sizes (:class:`SpotPartition`)."""
    mode = ((to or {}).get(SPOT_KEY) or {}).get("edge_windows", "fixed")
    if mode not in EDGE_WINDOWS:
        raise ValueError(f"SpotDiffusion edge_windows '{mode}' is not one of {', '.join(EDGE_WINDOWS)}")
    return mode == "exact"


def spot_margin(to: dict, compression: int, align: int) -> int:
    """SpotDiffusion's context margin in latent px: ceil(context_margin px / compression), rounded up
    to the model's patch; 0 when the SpotDiffusion parameters set none."""
    px = int(((to or {}).get(SPOT_KEY) or {}).get("context_margin", 0) or 0)
    if px <= 0:
        return 0
    m = -(-px // compression)
    return -(-m // align) * align
