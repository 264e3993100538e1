"""Runs a stage list (``vae_graph``) tile by tile with whole-image GroupNorm statistics.

* **Exact** (one segment per stage): every stage runs over all tiles of its output map; a tile's
  input is re-cut from the whole input map (kept on the host) with the halo the stage needs (1 px
  for a 3x3 conv), so every output pixel sees exactly the context it has untiled. While a stage's
  output is written, its statistics (n, mean, M2 per batch and group) are pooled over the tile
  *cores* (each pixel once), so the next GroupNorm normalises with the whole image's statistics.
  Attention stages compute keys and values of the whole map first, then attend tile by tile.
* **Chains** (fast mode): several stages run per tile end to end, the tile's input region grown by
  every stage's halo (range maths in ``vae_stages``); GroupNorms inside the chain use given
  (estimated) statistics. One pass per tile.

Memory on the device: one tile of at most ``budget`` elements per conv input (plus, for an
attention stage, the whole map's keys and values at latent resolution). Whole maps live on the
``store`` device (the host).
"""
from __future__ import annotations

import logging
import math

import torch

from .vae_stages import Moments, apply_norm, group_moments, norm_affine, norm_coefficients

log = logging.getLogger(__name__)


def tile_grid(height: int, width: int, area: float) -> list[tuple[int, int, int, int]]:
    """Tiles (y0, y1, x0, x1) covering height x width, each of at most ``area`` pixels (at least
    1x1): rows of equal height h = ceil(H / ceil(H / floor(sqrt(area)))), then each row cut into
    equal widths of at most area / h."""
    side = max(1, int(math.isqrt(max(1, int(area)))))
    ny = -(-height // side)
    rh = -(-height // ny)
    nx = -(-width // max(1, int(area) // rh))
    ys = [round(i * height / ny) for i in range(ny + 1)]
    xs = [round(i * width / nx) for i in range(nx + 1)]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(ny) for j in range(nx)
            if ys[i + 1] > ys[i] and xs[j + 1] > xs[j]]


def _hull(a, b):
    if a is None:
        return b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


class Variant:
    """Deliberately wrong variants, for negative-control tests only."""
    per_tile_norm = False     # every tile normalised with its own statistics
    no_halo = False           # tiles cut without halo (their edges see zero padding)


class TileRunner:
    """Runs segments of stages over whole maps ``maps`` ({name: [B, C, H, W]} on ``store``)."""

    def __init__(self, stages, maps: dict, device, dtype, store, budget: int, out_dtype=torch.float32,
                 fixed_stats: dict | None = None, variant: Variant | None = None, pbar=None):
        self.stages, self.maps = stages, dict(maps)
        self.device, self.dtype, self.store, self.budget = device, dtype, store, int(budget)
        self.out_dtype, self.fixed, self.variant, self.pbar = out_dtype, dict(fixed_stats or {}), variant, pbar
        self.shapes = {k: tuple(v.shape) for k, v in maps.items()}
        self.dtypes = {k: v.dtype for k, v in maps.items()}
        self.level = {}
        for s in stages:
            b, _, h, w = self.shapes[s.inputs[0]]
            self.shapes[s.output] = (b, s.out_channels, s.out_size(h), s.out_size(w))
            self.level[s.output] = s.level
        self.groups = {s.inputs[0]: s.norm.num_groups for s in stages if s.norm is not None}
        self.stats: dict[str, Moments] = {}
        self.coeffs: dict[str, tuple] = {}
        self.final = stages[-1].output
        self.dtypes[self.final] = out_dtype
        self.tiles_run = 0
        self.host_bytes = self.host_peak = sum(self._bytes(k) for k in self.maps)

    # ---------------------------------------------------------------- planning
    def _bytes(self, name) -> int:
        return math.prod(self.shapes[name]) * torch.empty((), dtype=self.dtypes.get(name, self.dtype)).element_size()

    def tile_area(self, seg) -> float:
        """Output pixels per tile of a segment: budget / max over its stages of
        channels x cost x 4^(level(out) - level(stage)) (conv input elements per output pixel)."""
        lv = seg[-1].level
        per_px = max(s.channels * s.cost * 4.0 ** (lv - s.level) for s in seg)
        return max(1.0, self.budget / per_px)

    def grid(self, seg):
        _, _, h, w = self.shapes[seg[-1].output]
        return tile_grid(h, w, self.tile_area(seg))

    # ---------------------------------------------------------------- running
    def input_level(self, name) -> int:
        """Resolution level of a map: its producer's, or for an input map its first consumer's
        input level (one finer than a downsampler's output, one coarser than an upsampler's)."""
        if name in self.level:
            return self.level[name]
        s = next(s for s in self.stages if name in s.inputs)
        return s.level - (1 if s.kind in ("down", "pool") else -1 if s.kind == "up" else 0)

    def run(self, segments, before_chain=None) -> dict:
        """Runs the segments in order (a segment of several stages is a chain, after
        ``before_chain(segment)``), freeing every host map after its last consumer."""
        last = {}
        for i, seg in enumerate(segments):
            for s in seg:
                for m in s.inputs:
                    last[m] = i
        for i, seg in enumerate(segments):
            if seg[0].kind == "attention":
                self._attention(seg[0])
            else:
                if len(seg) > 1 and before_chain is not None:
                    before_chain(seg)
                self._chain(seg)
            for m in [m for m, j in last.items() if j == i and m in self.maps]:
                self.host_bytes -= self._bytes(m)
                del self.maps[m]
        return self.maps

    def _check(self):
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()
        self.tiles_run += 1
        if self.pbar is not None:
            self.pbar.update(1)

    def _new_map(self, name):
        self.host_bytes += self._bytes(name)
        self.host_peak = max(self.host_peak, self.host_bytes)
        return torch.empty(self.shapes[name], dtype=self.dtypes.get(name, self.dtype), device=self.store)

    def _store(self, name, out, rect, tile):
        y0, y1, x0, x1 = rect
        out[:, :, y0:y1, x0:x1].copy_(tile)
        if name in self.groups and name not in self.fixed:
            self.stats.setdefault(name, Moments()).add(*group_moments(tile, self.groups[name]))

    def _in_rect(self, s, rect):
        _, _, h, w = self.shapes[s.inputs[0]]
        if self.variant is not None and self.variant.no_halo and s.kind == "same":
            return rect
        return (*s.input_range(rect[0], rect[1], h), *s.input_range(rect[2], rect[3], w))

    def _fetch(self, name, rect, local):
        y0, y1, x0, x1 = rect
        if name in local:
            t, (oy, ox) = local[name]
            return t[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return self.maps[name][:, :, y0:y1, x0:x1].to(self.device)

    def _normed(self, s, x):
        if s.norm is None:
            return None
        if self.variant is not None and self.variant.per_tile_norm:
            n, mean, m2 = group_moments(x, s.norm.num_groups)
            w, b = norm_affine(s.norm, x.device)
            return apply_norm(x, norm_coefficients(mean, m2 / n, s.norm.eps, w, b, x.shape[1], x.device), s.act)
        if s.name not in self.coeffs:
            m = s.inputs[0]
            mean, var = self.stats[m].mean_var() if m in self.stats else self.fixed[m]
            w, b = norm_affine(s.norm, self.device)
            self.coeffs[s.name] = norm_coefficients(mean, var, s.norm.eps, w, b, x.shape[1], self.device)
        return apply_norm(x, self.coeffs[s.name], s.act)

    def _chain(self, seg):
        name = seg[-1].output
        out = self._new_map(name)
        for rect in self.grid(seg):
            self._check()
            self._store(name, out, rect, self.run_tile(seg, rect))
        self.maps[name] = out

    def run_tile(self, seg, rect) -> torch.Tensor:
        """The segment's final output on ``rect``: input ranges found backwards (the hull over a
        map's consumers), then the stages run forwards, each result cropped to what is needed."""
        produced = {s.output for s in seg}
        need = {seg[-1].output: rect}
        for s in reversed(seg):
            r = self._in_rect(s, need[s.output])
            for m in s.inputs:
                if m in produced:
                    need[m] = _hull(need.get(m), r)
        last = {m: i for i, s in enumerate(seg) for m in s.inputs}
        local = {}
        for i, s in enumerate(seg):
            r = self._in_rect(s, need[s.output])
            ins = [self._fetch(m, r, local) for m in s.inputs]
            y = s.fn(ins, self._normed(s, ins[0]))
            oy, ox = s.out_origin(r[0]), s.out_origin(r[2])
            ny0, ny1, nx0, nx1 = need[s.output]
            local[s.output] = (y[:, :, ny0 - oy:ny1 - oy, nx0 - ox:nx1 - ox], (ny0, nx0))
            for m in s.inputs:
                if last[m] == i:
                    local.pop(m, None)
        return local[seg[-1].output][0]

    def _attention(self, s):
        """out = x + proj_out(softmax(q k^T / sqrt(C)) v) with k, v of the whole map (computed tile
        by tile into [B, H*W, C] buffers on the device) and q per tile."""
        import comfy.ops
        sdpa = getattr(comfy.ops, "scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention)
        blk, name = s.attn, s.output
        b, c, h, w = self.shapes[s.inputs[0]]
        k_all = torch.empty((b, h, w, c), dtype=self.dtype, device=self.device)
        v_all = torch.empty_like(k_all)
        tiles = tile_grid(h, w, self.budget / max(1, s.channels))
        for y0, y1, x0, x1 in tiles:
            self._check()
            n = self._normed(s, self._fetch(s.inputs[0], (y0, y1, x0, x1), {}))
            k_all[:, y0:y1, x0:x1] = blk.k(n).permute(0, 2, 3, 1)
            v_all[:, y0:y1, x0:x1] = blk.v(n).permute(0, 2, 3, 1)
        k_all, v_all = k_all.view(b, 1, h * w, c), v_all.view(b, 1, h * w, c)
        chunk = max(256, (1 << 26) // max(1, h * w))
        out = self._new_map(name)
        for rect in tiles:
            self._check()
            y0, y1, x0, x1 = rect
            x = self._fetch(s.inputs[0], rect, {})
            q = blk.q(self._normed(s, x)).permute(0, 2, 3, 1).reshape(b, 1, -1, c)
            o = torch.cat([sdpa(qc, k_all, v_all, attn_mask=None, dropout_p=0.0, is_causal=False)
                           for qc in q.split(chunk, dim=2)], dim=2)
            o = o.reshape(b, y1 - y0, x1 - x0, c).permute(0, 3, 1, 2)
            self._store(name, out, rect, x + blk.proj_out(o))
        self.maps[name] = out

    def plan_host_peak(self, segments) -> int:
        """Peak bytes of whole maps on the host while ``run(segments)`` runs (the same allocation
        and freeing order, simulated): the inputs, every segment's output, freed after its last use."""
        last = {m: i for i, seg in enumerate(segments) for s in seg for m in s.inputs}
        live = set(self.maps)
        cur = peak = sum(self._bytes(m) for m in live)
        for i, seg in enumerate(segments):
            live.add(seg[-1].output)
            cur += self._bytes(seg[-1].output)
            peak = max(peak, cur)
            for m in [m for m in live if last.get(m) == i]:
                live.discard(m)
                cur -= self._bytes(m)
        return peak

    def count_tiles(self, segments) -> int:
        """Tiles the segments will run (an attention stage runs its tiles twice)."""
        n = 0
        for seg in segments:
            g = len(self.grid(seg)) if seg[0].kind != "attention" else 2 * len(
                tile_grid(*self.shapes[seg[0].inputs[0]][2:], self.budget / max(1, seg[0].channels)))
            n += g
        return n
