"""Tile layouts: content-adaptive quadtrees and regular grids.

Pure functions over plain data and tensors; no ComfyUI imports.

A *layout* is a partition of a canvas into rectangular *cores* (x, y, w, h), each
with a denoise strength ``d`` in [0, 1].  Layouts are built in pixel units for the
image they came from and converted to latent units by :func:`to_latent`.  The tile
engine turns cores into *windows* (core + overlap context) for the overlapping
methods and uses the cores as they are for SpotDiffusion.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

PIXEL_ALIGN = 8  # the VAE's latent grid in pixels (SD/SDXL/SD3/FLUX all compress 8x)
MIN_TILE = 8     # no tile side below 8 px (one latent pixel): older workflows stored smaller values


@dataclass(frozen=True)
class Tile:
    """One core of a layout: the rectangle [x, x+w) x [y, y+h) and its denoise strength."""
    x: int
    y: int
    w: int
    h: int
    denoise: float = 1.0
    depth: int = 0

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def min_side(self) -> int:
        return min(self.w, self.h)


@dataclass(frozen=True)
class Layout:
    """A partition of a ``width`` x ``height`` canvas into tiles (the QUADTREE type)."""
    width: int
    height: int
    tiles: tuple
    kind: str = "quadtree"          # "quadtree" | "grid"
    params: dict = field(default_factory=dict, compare=False)

    @property
    def denoise_range(self) -> tuple[float, float]:
        ds = [t.denoise for t in self.tiles]
        return (min(ds), max(ds))

    def size_histogram(self) -> dict[str, int]:
        """{"WxH": count} over the tiles, largest first."""
        hist: dict[str, int] = {}
        for t in sorted(self.tiles, key=lambda t: -t.area):
            key = f"{t.w}x{t.h}"
            hist[key] = hist.get(key, 0) + 1
        return hist


# --------------------------------------------------------------------------- metric

def summed_area_table(img: torch.Tensor) -> torch.Tensor:
    """S[y, x] = sum of img[:y, :x] (zero-padded first row/column), float64, per channel.

    ``img`` is [H, W, C]; the result is [H+1, W+1, C].
    """
    s = img.to(torch.float64).cumsum(0).cumsum(1)
    return torch.nn.functional.pad(s, (0, 0, 1, 0, 1, 0))


def rect_sum(sat: torch.Tensor, x: int, y: int, w: int, h: int) -> torch.Tensor:
    """Sum over [y, y+h) x [x, x+w) from a summed-area table: S(y1,x1) - S(y0,x1) - S(y1,x0) + S(y0,x0)."""
    return sat[y + h, x + w] - sat[y, x + w] - sat[y + h, x] + sat[y, x]


class StdMetric:
    """Content metric of a rectangle: ||(sigma_R, sigma_G, sigma_B)||_2 in 0-255 units.

    sigma_c^2 = E[v_c^2] - E[v_c]^2 over the rectangle, computed in O(1) per rectangle
    from two summed-area tables (the image and its square).  Every quadtree edge lies on the
    ``block`` grid, so the tables are built over ``block`` x ``block`` sums (64x fewer cells
    for the 8-px latent grid) and rectangles are given in pixels that are multiples of it.
    """

    def __init__(self, image: torch.Tensor, block: int = 1):
        img = image[..., :3].to(torch.float64) * 255.0
        hb, wb = img.shape[0] // block, img.shape[1] // block
        cells = img[:hb * block, :wb * block].reshape(hb, block, wb, block, img.shape[-1])
        self.block = block
        self.s1 = summed_area_table(cells.sum(dim=(1, 3)))
        self.s2 = summed_area_table((cells * cells).sum(dim=(1, 3)))

    def __call__(self, x: int, y: int, w: int, h: int) -> float:
        b = self.block
        n = float(w * h)
        mean = rect_sum(self.s1, x // b, y // b, w // b, h // b) / n
        var = (rect_sum(self.s2, x // b, y // b, w // b, h // b) / n - mean * mean).clamp_min(0.0)
        return float(var.sum().sqrt())


# --------------------------------------------------------------------------- quadtree

def _half(n: int, align: int) -> int:
    """Split point of a side of length n: n/2 rounded down to ``align`` (at least ``align``)."""
    return max(align, (n // 2) // align * align)


def _split(x: int, y: int, w: int, h: int, split_x: bool, split_y: bool, align: int):
    xs = [(x, _half(w, align)), (x + _half(w, align), w - _half(w, align))] if split_x else [(x, w)]
    ys = [(y, _half(h, align)), (y + _half(h, align), h - _half(h, align))] if split_y else [(y, h)]
    return [(cx, cy, cw, ch) for cy, ch in ys for cx, cw in xs]


def quadtree_rects(width: int, height: int, metric, content_threshold: float,
                   min_tile_size: int, max_tile_size: int, align: int = PIXEL_ALIGN):
    """Leaves of the quadtree over [0, width) x [0, height) as (x, y, w, h, depth).

    A node splits into four (both sides halved, split points on the ``align`` grid)
    while ``metric(node) > content_threshold`` and every child side stays
    >= ``min_tile_size``.  Independently it *must* split a side longer than
    ``max_tile_size`` (as long as the halves stay >= ``align``), so no leaf exceeds it.
    """
    min_side = max(int(min_tile_size), MIN_TILE, align)
    leaves = []
    stack = [(0, 0, width, height, 0)]
    while stack:
        x, y, w, h, depth = stack.pop()
        force_x = w > max_tile_size and w >= 2 * align
        force_y = h > max_tile_size and h >= 2 * align
        can_x = min(_half(w, align), w - _half(w, align)) >= min_side
        can_y = min(_half(h, align), h - _half(h, align)) >= min_side
        content = (can_x and can_y) and metric(x, y, w, h) > content_threshold
        split_x, split_y = force_x or content, force_y or content
        if not (split_x or split_y):
            leaves.append((x, y, w, h, depth))
            continue
        for r in reversed(_split(x, y, w, h, split_x, split_y, align)):
            stack.append((*r, depth + 1))
    leaves.sort(key=lambda r: (r[1], r[0]))
    return leaves


def denoise_by_area(areas, min_denoise: float, max_denoise: float) -> list[float]:
    """d(a) = max_d - (max_d - min_d) * (log2 a - log2 a_min) / (log2 a_max - log2 a_min).

    The largest tile gets ``min_denoise``, the smallest ``max_denoise``; equal sizes all
    get ``min_denoise``.  Interpolating on log2(area) gives each depth level its own value.
    """
    logs = [math.log2(a) for a in areas]
    lo, hi = min(logs), max(logs)
    if hi - lo < 1e-9:
        return [float(min_denoise)] * len(areas)
    return [float(max_denoise - (max_denoise - min_denoise) * (v - lo) / (hi - lo)) for v in logs]


def build_quadtree(image: torch.Tensor, content_threshold: float = 25.0, min_tile_size: int = 128,
                   max_tile_size: int = 1024, min_denoise: float = 0.2, max_denoise: float = 0.8,
                   align: int = PIXEL_ALIGN) -> Layout:
    """Quadtree layout of one image ([H, W, C] floats in 0..1) in pixel units.

    The root is the image cropped to the ``align`` grid (as VAE encoding crops it).
    """
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"image: expected one [H, W, 3] image, got shape {tuple(image.shape)}")
    height, width = (int(image.shape[0]) // align) * align, (int(image.shape[1]) // align) * align
    if width < align or height < align:
        raise ValueError(f"image: {image.shape[1]}x{image.shape[0]} px is smaller than one "
                         f"latent pixel ({align} px); use an image of at least {align}x{align} px")
    metric = StdMetric(image[:height, :width], block=align)
    rects = quadtree_rects(width, height, metric, content_threshold, min_tile_size, max_tile_size, align)
    ds = denoise_by_area([w * h for _, _, w, h, _ in rects], min_denoise, max_denoise)
    tiles = tuple(Tile(x, y, w, h, d, depth) for (x, y, w, h, depth), d in zip(rects, ds))
    params = dict(content_threshold=content_threshold, min_tile_size=min_tile_size,
                  max_tile_size=max_tile_size, min_denoise=min_denoise, max_denoise=max_denoise)
    return Layout(width, height, tiles, "quadtree", params)


# --------------------------------------------------------------------------- grid

def grid_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: the fewest windows of size ``tile`` whose neighbours share at
    least ``overlap`` px, spread evenly so the first starts at 0 and the last is flush with the end.

    n = ceil((length - tile) / (tile - overlap)) + 1;  start_i = round(i * (length - tile) / (n - 1)).
    Even spacing keeps every overlap >= ``overlap`` (no window edge lands next to another's edge).
    """
    tile = min(tile, length)
    if tile >= length:
        return [0]
    stride = max(1, tile - overlap)
    n = math.ceil((length - tile) / stride) + 1
    return sorted({int(round(i * (length - tile) / (n - 1))) for i in range(n)})


