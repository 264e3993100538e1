"""What a step evaluates and how the tile predictions go back into the canvas, vectorised.

An :class:`Evaluation` is a set of windows evaluated together (one step's active windows of a
plan, SpotDiffusion's shifted partition, a canvas plan clipped to an area): per window size, the
window ids and

* blended windows: their normalised weights  w_t / sum_{s in E} w_s  ([m, h, w] per size, built
  with one scatter-add per size over all windows: no loop over windows);
* written windows (SpotDiffusion): which pixels of each window are its core, written as they are.

Per tile batch, :func:`gather` cuts the k windows out of the canvas in one indexed read and
:func:`blend` / :func:`write_cores` put the k predictions back in one indexed write.  The scatter
is deterministic on every device: ``index_add_`` on the CPU, a sorted ``index_put_`` with
``accumulate=True`` elsewhere (CUDA's ``index_add_`` adds atomically, in no fixed order).

Pure tensor maths: no ComfyUI imports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tile_windows import WindowSet, batch_of, core_mask, positions

CHUNK = 1 << 22          # pixels per scatter while normalising (bounds the index tensors' memory)


def scatter_add_(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """target[..., index[j]] += values[..., j] (``target`` [R, P] or [P], ``values`` [R, J] or [J]),
    in a fixed order on every device."""
    if target.device.type == "cpu":
        return target.index_add_(target.ndim - 1, index, values)
    if target.ndim == 1:
        return target.index_put_((index,), values, accumulate=True)
    target.t().index_put_((index,), values.t(), accumulate=True)
    return target


@dataclass
class Group:
    """Windows of one size evaluated together: ids in their set, boxes / cores [m, 4] (CPU), their
    top-left corners [m, 2] on the device and their weights [m, h, w] on the device: normalised
    blend weights, or (``cores_only``) 1 on each window's core and 0 on its context."""
    size: tuple
    ids: torch.Tensor
    boxes: torch.Tensor
    cores: torch.Tensor
    starts: torch.Tensor
    weights: torch.Tensor | None = None
    cores_only: bool = False


