"""The tile engine: splits each model call into batched tiles and blends the x0 predictions.

Registered on a model clone through ComfyUI's own extension points (nothing is patched):

* ``set_model_unet_function_wrapper``: every model call (``apply_model``, which returns the
  denoised x0) is split into tile windows, same-size windows are batched up to the tile
  batch size and evaluated at the sampler's shared timestep, and the predictions are
  blended back in x0 space (MultiDiffusion: mean; Mixture of Diffusers: per-axis Gaussian
  weights; SpotDiffusion: a partition of the canvas shifted every step, no wrap-around,
  spot_diffusion.py).
* a keyed ``SAMPLER_SAMPLE`` wrapper: captures the run's sigmas and source latent into a
  :class:`RunState` that lives in that run's ``transformer_options`` only, and counts the
  sampler's steps through its callback (no host round trip per call).
* a keyed ``PREPARE_SAMPLING`` wrapper: ComfyUI's memory planning sees the tile-batch shape.

Per-tile denoise (variable_denoise.py) is applied per pixel through the layout's weights:
x0' = src + A (x - src) + beta (M - x).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from . import model_families as mf
from . import quadtree as qt
from . import regional
from . import spot_diffusion as sd
from . import tile_conditioning as tcond
from . import variable_denoise as vd
from .tile_control import TileControl
from .tile_patches import tile_transformer_options
from .utils import (RUN_KEY, SPOT_KEY, WRAPPER_KEY, counts_in, group_by_size, latent_compression, latent_patch_size,
                    summed_area)

log = logging.getLogger(__name__)

P = "[Quadtree Diffusion]"
PV = "[Quadtree Variable Denoise]:"
PS = "[Quadtree Skip]:"

MOD_STD = 0.1          # Mixture of Diffusers: per-axis std as a fraction of the window side (var = 0.01)
ASPECT_TOLERANCE = 0.03
MANY_TILES = 1000
LIST_KEYS_WHOLE = tuple(sorted(mf.WHOLE_KEYS))   # references go whole to every tile (model_families.py)


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
class TileBatch:
    """Where a batch of tiles lies: passed to deferred per-tile conditioning (ControlNet).

    ``windows`` are in latent units on the canvas ``H`` x ``W`` (never rolled: SpotDiffusion
    shifts its partition, not the latent).
    """
    windows: tuple
    H: int
    W: int
    n_chunks: int


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


def chunk_repeat(v: torch.Tensor, n_chunks: int, k: int) -> torch.Tensor:
    """[n_chunks*B, ...] -> [n_chunks*k*B, ...], chunk-major: every chunk holds its k tiles in turn."""
    vv = v.reshape(n_chunks, 1, v.shape[0] // n_chunks, *v.shape[1:])
    return vv.expand(n_chunks, k, *vv.shape[2:]).reshape(-1, *v.shape[1:])


def spatial_scale(shape, H: int, W: int):
    """(sh, sw) if the last two dims are the canvas at one scale (e.g. pixel-space hints), else None."""
    h, w = shape[-2], shape[-1]
    sh, sw = h / H, w / W
    if abs(sh - sw) > 1e-6 * max(sh, sw) + 1.0 / min(H, W):
        return None
    return sh, sw


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


def crop_scaled(v: torch.Tensor, win: Window, scale) -> torch.Tensor:
    sh, sw = scale
    y0, y1 = int(round(win.y0 * sh)), int(round(win.y1 * sh))
    x0, x1 = int(round(win.x0 * sw)), int(round(win.x1 * sw))
    return v[..., y0:y1, x0:x1]


def map_tensors(v, fn):
    """Apply ``fn`` to every tensor in a (nested) dict / list / tuple of model kwargs; a deferred
    control marker (it has ``tile_control``) goes to ``fn`` too; everything else is kept as is."""
    if torch.is_tensor(v) or hasattr(v, "tile_control"):
        return fn(v)
    if isinstance(v, dict):
        return {k: map_tensors(x, fn) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(map_tensors(e, fn) for e in v)
    return v


def tile_value(v, wins, n_chunks: int, N: int, H: int, W: int, spatial: bool = True, cache=None):
    """One conditioning value for a batch of tile windows, chunk-major.

    Tensors of batch N: spatial ones (>= 4-D, canvas-sized at some scale) are cropped to each
    window; others are repeated per tile.  Dicts and lists are handled element-wise; anything
    else (and tensors of another batch) passes unchanged.
    """
    k = len(wins)

    def one(v):
        if not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] != N:
            return v
        if spatial and v.ndim >= 4:
            scale = spatial_scale(v.shape, H, W)
            if scale is not None:
                vv = v.reshape(n_chunks, N // n_chunks, *v.shape[1:])
                crops = torch.stack([crop_scaled(vv, w, scale) for w in wins], dim=1)
                return crops.reshape(-1, *crops.shape[3:])
        if cache is None:
            return chunk_repeat(v, n_chunks, k)
        key = (id(v), k)      # the same tensor repeated for the same tile count: one copy per call
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = chunk_repeat(v, n_chunks, k)
        return hit

    return map_tensors(v, one)


def tile_cond(c: dict, wins, n_chunks: int, N: int, H: int, W: int, cache=None, whole=mf.WHOLE_KEYS) -> dict:
    """The model kwargs for a batch of tiles (see :func:`tile_value`); keys in ``whole`` are never cropped."""
    out = {}
    for key, v in c.items():
        if key == "transformer_options" or hasattr(v, "tile_control"):
            out[key] = v    # deferred control is computed per tile batch in TiledDiffusion._evaluate
        else:
            out[key] = tile_value(v, wins, n_chunks, N, H, W, spatial=key not in whole, cache=cache)
    return out


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


# --------------------------------------------------------------------------- model calls

class ModelCall:
    """One model call of ComfyUI as the engine sees it: ``model(x, t, c, cond_or_uncond)`` -> x0.

    ``apply_model`` is the (per-device) ``BaseModel.apply_model`` ComfyUI handed the unet wrapper;
    ``inner`` a ``model_function_wrapper`` that was on the model before ours (called per tile
    batch); ``extra``/``kwargs`` whatever else ComfyUI passed our wrapper, forwarded unchanged.
    """

    __slots__ = ("apply_model", "inner", "extra", "kwargs")

    def __init__(self, apply_model, inner=None, extra=(), kwargs=None):
        self.apply_model, self.inner, self.extra, self.kwargs = apply_model, inner, tuple(extra), kwargs or {}

    @property
    def base(self):
        """The ``BaseModel`` behind ``apply_model`` (None if it is not a bound method)."""
        return getattr(self.apply_model, "__self__", None)

    def __call__(self, x, t, c, cond_or_uncond):
        if self.inner is not None:
            return self.inner(self.apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond},
                              *self.extra, **self.kwargs)
        return self.apply_model(x, t, **c)


# --------------------------------------------------------------------------- run state

@dataclass
class RunState:
    """What one sampling run knows: its sigmas, source latent and step counter."""
    sigmas: list
    source: torch.Tensor | None
    canvas: tuple
    step: int = 0
    plans: dict = field(default_factory=dict)     # (batch item, device) -> Plan
    spot: dict = field(default_factory=dict)     # batch item -> (y shifts, x shifts) per step
    batch: dict = field(default_factory=dict)    # (device, window size) -> auto tile batch
    hints: dict = field(default_factory=dict)    # prepared canvas-sized control hints (tile_control.py)
    areas: dict = field(default_factory=dict)    # cond uuid -> its area's (y, x, h, w) box (regional.py)
    masks: dict = field(default_factory=dict)    # cond uuid -> summed-area table of its mask's support (regional.py)
    prompts: dict = field(default_factory=dict)  # cond uuid -> tile prompts encoded (tile_conditioning.py)
    stats: dict = field(default_factory=lambda: {"calls": 0, "tiles": 0, "full": 0, "skip_saved": 0,
                                                 "schedule_saved": 0, "mask_saved": 0, "mask_apart": 0})
    logged: set = field(default_factory=set)

    @property
    def n(self) -> int:
        return vd.steps_of(self.sigmas)

    def once(self, key: str) -> bool:
        if key in self.logged:
            return False
        self.logged.add(key)
        return True


# --------------------------------------------------------------------------- engine

class TiledDiffusion:
    """The unet function wrapper and its keyed sampler wrappers (one object per node output)."""

    def __init__(self, cfg: TileConfig, inner=None):
        self.cfg = cfg
        self.inner = inner          # a model_function_wrapper that was already on the model
        self._plans: dict = {}      # plans by canvas/device/dtype/item (bounded), reused by later runs
        self._largest: dict = {}    # largest window per canvas, for memory planning
        self._warned_no_run = False
        # ComfyUI's multi-GPU path calls the wrapper from one thread per device: the shared plan
        # cache is updated under a lock (per-device plans themselves are used by one thread)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options up to ComfyUI 0.13 and shares objects
        # since 0.14: either way every clone gets this same engine (configuration plus derived
        # caches keyed by canvas, device and dtype; per-run state lives in the run's options).
        return self

    # ---- keyed wrappers
    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False, *args, **kwargs):
        """SAMPLER_SAMPLE: start a RunState for this run and count its steps.

        Arguments ComfyUI adds in later versions (``*args``, ``**kwargs``) are passed on unchanged.
        """
        run = RunState(sigmas=[float(s) for s in sigmas.tolist()], source=latent_image,
                       canvas=tuple(noise.shape[-2:]))
        mo = extra_args.setdefault("model_options", {})
        to = dict(mo.get("transformer_options", {}))
        to[RUN_KEY] = run
        mo["transformer_options"] = to
        self._log_run_start(run)

        def counting_callback(i, denoised, x, total, *cb_args, **cb_kwargs):
            run.step = i + 1
            if callback is not None:
                return callback(i, denoised, x, total, *cb_args, **cb_kwargs)

        try:
            return executor(guider, sigmas, extra_args, counting_callback, noise, latent_image,
                            denoise_mask, disable_pbar, *args, **kwargs)
        finally:
            self._log_run_end(run)

    def prepare_sampling(self, executor, model, noise_shape, conds, *args, **kwargs):
        """PREPARE_SAMPLING: let ComfyUI plan memory for one tile batch, not the whole canvas.

        Everything else ComfyUI passes (``model_options=``, and since 0.6 ``force_full_load=``,
        ``force_offload=``, ...) is passed on unchanged.
        """
        check_latent(model.model, noise_shape)
        mf.check_tileable(model.model)
        try:
            base = model.model
            c, a = latent_compression(base), latent_patch_size(base)
            H, W = int(noise_shape[-2]), int(noise_shape[-1])
            mo = kwargs.get("model_options") or model.model_options
            margin = spot_margin(mo.get("transformer_options", {}), c, a)
            h, w, n = self._largest_tile(H, W, c, a, margin, mf.min_tile(base))
            k = min(self.cfg.tile_batch_size or 1, n)
            noise_shape = [noise_shape[0] * k, *noise_shape[1:-2], h, w]
        except ValueError:
            raise
        except Exception as e:  # never block sampling on an estimate
            log.warning("%s memory estimate fell back to the canvas shape: %s", P, e)
        return executor(model, noise_shape, conds, *args, **kwargs)

    def _largest_tile(self, H: int, W: int, compression: int, align: int, margin: int = 0,
                      min_tile: int = 1) -> tuple[int, int, int]:
        """(largest window height, width, most windows) over the layouts on an H x W latent; cached.
        SpotDiffusion: over every shift of its partition, each core grown by ``margin``."""
        key = (H, W, compression, align, margin, min_tile)
        hit = self._largest.get(key)
        if hit is None:
            plans = [plan_for(self.cfg, H, W, compression, align, "cpu", torch.float32, item=i, min_tile=min_tile)
                     for i in range(len(self.cfg.layouts))]
            sizes = [plan.max_window(margin) for plan in plans]
            hit = (max(h for h, _ in sizes), max(w for _, w in sizes),
                   max(plan.partition.max_tiles() if plan.spot else len(plan.windows) for plan in plans))
            if len(self._largest) >= 8:
                self._largest.clear()
            self._largest[key] = hit
        return hit

    # ---- logging (once per run)
    def _log_run_start(self, run: RunState):
        cfg = self.cfg
        if cfg.layout is None and cfg.skip_below <= 0:
            return
        if cfg.variable_denoise != "off" and cfg.layout is not None:
            log.info("%s Loaded sigmas from store, length=%d", PV, len(run.sigmas))
            lo, hi = cfg.denoise_range
            log.info("%s Denoise range: %.3f to %.3f", PV, lo, hi)
            log.info("%s ENABLED - Tiles will be denoised adaptively (mode=%s)", PV, cfg.variable_denoise)
        empty = run.source is not None and not bool(torch.count_nonzero(run.source))   # once per run
        if empty and cfg.skip_below > 0:
            log.warning("%s skip_diffusion_below=%dpx with an empty (all-zero) latent: skipped tiles "
                        "stay at the empty latent and will come out flat; use skip for img2img only",
                        PS, cfg.skip_below)
        if empty and cfg.layout is not None and cfg.variable_denoise != "off" and cfg.denoise_range[0] < 1.0:
            log.warning("%s WARNING - variable denoise with an empty (all-zero) latent: tiles with denoise < 1 "
                        "start from a blank image and come out flat; for txt2img set variable_denoise to off "
                        "(or min_denoise = max_denoise = 1)", PV)

    def _log_run_end(self, run: RunState):
        s = run.stats
        if s["calls"] == 0:
            return
        stepwise = (self.cfg.variable_denoise != "off" and plan_has_levels(self.cfg)) or \
            self.cfg.method == "SpotDiffusion"
        if stepwise and run.step == 0 and run.n > 1:
            log.warning("%s WARNING - the sampler never reported a finished step (it called no callback): "
                        "per-step settings (variable denoise, SpotDiffusion shifts) stayed at the first step; "
                        "use a KSampler / SamplerCustom sampler", PV)
        log.info("%s run done: %d model calls, %d tile evaluations; saved %d by schedule and %d by "
                 "skip (of %d for all tiles at every call)%s", P, s["calls"], s["tiles"],
                 s["schedule_saved"], s["skip_saved"], s["full"],
                 f"; mask prompts: {s['mask_apart']} window evaluations in calls of their own, {s['mask_saved']} "
                 f"saved where their mask is 0" if s["mask_saved"] else "")

    # ---- the unet wrapper
    def __call__(self, apply_model, args, *extra, **kwargs):
        """The unet function wrapper: ``args`` holds ComfyUI's model call on the whole canvas;
        anything else ComfyUI passes is forwarded to a wrapper that was on the model before ours."""
        x, t, c, cou = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        to = c.get("transformer_options", {})
        mf.check_transformer_options(to)
        run: RunState | None = to.get(RUN_KEY)
        model = ModelCall(apply_model, self.inner, extra, kwargs)
        base = model.base
        H, W = int(x.shape[-2]), int(x.shape[-1])
        n_chunks = len(cou) if cou and x.shape[0] % len(cou) == 0 else 1
        canvas = run.canvas if run is not None else (H, W)
        if (H, W) != tuple(canvas):
            return self._area_call(model, x, t, c, cou, n_chunks, base, run)
        src = run.source if run is not None else None
        if src is not None and not _source_fits(src, x, n_chunks):
            src = None
        if run is not None:
            run.stats["calls"] += 1
        items = len(self.cfg.layouts)
        if items == 1:
            return self._call_item(model, x, t, c, cou, n_chunks, run, base, src, 0)
        B = x.shape[0] // n_chunks
        _check_items(B, items)
        out = torch.empty_like(x)
        for b in range(B):
            rows = slice(b, None, B)     # item b in every cond chunk (rows are chunk-major); no index tensor
            xb = x[rows]
            tb = t[rows] if t.ndim > 0 and t.shape[0] == x.shape[0] else t
            cb = select_rows(c, rows, x.shape[0])
            sb = None if src is None else src[b:b + 1] if src.shape[0] == B else src
            out[rows] = self._call_item(model, xb, tb, cb, cou, n_chunks, run, base, sb, b)
        return out

    def _call_item(self, model: ModelCall, x, t, c, cou, n_chunks, run, base, src, item):
        """One model call on the full canvas with one layout."""
        to = c.get("transformer_options", {})
        H, W = int(x.shape[-2]), int(x.shape[-1])
        plan = self._plan(run, H, W, base, x, item)
        step, n = self._step(run, t, to)
        coeffs = self._coefficients(plan, run, step, n, src, x)
        if self.cfg.variable_denoise == "scale" and run is not None and run.once("scale"):
            d = min(dd for dd, _ in plan.levels)
            p = vd.progress(step, n)
            log.info("%s SMOOTH SCALING - tile_denoise=%.3f, progress=%.3f, start_scale=%.3f, scale=%.3f",
                     PV, d, p, vd.scale_start(d), vd.scale_alpha(d, p))
        active = {lvl for lvl, (a, _) in enumerate(coeffs) if a > 0}
        if plan.spot:       # this step's shifted partition; each core written back as it is
            oy, ox = self._spot_offsets(run, plan, step, n, to, item)
            windows = plan.spot_windows(oy, ox, spot_margin(to, plan.compression, plan.align))
            evaluated, skipped = plan.spot_evaluated(active, windows)
            weights = None
        else:
            windows = plan.windows
            evaluated, skipped = plan.windows_of(active), plan.n_skipped
            weights = plan.normalized(evaluated) if evaluated else None
        if run is not None:
            st = run.stats
            st["full"] += len(windows)
            st["tiles"] += len(evaluated)
            st["skip_saved"] += skipped
            st["schedule_saved"] += len(windows) - skipped - len(evaluated)
        if not evaluated:
            return _broadcast_source(src, x, n_chunks)
        masks = regional.chunk_masks(run, to, n_chunks)
        if masks is None:
            blend = self._evaluate(model, x, t, c, cou, n_chunks, plan, windows, evaluated, weights, run)
        else:
            blend = self._evaluate_masked(model, x, t, c, cou, n_chunks, plan, windows, evaluated, weights, run, masks)
        if all(a == 1.0 and b == 1.0 for a, b in coeffs):
            return blend
        A, beta = plan.activity_maps(coeffs)
        B = x.shape[0] // n_chunks
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        mv = blend.reshape(n_chunks, B, *x.shape[1:])
        sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
        return vd.combine_x0(sv, xv, mv, A, beta).reshape(x.shape)

    # ---- helpers
    def _coefficients(self, plan: Plan, run, step: int, n: int, src, x) -> list:
        """Per level of the plan, this step's (a, b) of variable denoise; all (1, 1) without a source."""
        coeffs = [vd.tile_coefficients(self.cfg.variable_denoise if plan_has_levels(self.cfg) else "off",
                                       d, sk, step, n) for d, sk in plan.levels]
        if src is None and any(a != 1.0 or b != 1.0 for a, b in coeffs):
            if run is None and not self._warned_no_run:
                self._warned_no_run = True       # once per engine: there is no run to attach it to
                log.warning("%s WARNING - No sigmas in store, variable denoise will NOT work "
                            "(the model was called outside a KSampler run); tiles run at full strength", PV)
            elif run is not None and run.once("nosrc"):
                log.warning("%s WARNING - the sampler's source latent %s does not match the model input %s: "
                            "variable denoise and skip will NOT work; tiles run at full strength", PV,
                            list(run.source.shape) if run.source is not None else None, list(x.shape))
            coeffs = [(1.0, 1.0)] * len(coeffs)
        return coeffs

    def _plan(self, run, H, W, base, x, item=0) -> Plan:
        run_key = (item, str(x.device))       # per device: ComfyUI's multi-GPU path runs one call per device
        if run is not None and run_key in run.plans:
            return run.plans[run_key]
        key = (H, W, str(x.device), x.dtype, item)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = plan_for(self.cfg, H, W, latent_compression(base), latent_patch_size(base), x.device,
                                x.dtype, item=item, min_tile=mf.min_tile(base))
                if len(self._plans) >= 4:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = plan
        if run is not None:
            if run.once(f"plan{item}"):
                self._log_plan(plan, run, item)
            run.plans[run_key] = plan
        return plan

    def _log_plan(self, plan: Plan, run: RunState, item: int = 0):
        cfg = self.cfg
        k = cfg.tile_batch_size or "auto"
        mode = "quadtree" if cfg.layout is not None else "grid"
        if len(cfg.layouts) > 1:
            mode += f" (batch item {item})"
        log.info("%s %s %s on a %dx%d latent: %s, tile batch %s, overlap %s", P, cfg.method, mode,
                 plan.W, plan.H, plan.describe(), k,
                 f"{cfg.tile_overlap}px" if cfg.enable_overlap and not plan.spot else "off")
        for note in plan.notes:
            log.info("%s %s", P, note)
        if len(plan.windows) > MANY_TILES:
            log.warning("%s %d tiles: sampling will be slow; raise min_tile_size / tile size", P,
                        len(plan.windows))
        if cfg.skip_below > 0:
            ns = sum(1 for w in plan.windows if w.skipped)
            log.info("%s Will skip %d/%d tiles (min dimension < %dpx)", PS, ns, len(plan.windows), cfg.skip_below)

    def _step(self, run, t, to) -> tuple[int, int]:
        if run is not None:
            return min(run.step, run.n - 1), run.n
        sigmas = to.get("sample_sigmas")
        if sigmas is None or len(sigmas) < 2:
            return 0, 1
        sig = [float(s) for s in sigmas.tolist()]
        return vd.nearest_step(sig, float(t.reshape(-1)[0])), vd.steps_of(sig)

    def _spot_offsets(self, run, plan: Plan, step: int, n: int, to, item: int = 0) -> tuple[int, int]:
        """This step's SpotDiffusion offsets (oy, ox), drawn once per run from the SpotDiffusion parameters."""
        if run is not None and item in run.spot:
            ys, xs = run.spot[item]
            return ys[step], xs[step]
        params = to.get(SPOT_KEY) or {}
        method, seed = params.get("shift_method", "random"), int(params.get("seed", 0))
        schedule = params.get("schedule", sd.DEFAULT_SCHEDULE)
        ys, xs = sd.step_offsets(n, plan.periods, method, seed, plan.align, schedule, plan.partition.rest())
        if run is not None:
            run.spot[item] = (ys, xs)
            if run.once(f"spot{item}"):
                log.info("%s SpotDiffusion offsets per step (%s, seed %d, %s): y %s, x %s", P, method, seed,
                         schedule, _short(ys), _short(xs))
        return ys[step], xs[step]

    def _batch_size(self, run, model: ModelCall, x, n_chunks, size) -> int:
        k = self.cfg.tile_batch_size
        if k > 0:
            return k
        key = (str(x.device), size)
        if run is not None and key in run.batch:
            return run.batch[key]
        k = auto_batch_size(model.base, x, n_chunks, size)
        if run is not None:
            run.batch[key] = k      # per device and window size: a quadtree's sizes differ up to 64x in area
        return k

    def _evaluate(self, model: ModelCall, x, t, c, cou, n_chunks, plan: Plan, windows, evaluated, weights, run):
        """M = sum over evaluated windows of weight_t * x0_t, model calls batched by window size.

        ``weights`` None (SpotDiffusion): the windows' cores partition the canvas; M = each
        window's x0 on its core (the context margin around it is dropped)."""
        import comfy.model_management as mm
        N = x.shape[0]
        H, W = plan.H, plan.W
        B = N // n_chunks
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        out = torch.zeros_like(x)
        ov = out.reshape(n_chunks, B, *x.shape[1:])
        c = mf.canvas_cond(c, model.base, H, W)
        whole = mf.whole_keys(model.base)
        rep: dict = {}      # repeated (non-spatial) conditioning per tile count, shared by this call's batches
        prompts = tcond.chunk_prompts(run, c.get("transformer_options", {}), n_chunks)
        for group in plan.groups(evaluated, windows):
            h, w = windows[group[0]].size
            k = max(1, self._batch_size(run, model, x, n_chunks, (h, w)))
            for s in range(0, len(group), k):
                mm.throw_exception_if_processing_interrupted()
                idx = group[s:s + k]
                wins = [windows[i] for i in idx]
                xt = torch.stack([xv[..., wi.y0:wi.y1, wi.x0:wi.x1] for wi in wins], dim=1)
                xt = xt.reshape(-1, *xt.shape[3:])
                tt = tile_value(t, wins, n_chunks, N, H, W, False, rep) if t.ndim > 0 and t.shape[0] == N else t
                ct = tile_cond(c, wins, n_chunks, N, H, W, rep, whole)
                if prompts is not None:
                    ct = tcond.apply(ct, wins, plan.frame, n_chunks, B, prompts)
                tb = TileBatch(tuple(wins), H, W, n_chunks)
                if "transformer_options" in ct:     # model patches (image controls) get their tile's crop
                    ct["transformer_options"] = tile_transformer_options(ct["transformer_options"], tb, xt.shape[0],
                                                                         run.hints if run is not None else rep,
                                                                         xt.device)
                deferred = ct.get("control")
                if hasattr(deferred, "tile_control"):
                    ct["control"] = deferred.tile_control(xt, tt, ct, tb)
                pred = model(xt, tt, ct, cou)
                pv = pred.reshape(n_chunks, len(idx), B, *pred.shape[1:])
                for j, (i, wi) in enumerate(zip(idx, wins)):
                    if weights is None:
                        y0, y1, x0, x1 = wi.core
                        ov[..., y0:y1, x0:x1] = pv[:, j, ..., y0 - wi.y0:y1 - wi.y0, x0 - wi.x0:x1 - wi.x0]
                    else:
                        ov[..., wi.y0:wi.y1, wi.x0:wi.x1].addcmul_(pv[:, j], weights[i])
        return out

    def _evaluate_masked(self, model: ModelCall, x, t, c, cou, n_chunks, plan: Plan, windows, evaluated, weights,
                         run, masks):
        """``_evaluate`` with the chunks of each mask prompt evaluated only on the windows holding a
        pixel of its mask's support (regional.py); ComfyUI weights its x0 by 0 everywhere else.
        Chunks that need the same windows share model calls."""
        groups: dict = {}           # windows to evaluate -> the chunks that need them
        for j, sat in enumerate(masks):
            ev = evaluated if sat is None else regional.touching(sat, windows, evaluated, cores=weights is None)
            if sat is not None and run.once(f"mask{id(sat)}"):
                log.info("%s prompt with a mask: evaluated on the %d of %d tile windows that hold its mask", P,
                         len(ev), len(evaluated))
            run.stats["mask_saved"] += len(evaluated) - len(ev)
            groups.setdefault(ev, []).append(j)
        apart = sum(len(ev) for ev in groups) - len(evaluated)    # windows evaluated again for other chunks
        run.stats["tiles"] += apart
        run.stats["mask_apart"] += apart
        out = torch.zeros_like(x)           # x0 of a mask prompt where its mask is 0: weighted 0 by ComfyUI
        for ev, chunks in groups.items():
            if not ev:
                continue
            wts = plan.normalized(ev) if weights is not None and ev != evaluated else weights
            if len(chunks) == n_chunks:
                return self._evaluate(model, x, t, c, cou, n_chunks, plan, windows, ev, wts, run)
            rows, tr, cr, coul = _chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] = self._evaluate(model, x[rows], tr, cr, coul, len(chunks), plan, windows, ev, wts, run)
        return out

    def _area_call(self, model: ModelCall, x, t, c, cou, n_chunks, base, run):
        """A call on part of the canvas (a prompt with an area): each group of chunks with the same
        box on the canvas is evaluated with the canvas plan restricted to that box (regional.py);
        with one layout per IMAGE-batch item, each item with its own plan."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        to = c.get("transformer_options", {})
        boxes = regional.chunk_boxes(run, to, n_chunks, h, w)
        if boxes is None:
            return self._area_grid_call(model, x, t, c, cou, n_chunks, base, run)
        items = len(self.cfg.layouts)
        if items == 1:
            return self._area_boxes(model, x, t, c, cou, n_chunks, run, base, boxes, 0)
        N = x.shape[0]
        B = N // n_chunks
        _check_items(B, items)
        out = torch.empty_like(x)
        for b in range(B):
            rows = slice(b, None, B)     # item b in every cond chunk (rows are chunk-major)
            tb = t[rows] if t.ndim > 0 and t.shape[0] == N else t
            out[rows] = self._area_boxes(model, x[rows], tb, select_rows(c, rows, N), cou, n_chunks, run, base,
                                         boxes, b)
        return out

    def _area_boxes(self, model: ModelCall, x, t, c, cou, n_chunks, run, base, boxes, item):
        """The chunks of an area call grouped by their box, each group evaluated on its box."""
        out = torch.empty_like(x)
        for box in dict.fromkeys(boxes):          # the distinct boxes, in call order
            chunks = [j for j, b in enumerate(boxes) if b == box]
            if len(chunks) == n_chunks:
                return self._area_item(model, x, t, c, cou, n_chunks, run, base, box, item)
            rows, tr, cr, coul = _chunk_subset(x, t, c, cou, n_chunks, chunks)
            out[rows] = self._area_item(model, x[rows], tr, cr, coul, len(chunks), run, base, box, item)
        return out

    def _area_item(self, model: ModelCall, x, t, c, cou, n_chunks, run, base, box, item=0):
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
        area = regional.AreaPlan(plan, evaluated, plan.normalized(evaluated), box)
        run.stats["tiles"] += len(area.windows)
        if run.once(f"area{box}"):
            log.info("%s prompt with an area (%d,%d %dx%d latent px): %d of the canvas's tile windows, clipped to it",
                     P, x0, y, w, h, len(area.windows))
        if not area.windows:
            return _broadcast_source(src, x, n_chunks)
        blend = self._evaluate(model, x, t, c, cou, n_chunks, area, area.windows, area.evaluated, area.weights, run)
        if all(a == 1.0 and b == 1.0 for a, b in coeffs):
            return blend
        A, beta = plan.activity_maps(coeffs)
        A, beta = A[y:y + h, x0:x0 + w], beta[y:y + h, x0:x0 + w]
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        mv = blend.reshape(n_chunks, B, *x.shape[1:])
        sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
        return vd.combine_x0(sv, xv, mv, A, beta).reshape(x.shape)

    def _area_grid_call(self, model: ModelCall, x, t, c, cou, n_chunks, base, run):
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


def tiled_model(model, cfg: TileConfig):
    """A clone of ``model`` that samples in tiles: the engine as its unet function wrapper plus
    keyed SAMPLER_SAMPLE (run state), PREPARE_SAMPLING (memory planning) and CALC_COND_BATCH
    (per-tile ControlNet; per-tile prompts) wrappers.  A wrapper already on the model is kept and called per tile
    batch; an earlier Quadtree Diffusion on the same model is replaced, not stacked."""
    import comfy.patcher_extension
    m = model.clone()
    inner = m.model_options.get("model_function_wrapper")
    if isinstance(inner, TiledDiffusion):
        log.info("%s the model was already tiled: the new settings replace the old ones", P)
        inner = inner.inner
    engine = TiledDiffusion(cfg, inner)
    m.set_model_unet_function_wrapper(engine)
    wmp = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wmp.SAMPLER_SAMPLE, engine.sampler_sample),
                     (wmp.PREPARE_SAMPLING, engine.prepare_sampling),
                     (wmp.CALC_COND_BATCH, TileControl(engine).calc_cond_batch)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    for key, fn in ((tcond.KEY, tcond.TilePromptConds().calc_cond_batch),
                    (regional.KEY, regional.RegionRecorder().calc_cond_batch)):
        m.remove_wrappers_with_key(wmp.CALC_COND_BATCH, key)
        m.add_wrapper_with_key(wmp.CALC_COND_BATCH, key, fn)
    return m


def check_latent(base, shape) -> None:
    """Refuse latents the engine cannot tile, naming the input and the fix."""
    shape = list(shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"latent: Quadtree Diffusion tiles latents of shape [batch, channels, height, width] "
                         f"(or [batch, channels, frames, height, width]); this latent has shape {shape}: "
                         f"connect an image/video latent, or remove Quadtree Diffusion for this model")
    fmt = getattr(base, "latent_format", None)
    expected = getattr(fmt, "latent_channels", None)
    if isinstance(expected, int) and len(shape) == 2 + getattr(fmt, "latent_dimensions", 2) and shape[1] != expected:
        raise ValueError(f"latent: {shape[1]} channels but the model expects {expected}: encode the image with "
                         f"this model's VAE (or use an Empty Latent Image made for this model)")


def plan_has_levels(cfg: TileConfig) -> bool:
    return cfg.layout is not None or cfg.skip_below > 0


def spot_margin(to: dict, compression: int, align: int) -> int:
    """SpotDiffusion's context margin in latent px: ceil(context_margin px / compression), rounded up
    to the model's patch; 0 when the SpotDiffusion parameters set none."""
    px = int(((to or {}).get(SPOT_KEY) or {}).get("context_margin", 0) or 0)
    if px <= 0:
        return 0
    m = -(-px // compression)
    return -(-m // align) * align


def auto_batch_size(base, x, n_chunks: int, size) -> int:
    """Tiles per model call that fit the free memory of the model's device (tile_batch_size 0).

    k = floor(0.8 * free / (1.5 * memory_required(one tile with all its cond chunks))), 1..64.
    """
    import comfy.model_management as mm
    try:
        shape = [x.shape[0], *x.shape[1:-2], *size]
        per_tile = base.memory_required(shape) * 1.5 if base is not None else 0
        free = mm.get_free_memory(x.device)
        if per_tile <= 0:
            return 8
        return int(max(1, min(64, 0.8 * free // per_tile)))
    except Exception:
        return 4


def select_rows(c: dict, rows: slice, N: int) -> dict:
    """The model kwargs restricted to some rows of the batch (tensors of batch N, at any depth)."""
    def one(v):
        if hasattr(v, "select_rows"):     # deferred per-tile control (tile_control.DeferredControl)
            return v.select_rows(rows, N)
        return v[rows] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == N else v
    return {k: (v if k == "transformer_options" else map_tensors(v, one)) for k, v in c.items()}


def _check_items(B: int, items: int) -> None:
    """One layout per image of an IMAGE batch needs a latent batch of as many items."""
    if B != items:
        raise ValueError(f"quadtree: {items} layouts (one per image of the IMAGE batch) but the latent batch "
                         f"is {B}; encode the same image batch you gave QuadtreeVisualizer, or give it one "
                         f"image")


def _chunk_subset(x, t, c, cou, n_chunks: int, chunks: list):
    """(rows, timestep, model kwargs, cond_or_uncond) of some cond chunks of a call (rows are
    chunk-major), with ``transformer_options``' per-chunk lists cut to match."""
    N = x.shape[0]
    B = N // n_chunks
    to = c.get("transformer_options", {})
    rows = [j * B + b for j in chunks for b in range(B)]
    tr = t[rows] if t.ndim > 0 and t.shape[0] == N else t
    cr = select_rows(c, rows, N)
    coul = [cou[j] for j in chunks]
    cr["transformer_options"] = {**to, "cond_or_uncond": coul}
    if "uuids" in to:
        cr["transformer_options"]["uuids"] = [to["uuids"][j] for j in chunks]
    return rows, tr, cr, coul


def _source_fits(src: torch.Tensor, x: torch.Tensor, n_chunks: int) -> bool:
    B = x.shape[0] // n_chunks
    return src.shape[1:] == x.shape[1:] and src.shape[0] in (1, B)


def _broadcast_source(src, x, n_chunks):
    B = x.shape[0] // n_chunks
    sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
    return sv.expand(n_chunks, B, *x.shape[1:]).reshape(x.shape).clone()


def _short(values, limit: int = 16) -> str:
    """A list for a log line: its first ``limit`` entries, then how many more."""
    head = ", ".join(str(v) for v in values[:limit])
    return f"[{head}{f', ... {len(values) - limit} more' if len(values) > limit else ''}]"