def grid_partition(length: int, tile: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, size) cells of ``tile`` along one axis; the last cell takes the rest."""
    tile = max(1, min(tile, length))
    return [(s, min(tile, length - s)) for s in range(0, length, tile)]


def grid_layout(width: int, height: int, tile_width: int, tile_height: int, denoise: float = 1.0) -> Layout:
    """A regular partition of the canvas into ``tile_width`` x ``tile_height`` cells (row by row), each
    with strength ``denoise``."""
    tiles = tuple(Tile(x, y, w, h, denoise, 0)
                  for y, h in grid_partition(height, tile_height)
                  for x, w in grid_partition(width, tile_width))
    return Layout(width, height, tiles, "grid", dict(tile_width=tile_width, tile_height=tile_height))


# --------------------------------------------------------------------------- units

def snap(v: int, align: int, end: int) -> int:
    """Round an edge coordinate to the ``align`` grid, keeping the canvas edges 0 and ``end`` fixed."""
    if v <= 0 or v >= end or align <= 1:
        return min(max(v, 0), end)
    return min(end, int(round(v / align)) * align)


_RECTS: dict = {}


def tile_rects(layout: Layout) -> torch.Tensor:
    """The tiles' (x, y, w, h, denoise) as a float64 [n, 5] tensor (cached per layout object)."""
    hit = _RECTS.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1]
    rects = torch.tensor([(t.x, t.y, t.w, t.h, t.denoise) for t in layout.tiles], dtype=torch.float64).reshape(-1, 5)
    if len(_RECTS) >= 16:
        _RECTS.pop(next(iter(_RECTS)))
    _RECTS[id(layout)] = (layout, rects)
    return rects