class Evaluation:
    """The windows ``ids`` of ``windows`` evaluated in one step, grouped by size.

    ``raw`` {(h, w): weight [h, w] float32} blends them with weights normalised over the windows
    ``denominators`` (a list of id tensors, default ``[ids]``; with several, each group's weights are
    [R, m, h, w]: one set per cond chunk that normalises over its own windows); ``raw`` None writes
    each window's core as it is (the cores partition the canvas).  ``groups`` (precomputed) skips
    all of that.
    """

    def __init__(self, windows: WindowSet, ids: torch.Tensor, H: int, W: int, device, dtype, raw: dict | None,
                 denominators: list | None = None, groups: list | None = None, blended: bool = True):
        self.windows, self.ids, self.H, self.W = windows, ids, H, W
        self.device, self.dtype, self.raw = device, dtype, raw
        self.blended = raw is not None if groups is None else blended
        if groups is not None:
            self.groups = groups
            return
        self.groups = []
        for size, gid in windows.groups(ids):
            boxes = windows.boxes[gid]
            self.groups.append(Group(size, gid, boxes, windows.cores[gid], boxes[:, [0, 2]].to(device)))
        if raw is not None:
            self._normalise(raw, [ids] if denominators is None else denominators)
        else:
            for g in self.groups:
                g.weights = core_mask(g.boxes, g.cores, *g.size).to(device=device, dtype=dtype)
                g.cores_only = True

    def __len__(self) -> int:
        return int(self.ids.numel())

    def subset(self, ids: torch.Tensor, denominators: list | None = None) -> "Evaluation":
        """Some of these windows, with weights normalised over ``denominators`` (default: ``ids``)."""
        return Evaluation(self.windows, ids, self.H, self.W, self.device, self.dtype, self.raw, denominators)

    def _denominator(self, ids: torch.Tensor, raw: dict) -> torch.Tensor:
        """sum over the windows ``ids`` of their raw weights, per pixel: [H * W] float32."""
        denom = torch.zeros(self.H * self.W, device=self.device, dtype=torch.float32)
        for size, gid in self.windows.groups(ids):
            g = Group(size, gid, None, None, self.windows.boxes[gid][:, [0, 2]].to(self.device))
            for pos, wt in self._pieces(g, raw):
                scatter_add_(denom, pos.reshape(-1), wt.reshape(-1))
        return denom

    def _normalise(self, raw: dict, denominators: list):
        denoms = [self._denominator(d, raw) for d in denominators]
        for g in self.groups:
            sets = [torch.cat([wt / denom[pos] for pos, wt in self._pieces(g, raw)]).to(self.dtype)
                    for denom in denoms]
            g.weights = sets[0] if len(sets) == 1 else torch.stack(sets)

    def _pieces(self, g: Group, raw: dict):
        """(positions [j, h, w], raw weights [j, h, w]) for the windows of ``g``, in slices of at most
        :data:`CHUNK` pixels."""
        h, w = g.size
        wt = raw[g.size].to(self.device)
        step = max(1, CHUNK // max(1, h * w))
        for s in range(0, g.starts.shape[0], step):
            starts = g.starts[s:s + step]
            yield positions(starts, h, w, self.W, self.device), wt.expand(starts.shape[0], h, w)

    def batches(self, k_of):
        """(group, slice) of every tile batch: each size's windows in runs of ``k_of(size, count)``."""
        for g in self.groups:
            k = max(1, int(k_of(g.size, g.ids.numel())))
            for s in range(0, g.ids.numel(), k):
                yield g, slice(s, s + k)

    def windows_of(self, g: Group, sl: slice):
        """The batch's windows as a sequence of Window (made on demand) with their box tensors."""
        return batch_of(self.windows, g.ids[sl])

    @staticmethod
    def batch_weights(g: Group, sl: slice) -> torch.Tensor:
        """The batch's weights: [k, h, w], or [R, k, h, w] with one set per cond chunk."""
        return g.weights[sl] if g.weights.ndim == 3 else g.weights[:, sl]


# --------------------------------------------------------------------------- one tile batch

def gather(x: torch.Tensor, n_chunks: int, starts: torch.Tensor, h: int, w: int, pos=None) -> torch.Tensor:
    """The k windows of size h x w at ``starts`` [k, 2] (y0, x0; on x's device) of every row of
    ``x`` [N, ..., H, W] (N = n_chunks * B), chunk-major then window: [n_chunks * k * B, ..., h, w]
    (one indexed read; ``pos``: their :func:`positions`, if already at hand)."""
    H, W = x.shape[-2], x.shape[-1]
    k = starts.shape[0]
    pos = positions(starts, h, w, W, x.device).reshape(-1) if pos is None else pos.reshape(-1)
    lead = x.shape[:-2]
    B = lead[0] // n_chunks
    g = x.reshape(-1, H * W).index_select(1, pos).reshape(n_chunks, B, *lead[1:], k, h, w)
    return g.movedim(-3, 1).reshape(n_chunks * k * B, *lead[1:], h, w)


def blend(out: torch.Tensor, pred: torch.Tensor, n_chunks: int, starts: torch.Tensor, weights: torch.Tensor,
          cores_only: bool = False, pos=None):
    """out[..., window_j] += weights_j * pred_j for k windows at ``starts`` (``weights`` [k, h, w], or
    [n_chunks, k, h, w]: a set per cond chunk).

    ``cores_only``: the weights are 1 on each window's core and 0 elsewhere, and the prediction
    outside the core is dropped (never multiplied: a non-finite value there cannot leak in)."""
    k, h, w = weights.shape[-3:]
    H, W = out.shape[-2], out.shape[-1]
    pv = pred.reshape(n_chunks, k, pred.shape[0] // (n_chunks * k), *pred.shape[1:])
    wv = weights.reshape(-1, k, *([1] * (pv.ndim - 4)), h, w)
    if cores_only:
        vals = torch.where(wv > 0, pv, torch.zeros((), dtype=pv.dtype, device=pv.device))
    else:
        vals = pv * wv.to(pv.dtype)
    vals = vals.movedim(1, -3).reshape(-1, k * h * w)
    pos = positions(starts, h, w, W, out.device).reshape(-1) if pos is None else pos.reshape(-1)
    scatter_add_(out.view(-1, H * W), pos, vals.to(out.dtype))
