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
from .tile_blend import Evaluation, scatter_add_
from .tile_geometry import TileGeometry, aligned_grid_starts, snap_tile  # noqa: F401  (re-exported)
from .tile_windows import Window, paint, positions, size_groups  # noqa: F401  (Window: re-exported)

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


# --------------------------------------------------------------------------- geometry

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


# --------------------------------------------------------------------------- plan

def no_check():
    """The default cancel check of a plan: never cancels."""


class Plan(TileGeometry, sd.SpotSteps):
    """Everything about a (config, canvas, device, dtype) that does not change between steps.

    The windows are a :class:`~.tile_windows.WindowSet` (tensors); their weights are one tensor
    per distinct window size (a quadtree has a handful, a grid one); the normalised weights of each
    evaluated set (:class:`~.tile_blend.Evaluation`) and the per-level weight maps of variable
    denoise are built with one scatter per window size.  Nothing loops over windows in Python.
    For SpotDiffusion ``windows`` is the unshifted partition (it defines the tiles' denoise levels
    and skip); each step evaluates ``partition``'s shifted windows (:meth:`spot_evaluation`).
    ``layout``: None (a grid), or a layout's tiles in latent units (a :class:`quadtree.Layout` or the
    (cores, denoise) tensors of :func:`quadtree.scaled_cores`).  ``check`` is called between the
    planning phases (ComfyUI's Cancel raises from it).
    """

    def __init__(self, cfg: TileConfig, H: int, W: int, compression: int, align: int,
                 device, dtype, layout, min_tile: int = 1, check=no_check):
        self.cfg, self.H, self.W, self.device, self.dtype = cfg, H, W, device, dtype
        self.compression, self.align, self.min_tile = compression, align, min_tile
        self.spot = cfg.method == "SpotDiffusion"
        self.notes: list[str] = []
        self.partition: sd.SpotPartition | None = None
        self._eval_cache: dict = {}
        self._maps_cache: dict = {}
        self._active_cache: dict = {}
        self._spot_cache: dict = {}
        self._sat_cache: dict = {}
        self.area_cache: dict = {}      # (box, evaluated ids) -> Evaluation clipped to it (regional.py)
        check()
        self.set = self._window_set(layout)
        check()
        # Weights and their normalisation are computed in float32 (a Gaussian corner weight,
        # exp(-12.5)^2, underflows in float16) and cast to the latent's dtype once normalised.
        method = "MultiDiffusion" if self.spot else cfg.method
        self.raw = {size: window_weight(method, *size, device=device, dtype=torch.float32)
                    for size, _ in size_groups(self.set.sizes, torch.arange(len(self.set)))}
        self.n_skipped = int(self.set.skipped.sum())
        self.all = torch.arange(len(self.set))
        self.periods = self.partition.periods if self.spot else (0, 0)
        self._level_maps_t: torch.Tensor | None = None
        self._level_ids_t: torch.Tensor | None = None

    @property
    def level_maps(self) -> torch.Tensor:
        """W_l [L, H, W] (built on first use: variable denoise and skip need it)."""
        if self._level_maps_t is None:
            self._level_maps_t = self._level_maps()
        return self._level_maps_t

    @property
    def level_ids(self) -> torch.Tensor | None:
        """SpotDiffusion: each pixel's level in the unshifted partition, [H, W] int32 (else None)."""
        if self.spot and self._level_ids_t is None:
            self._level_ids_t = self._level_id_map()
        return self._level_ids_t

    def _level_maps(self) -> torch.Tensor:
        """W_l[p] = sum over tiles t of level l of their normalised weight at p: [L, H, W]."""
        L, H, W = len(self.levels), self.H, self.W
        ws = self.set
        if self.spot:
            maps = paint(ws.cores, torch.ones(len(ws)), H, W, ws.levels, L)
            return maps.to(device=self.device, dtype=self.dtype)
        maps = torch.zeros(L * H * W, device=self.device, dtype=self.dtype)
        ev = self.evaluation(self.all)
        for g in ev.groups:
            h, w = g.size
            lvl = ws.levels[g.ids].to(self.device)[:, None, None]
            pos = positions(g.starts, h, w, W, self.device) + lvl * (H * W)
            scatter_add_(maps, pos.reshape(-1), g.weights.reshape(-1))
        return maps.reshape(L, H, W)

    def _level_id_map(self) -> torch.Tensor:
        ws = self.set
        return (paint(ws.cores, ws.levels + 1, self.H, self.W)[0] - 1).to(torch.int32)

    # ---- per step, cached
    @property
    def windows(self) -> list:
        """The windows as :class:`Window` objects (made on first use; the engine uses ``set``)."""
        return self.set.as_list()

    @property
    def weights(self) -> list:
        """Each window's raw weight [h, w] (float32): one tensor per window size, shared."""
        return [self.raw[tuple(s)] for s in self.set.sizes.tolist()]

    @property
    def frame(self) -> tuple:
        """(oy, ox, H, W): the windows' coordinates start at the canvas origin (an area plan's do not)."""
        return (0, 0, self.H, self.W)

    def evaluation(self, ids: torch.Tensor) -> Evaluation:
        """The windows ``ids`` blended with weights normalised over them (cached per set)."""
        key = ids.numpy().tobytes()
        hit = self._eval_cache.get(key)
        if hit is None:
            hit = Evaluation(self.set, ids, self.H, self.W, self.device, self.dtype, self.raw)
            if len(self._eval_cache) >= 64:
                self._eval_cache.pop(next(iter(self._eval_cache)))
            self._eval_cache[key] = hit
        return hit

    def normalized(self, evaluated) -> dict:
        """{window index: w_t / sum_{s in E} w_s over its window} for the evaluated set E (for
        inspection; the engine uses :meth:`evaluation`)."""
        ev = self.evaluation(torch.as_tensor(list(evaluated), dtype=torch.int64))
        return {i: wt for g in ev.groups for i, wt in zip(g.ids.tolist(), g.weights.unbind(0))}

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

    def windows_of(self, active_levels: set) -> torch.Tensor:
        """Ids of the windows whose level is active (cached per set of active levels)."""
        key = frozenset(active_levels)
        hit = self._active_cache.get(key)
        if hit is None:
            on = torch.zeros(len(self.levels), dtype=torch.bool)
            on[list(key)] = True
            hit = self._active_cache[key] = self.all if bool(on.all()) else torch.nonzero(on[self.set.levels]).reshape(-1)
        return hit

    def max_window(self, margin: int = 0) -> tuple[int, int]:
        """The largest window (height, width) any step evaluates."""
        if self.spot:
            return self.partition.max_window(margin)
        sizes = self.set.sizes
        return int(sizes[:, 0].max()), int(sizes[:, 1].max())

    def describe(self) -> str:
        ws = self.set
        groups = size_groups(ws.sizes, torch.arange(len(ws)))
        groups.sort(key=lambda g: -g[0][0] * g[0][1])
        c = self.compression
        s = ", ".join(f"{ids.numel()}x {h * c}x{w * c}px" for (h, w), ids in groups)
        return f"{len(ws)} tiles ({s})"


def plan_for(cfg: TileConfig, H: int, W: int, compression: int, align: int, device, dtype,
             check_aspect: bool = True, item: int = 0, min_tile: int = 1, check=no_check) -> Plan:
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
        layout = qt.scaled_cores(layout, W, H, align)[:2]
    plan = Plan(cfg, H, W, compression, align, device, dtype, layout, min_tile, check)
    if note:
        plan.notes.insert(0, note)
    return plan


def plan_has_levels(cfg: TileConfig) -> bool:
    return cfg.layout is not None or cfg.skip_below > 0