def snap_v(v: torch.Tensor, align: int, end: int) -> torch.Tensor:
    """:func:`snap` over a tensor of edge coordinates."""
    clamped = v.clamp(0, end)
    if align <= 1:
        return clamped
    snapped = torch.clamp(torch.round(v / align) * align, max=end)
    return torch.where((v <= 0) | (v >= end), clamped, snapped)


def scaled_cores(layout: Layout, width: int, height: int, align: int = 1):
    """:func:`scale_layout` as tensors: (cores [m, 4] int64 (y0, y1, x0, x1), denoise [m] float64,
    kept [n] bool: which of the layout's tiles are still there)."""
    r = tile_rects(layout)
    sx, sy = width / layout.width, height / layout.height
    x0 = snap_v(torch.round(r[:, 0] * sx), align, width)
    x1 = snap_v(torch.round((r[:, 0] + r[:, 2]) * sx), align, width)
    y0 = snap_v(torch.round(r[:, 1] * sy), align, height)
    y1 = snap_v(torch.round((r[:, 1] + r[:, 3]) * sy), align, height)
    kept = (x1 > x0) & (y1 > y0)
    cores = torch.stack((y0, y1, x0, x1), dim=1)[kept].long()
    return cores, r[kept, 4], kept


def scale_layout(layout: Layout, width: int, height: int, align: int = 1) -> Layout:
    """The same partition on a ``width`` x ``height`` canvas (e.g. latent units).

    Each edge is mapped by e -> round(e * width / layout.width) and snapped to ``align``;
    neighbours share edges, so the result is again a partition.  Tiles that collapse to
    zero size are dropped (their area is covered by their neighbours' shared edges).
    """
    cores, _, kept = scaled_cores(layout, width, height, align)
    old = [t for t, k in zip(layout.tiles, kept.tolist()) if k]
    tiles = tuple(Tile(x0, y0, x1 - x0, y1 - y0, t.denoise, t.depth)
                  for t, (y0, y1, x0, x1) in zip(old, cores.tolist()))
    return Layout(width, height, tiles, layout.kind, layout.params)


def aspect_mismatch(layout: Layout, width: int, height: int) -> float:
    """Relative difference of aspect ratios |r_layout / r_canvas - 1|."""
    return abs((layout.width / layout.height) / (width / height) - 1.0)


def coverage(layout: Layout) -> torch.Tensor:
    """How many tiles cover each pixel ([height, width] int); a partition gives all ones."""
    c = torch.zeros(layout.height, layout.width, dtype=torch.int32)
    for t in layout.tiles:
        c[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    return c
