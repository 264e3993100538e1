"""How the engine cuts a step into model calls: tiles per call, and SpotDiffusion's offsets per step.

Mixed into ``tiled_diffusion.TiledDiffusion`` (its ``cfg``):

* tiles per call: the node's ``tile_batch_size``, or (0, auto) as many tiles of one size as fit the
  free memory of the model's device, spread evenly over the fewest calls (one input shape where the
  count allows);
* SpotDiffusion's offsets: drawn once per run from the SpotDiffusion parameters, logged once.
"""
from __future__ import annotations

import logging

from . import spot_diffusion as sd
from .utils import P, SPOT_KEY

log = logging.getLogger(__name__)


class TileCalls:
    """Tile batch sizes and SpotDiffusion offsets of a run."""

    def _spot_offsets(self, run, plan, step: int, n: int, to, item: int = 0) -> tuple[int, int]:
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

    def _batch_size(self, run, model, x, n_chunks, size, n: int = 0) -> int:
        """Tiles per call for ``n`` windows of ``size``: the node's tile_batch_size, or (auto) what fits
        the device's free memory (cached per run, device and size), spread evenly over the calls."""
        k = self.cfg.tile_batch_size
        if k > 0:
            return k
        key = (str(x.device), size)
        if run is not None and key in run.batch:
            k = run.batch[key]
        else:
            k = auto_batch_size(model.base, x, n_chunks, size)
            if run is not None:
                run.batch[key] = k      # per device and window size: a quadtree's sizes differ up to 64x in area
        return even_batch(n, k) if n else k


AUTO_MAX_TILES = 4096        # auto tile batch: at most this many tiles per call (an upper bound, not a target)


def auto_batch_size(base, x, n_chunks: int, size) -> int:
    """Tiles per model call that fit the free memory of the model's device (tile_batch_size 0).

    k = floor(0.8 * free / (1.5 * memory_required(one tile with all its cond chunks))), 1..4096: a
    call is filled as far as memory allows (the engine then spreads a size's windows evenly over
    the fewest calls of at most k, :func:`even_batch`).
    """
    import comfy.model_management as mm
    try:
        shape = [x.shape[0], *x.shape[1:-2], *size]
        per_tile = base.memory_required(shape) * 1.5 if base is not None else 0
        free = mm.get_free_memory(x.device)
        if per_tile <= 0:
            return 8
        return int(max(1, min(AUTO_MAX_TILES, 0.8 * free // per_tile)))
    except Exception:
        return 4


def even_batch(n: int, k: int) -> int:
    """The batch of the fewest calls of at most k tiles for n windows, spread evenly: ceil(n / ceil(n / k))
    (100 windows at k = 64: two calls of 50, one input shape, instead of 64 + 36)."""
    return -(-n // -(-n // k)) if n > 0 else k


def _short(values, limit: int = 16) -> str:
    """A list for a log line: its first ``limit`` entries, then how many more."""
    head = ", ".join(str(v) for v in values[:limit])
    return f"[{head}{f', ... {len(values) - limit} more' if len(values) > limit else ''}]"
