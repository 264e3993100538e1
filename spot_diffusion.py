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

from .utils import SPOT_KEY

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

class SpotPartition:
    """The per-step partitions of one canvas: a grid of ``tile`` = (th, tw) or a layout's ``cores``.

    ``periods`` = the offset range per axis (0: that axis never moves).  Partitions are cached
    per (offset y, offset x, margin): a run has at most one per step.
    """

    def __init__(self, H: int, W: int, align: int = 1, tile=None, cores=None):
        self.H, self.W, self.align = H, W, max(1, align)
        self.tile = tile
        self.base_cores = tuple(cores) if cores is not None else None
        if tile is not None:
            self.periods = tuple(0 if t >= L else t for t, L in zip(tile, (H, W)))
        else:
            self.periods = tuple(0 if min_side(self.base_cores, a) >= L else min_side(self.base_cores, a)
                                 for a, L in ((0, H), (1, W)))
        self._cache: dict = {}

    def rest(self) -> tuple[int, int]:
        """The offsets of the unshifted partition (shift 0)."""
        if self.tile is not None:
            return (0, 0)
        return tuple((p // 2) // self.align * self.align for p in self.periods)

    def cores(self, oy: int, ox: int) -> tuple:
        """The partition at offsets (oy, ox): cores (y0, y1, x0, x1), row-major for a grid."""
        if self.tile is not None:
            ys = segments(grid_cuts(self.H, self.tile[0], oy), self.H)
            xs = segments(grid_cuts(self.W, self.tile[1], ox), self.W)
            return tuple((y0, y1, x0, x1) for y0, y1 in ys for x0, x1 in xs)
        dy = layout_shift(oy, self.periods[0], self.align) if self.periods[0] else 0
        dx = layout_shift(ox, self.periods[1], self.align) if self.periods[1] else 0
        H, W = self.H, self.W
        return tuple((move_edge(y0, dy, H), move_edge(y1, dy, H), move_edge(x0, dx, W), move_edge(x1, dx, W))
                     for y0, y1, x0, x1 in self.base_cores)

    def windows(self, oy: int, ox: int, margin: int = 0) -> tuple:
        """((y0, y1, x0, x1) evaluated window, core) per tile: the core grown by ``margin``."""
        key = (oy, ox, margin)
        hit = self._cache.get(key)
        if hit is None:
            hit = tuple((expand(c[0], c[1], margin, self.H) + expand(c[2], c[3], margin, self.W), c)
                        for c in self.cores(oy, ox))
            if len(self._cache) < 256:
                self._cache[key] = hit
        return hit

    def offset_range(self, axis: int) -> range:
        p = self.periods[axis]
        return range(0, p, self.align) if p else range(0, 1)

    def max_tiles(self) -> int:
        """The most tiles a step's partition has."""
        if self.tile is None:
            return len(self.base_cores)
        return math.prod(max(len(grid_cuts(L, self.tile[axis], o)) + 1 for o in self.offset_range(axis))
                         for axis, L in ((0, self.H), (1, self.W)))

    def max_window(self, margin: int = 0) -> tuple[int, int]:
        """The largest window height and width over every offset (for memory planning)."""
        if self.tile is not None:
            sides = []
            for axis, L in ((0, self.H), (1, self.W)):
                t = self.tile[axis]
                longest = max(b - a for o in self.offset_range(axis) for a, b in segments(grid_cuts(L, t, o), L))
                sides.append(min(L, longest + 2 * margin))
            return sides[0], sides[1]
        ext = [(r[0], r[-1]) for r in (self.offset_range(0), self.offset_range(1))]
        wins = [w for oy in ext[0] for ox in ext[1] for w, _ in self.windows(oy, ox, margin)]
        return max(w[1] - w[0] for w in wins), max(w[3] - w[2] for w in wins)


def spot_margin(to: dict, compression: int, align: int) -> int:
    """SpotDiffusion's context margin in latent px: ceil(context_margin px / compression), rounded up
    to the model's patch; 0 when the SpotDiffusion parameters set none."""
    px = int(((to or {}).get(SPOT_KEY) or {}).get("context_margin", 0) or 0)
    if px <= 0:
        return 0
    m = -(-px // compression)
    return -(-m // align) * align
