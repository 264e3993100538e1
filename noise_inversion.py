"""Noise inversion through the tiled model: ascending sigmas (ComfyUI's FlipSigmas) and the
resampling run that starts from their result.

Inversion runs the sampler backwards, from the image (sigma ~ 0) up to noise: each step moves x
*away* from the model's x0 prediction, x_next = x + (x - x0) / sigma * (sigma_next - sigma).  The
tiled model needs nothing special for that (every call is a model call at the sampler's sigma), but
per-tile denoise does, and it mirrors the descending schedule:

* a tile of strength d is active in the **first** round(d * n) of the n ascending steps (scale
  mode: its step scale runs backwards too); once inactive its x0 is the source latent, which keeps
  it on the ray x = src + sigma * e (e: its inverted noise at the step it stopped), exactly the
  img2img noising path a descending run of the same tile follows until it becomes active;
* a skipped tile is never active: it stays the source latent.

The resampling run (descending sigmas, no added noise) starts from the inverted latent.  Its
per-tile denoise needs the *clean* source (an inactive tile's x0), which is not in that run: the
engine keeps the source and result of its last inversion and, when a run starts from that result
(the same values, no noise added), takes that run's source to be the inversion's.  A tile then
follows src + sigma * e down to the step where it becomes active, where it meets its inverted state
and is denoised from there: the inversion of each tile is undone at its own level.
"""
from __future__ import annotations

import torch


def ascending(sigmas) -> bool:
    """Whether a run's sigmas go up (an inversion, e.g. FlipSigmas): sigma_0 < sigma_last."""
    return len(sigmas) > 1 and float(sigmas[0]) < float(sigmas[-1])


def mirrored_step(step: int, n: int, sigmas) -> int:
    """The step of a descending run that an ascending run's step ``step`` mirrors: n - 1 - step
    (step index as variable denoise reads it; unchanged for descending sigmas)."""
    return n - 1 - step if ascending(sigmas) else step


class Inversions:
    """The source and result of the last inversion run of one engine (per canvas shape)."""

    def __init__(self):
        self._last: dict = {}

    def __deepcopy__(self, memo):
        return self

    def record(self, source: torch.Tensor | None, result: torch.Tensor | None):
        if source is None or result is None or source.shape != result.shape:
            return
        self._last = {tuple(result.shape): (result.detach(), source.detach())}

    def source_of(self, latent: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor | None:
        """The clean source of an inversion whose result ``latent`` is, when no noise is added to it;
        else None."""
        if latent is None or noise is None or bool(torch.count_nonzero(noise)):
            return None
        hit = self._last.get(tuple(latent.shape))
        if hit is None:
            return None
        result, source = hit
        result = result.to(latent)
        scale = float(result.abs().max()) or 1.0
        if not torch.allclose(result, latent, rtol=1e-4, atol=1e-5 * scale):
            return None
        return source.to(latent)
