"""Tile windows as tensors: many windows handled in a few vectorised operations.

A :class:`WindowSet` holds n windows of a canvas as int64 CPU tensors, ``boxes`` [n, 4] (the
evaluated window y0, y1, x0, x1) and ``cores`` [n, 4] (the part it stands for), plus per-window
``levels``, ``denoise`` and ``skipped``.  Everything the engine does per step (grouping by size,
picking the windows of active levels, cutting a batch) is a tensor operation over all windows;
:class:`Window` objects are made only on demand (a control, a tile prompt, a test reads them).

Pure geometry: no ComfyUI imports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def as_rects(rects) -> torch.Tensor:
    """Rectangles (y0, y1, x0, x1) as an int64 [n, 4] CPU tensor."""
    if torch.is_tensor(rects):
        return rects.to(device="cpu", dtype=torch.int64).reshape(-1, 4)
    return torch.tensor(list(rects), dtype=torch.int64).reshape(-1, 4)


class WindowSet:
    """n windows: ``boxes`` and ``cores`` [n, 4] int64 (y0, y1, x0, x1), ``levels`` [n] int64,
    ``denoise`` [n] float64, ``skipped`` [n] bool (CPU tensors)."""

    def __init__(self, boxes, cores=None, levels=None, denoise=None, skipped=None):
        self.boxes = as_rects(boxes)
        self.cores = self.boxes if cores is None else as_rects(cores)
        n = self.boxes.shape[0]
        self.levels = torch.zeros(n, dtype=torch.int64) if levels is None else torch.as_tensor(levels).long()
        self.denoise = torch.ones(n, dtype=torch.float64) if denoise is None else \
            torch.as_tensor(denoise, dtype=torch.float64)
        self.skipped = torch.zeros(n, dtype=torch.bool) if skipped is None else torch.as_tensor(skipped).bool()
        self._list: list | None = None
        self._groups: dict = {}

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        """[n, 2] (height, width) of every window."""
        b = self.boxes
        return torch.stack((b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]), dim=1)

    def as_list(self) -> list:
        """Every window as a :class:`Window` (made once, on first use)."""
        if self._list is None:
            rows = zip(self.boxes.tolist(), self.cores.tolist(), self.denoise.tolist(), self.skipped.tolist(),
                       self.levels.tolist())
            self._list = [Window(b[0], b[1], b[2], b[3], tuple(c), d, s, lvl) for b, c, d, s, lvl in rows]
        return self._list

    def groups(self, ids: torch.Tensor) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """The window ids ``ids`` grouped by window size, ((h, w), ids of that size) in first-seen
        order (windows of one size share model calls); cached per ``ids`` tensor."""
        key = id(ids)
        hit = self._groups.get(key)
        if hit is not None and hit[0] is ids:
            return hit[1]
        out = size_groups(self.sizes[ids], ids)
        if len(self._groups) >= 64:
            self._groups.clear()
        self._groups[key] = (ids, out)
        return out


def size_groups(sizes: torch.Tensor, ids: torch.Tensor) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """``ids`` grouped by their [m, 2] ``sizes``: ((h, w), ids) per distinct size, first seen first."""
    if ids.numel() == 0:
        return []
    code = sizes[:, 0] * (int(sizes[:, 1].max()) + 1) + sizes[:, 1]
    uniq, inverse = torch.unique(code, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    out = []
    for u in torch.argsort(first).tolist():         # one entry per distinct size: a handful
        sel = inverse == u
        j = int(first[u])
        out.append(((int(sizes[j, 0]), int(sizes[j, 1])), ids[sel]))
    return out


class WindowBatch:
    """Some windows of a set, in order, as a read-only sequence of :class:`Window` (made on demand)
    with their ``boxes`` and ``cores`` tensors ([k, 4], also made on demand) for vectorised crops."""

    __slots__ = ("ws", "ids", "_list")

    def __init__(self, ws: WindowSet, ids: torch.Tensor):
        self.ws, self.ids, self._list = ws, ids, None

    @property
    def boxes(self) -> torch.Tensor:
        return self.ws.boxes[self.ids]

    @property
    def cores(self) -> torch.Tensor:
        return self.ws.cores[self.ids]

    def _windows(self) -> list:
        if self._list is None:
            every = self.ws.as_list()
            self._list = [every[i] for i in self.ids.tolist()]
        return self._list

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i):
        return self._windows()[i]

    def __iter__(self):
        return iter(self._windows())

    @property
    def size(self) -> tuple[int, int]:
        b = self.ws.boxes[int(self.ids[0])]
        return int(b[1] - b[0]), int(b[3] - b[2])


def batch_of(ws: WindowSet, ids: torch.Tensor) -> WindowBatch:
    """The windows ``ids`` of ``ws`` as a :class:`WindowBatch`."""
    return WindowBatch(ws, ids)


# --------------------------------------------------------------------------- pixels of many windows

_OFFSETS: dict = {}


def offsets(h: int, w: int, W: int, device=None) -> torch.Tensor:
    """Flat offsets (i * W + j) of an h x w window's pixels from its top-left corner on a canvas of
    width W: [h * w] int64 (cached per size, width and device)."""
    key = (h, w, W, str(device))
    hit = _OFFSETS.get(key)
    if hit is None:
        hit = (torch.arange(h, device=device)[:, None] * W + torch.arange(w, device=device)[None, :]).reshape(-1)
        if len(_OFFSETS) >= 256:
            _OFFSETS.clear()
        _OFFSETS[key] = hit
    return hit


def positions(starts: torch.Tensor, h: int, w: int, W: int, device=None) -> torch.Tensor:
    """Flat canvas index (y * W + x) of every pixel of k windows of size h x w whose top-left
    corners are ``starts`` [k, 2] (y0, x0): [k, h, w] int64."""
    s = starts.to(device)
    return ((s[:, 0] * W + s[:, 1])[:, None] + offsets(h, w, W, s.device)[None, :]).reshape(-1, h, w)


def core_mask(boxes: torch.Tensor, cores: torch.Tensor, h: int, w: int, device=None) -> torch.Tensor:
    """[k, h, w] bool: the pixels of each h x w window (``boxes``) that lie in its core."""
    rel = (cores - boxes[:, [0, 0, 2, 2]]).to(device)
    ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
    in_y = (ar_h[None, :] >= rel[:, 0, None]) & (ar_h[None, :] < rel[:, 1, None])
    in_x = (ar_w[None, :] >= rel[:, 2, None]) & (ar_w[None, :] < rel[:, 3, None])
    return in_y[:, :, None] & in_x[:, None, :]


def paint(rects: torch.Tensor, values: torch.Tensor, H: int, W: int, layers: torch.Tensor | None = None,
          n_layers: int = 1) -> torch.Tensor:
    """P[l, y, x] = sum of ``values`` over the rectangles of layer l covering (y, x): [n_layers, H, W].

    A difference array (+v at (y0, x0) and (y1, x1), -v at (y0, x1) and (y1, x0)) summed along both
    axes: O(n + H W) whatever the rectangles' sizes (float64, exact for integer values)."""
    d = torch.zeros(n_layers, H + 1, W + 1, dtype=torch.float64)
    if rects.numel():
        lay = torch.zeros(rects.shape[0], dtype=torch.int64) if layers is None else layers
        v = values.to(torch.float64)
        y0, y1, x0, x1 = rects.unbind(1)
        for ys, xs, sign in ((y0, x0, 1.0), (y1, x1, 1.0), (y0, x1, -1.0), (y1, x0, -1.0)):
            d.index_put_((lay, ys, xs), v * sign, accumulate=True)
    return d.cumsum(1).cumsum(2)[:, :H, :W]


def counts_in(sat: torch.Tensor, rects: torch.Tensor) -> torch.Tensor:
    """Set pixels inside each rectangle from a summed-area table ``sat`` [H+1, W+1]: [n] int64."""
    if rects.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    y0, y1, x0, x1 = rects.unbind(1)
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
