"""Model calls whose cond chunks evaluate different windows (regional prompts' boxes).

ComfyUI concatenates the conds of several prompts into one model call when their inputs have one
shape (``calc_cond_batch`` / ``can_concat_cond``): two area prompts of one size at different places
arrive in one call, each chunk on its own box.  Each box has its own windows (the canvas plan
clipped to it); windows of one size from every box go into one model call here, k per box, instead
of one set of calls per box.  Only where nothing in the call's model kwargs depends on the window
but x (:func:`batchable`); elsewhere each box keeps calls of its own.
"""
from __future__ import annotations

import torch

from . import model_families as mf
from . import tile_conditioning as tcond
from .tile_blend import blend, gather
from .tile_inputs import chunk_subset, map_tensors, tile_cond, tile_value


def batchable(run, c: dict, n_chunks: int, N: int) -> bool:
    """Whether chunks of one call may evaluate different windows in one model call: nothing in its
    model kwargs depends on the window but x (no spatial tensor, no deferred or attached control,
    no model patches, no tile prompts); otherwise each box is evaluated in calls of its own."""
    to = c.get("transformer_options", {})
    if c.get("control") is not None or to.get("patches") or tcond.chunk_prompts(run, to, n_chunks) is not None:
        return False
    spatial = []        # any image-like input (a hint, a concat latent, a reference image) may depend on the window
    map_tensors({k: v for k, v in c.items() if k != "transformer_options"},
                lambda v: spatial.append(torch.is_tensor(v) and v.ndim >= 4) or v)
    return not any(spatial)


class ChunkParts:
    """Mixed into ``tiled_diffusion.TiledDiffusion`` (its ``_batch_size``)."""

    def _evaluate_parts(self, model, x, t, c, cou, n_chunks, parts, run):
        """``_evaluate`` for a call whose chunks evaluate different windows (``parts``: (chunks, their
        Evaluation in the call's coordinates)): windows of one size from every part go into one model
        call, k per part (a part that runs out drops out of the later calls).  Only for calls whose
        model kwargs hold nothing per window but x (:func:`batchable`)."""
        import comfy.model_management as mm
        x = x.contiguous()
        N = x.shape[0]
        B = N // n_chunks
        H, W = int(x.shape[-2]), int(x.shape[-1])
        out = torch.zeros_like(x)
        sizes = list(dict.fromkeys(g.size for _, ev in parts for g in ev.groups))
        whole = mf.whole_keys(model.base)
        for size in sizes:
            streams = [(chunks, ev, g) for chunks, ev in parts for g in ev.groups if g.size == size]
            k = max(1, self._batch_size(run, model, x, n_chunks, size))
            pos = 0
            while True:
                live = [s for s in streams if s[2].ids.numel() > pos]
                if not live:
                    break
                mm.throw_exception_if_processing_interrupted()
                kk = min(k, min(g.ids.numel() - pos for _, _, g in live))
                sl = slice(pos, pos + kk)
                chunks = [j for ch, _, _ in live for j in ch]
                rows, tr, cr, coul = chunk_subset(x, t, c, cou, n_chunks, chunks)
                xt = torch.cat([gather(x[[j * B + b for j in ch for b in range(B)]], len(ch), g.starts[sl], *size)
                                for ch, _, g in live])
                wins = live[0][1].windows_of(live[0][2], sl)      # only its length is read: nothing is cropped
                ns = len(rows)
                tt = tile_value(tr, wins, len(chunks), ns, H, W, False) if tr.ndim > 0 and tr.shape[0] == ns else tr
                ct = tile_cond(cr, wins, len(chunks), ns, H, W, None, whole)
                pred = model(xt, tt, ct, coul)
                run.count_call(xt)
                r = 0
                for ch, ev, g in live:
                    for j in ch:
                        blend(out[j * B:(j + 1) * B], pred[r * kk * B:(r + 1) * kk * B], 1, g.starts[sl],
                              ev.batch_weights(g, sl), g.cores_only)
                        r += 1
                pos += kk
        return out
