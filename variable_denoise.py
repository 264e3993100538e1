"""Per-tile denoise strength, in x0 space.  Pure functions; no ComfyUI imports.

ComfyUI's ``apply_model`` returns the denoised prediction x0 for every model family,
so a tile's strength is applied to x0, never to an eps or a velocity:

* ``scale``: the sampler's step is scaled by alpha:  x0' = x + alpha * (x0 - x).
  For Euler, x_next = x + (x - x0')/sigma * (sigma_next - sigma) is then exactly alpha
  times the full step.  (Multiplying x0 itself by alpha would drag the latent to zero.)
* ``schedule``: a tile with strength d is active only for the last round(d * n) of the
  n steps.  While inactive its x0 is the source latent, which keeps it exactly on the
  img2img noising path x = src + sigma * noise (or the flow equivalent).
* skip: a tile that is never active (x0 = source latent at every step).

Per pixel, with normalised layout weights w_t (sum_t w_t = 1), the evaluated set E of
tiles at this step and M their renormalised blend of model x0s:

    A    = sum_{t in E} w_t                  (activity)
    beta = sum_{t in E} w_t * alpha_t        (step scale)
    x0'  = src + A * (x - src) + beta * (M - x)

which reduces to x0' = M when every tile is active at alpha = 1.
"""
from __future__ import annotations

import math

MODES = ("schedule", "scale", "off")


def steps_of(sigmas) -> int:
    """n = len(sigmas) - 1: the number of sampler steps of a sigma schedule."""
    return max(1, len(sigmas) - 1)


def progress(i: int, n: int) -> float:
    """progress = i / (n - 1): 0 at the first step, 1 at the last (1.0 when n = 1)."""
    if n <= 1:
        return 1.0
    return min(1.0, max(0.0, i / (n - 1)))


def scale_start(d: float) -> float:
    """start = 0.70 + 0.25 d."""
    return 0.70 + 0.25 * d


def scale_ramp(d: float) -> float:
    """ramp = 1 + d."""
    return 1.0 + d


def scale_alpha(d: float, p: float) -> float:
    """alpha(d, p) = start + (1 - start) * p^(1/ramp); 1 for d >= 1 (full-strength tiles)."""
    if d >= 1.0:
        return 1.0
    start = scale_start(d)
    return start + (1.0 - start) * p ** (1.0 / scale_ramp(d))


def active_steps(d: float, n: int) -> int:
    """round(d * n) (half up): how many of the last steps a tile of strength d is active."""
    # round(d * n, 9) first: 0.58 * 25 is 14.4999... in binary floats, but the user typed 0.58
    return int(math.floor(round(d * n, 9) + 0.5))


def first_active_step(d: float, n: int) -> int:
    """The first step index i at which a tile of strength d is active: n - round(d * n)."""
    return n - active_steps(d, n)


def is_active(d: float, i: int, n: int) -> bool:
    """Schedule mode: the tile is active at step i iff i >= n - round(d * n)."""
    return i >= first_active_step(d, n)


def nearest_step(sigmas, sigma: float) -> int:
    """Index of the sigma in ``sigmas[:-1]`` nearest to ``sigma`` (multi-evaluation samplers
    call the model between the listed sigmas)."""
    candidates = list(sigmas[:-1]) or list(sigmas)
    return min(range(len(candidates)), key=lambda k: abs(float(candidates[k]) - sigma))


def tile_coefficients(mode: str, d: float, skipped: bool, i: int, n: int) -> tuple[float, float]:
    """(a, b) of one tile at step i: a = 1 if the model is evaluated for it, b = a * alpha.

    off: (1, 1); schedule: (1, 1) when active else (0, 0); scale: (1, alpha(d, progress));
    a skipped tile is (0, 0) in every mode.
    """
    if skipped:
        return 0.0, 0.0
    if mode == "schedule":
        a = 1.0 if is_active(d, i, n) else 0.0
        return a, a
    if mode == "scale":
        return 1.0, scale_alpha(d, progress(i, n))
    return 1.0, 1.0


def step_x0(x, x0, alpha):
    """x0' = x + alpha * (x0 - x): the prediction whose step is alpha times the full step."""
    return x + alpha * (x0 - x)


def combine_x0(src, x, blend, activity, beta):
    """x0' = src + A * (x - src) + beta * (M - x)  (see the module docstring)."""
    return src + activity * (x - src) + beta * (blend - x)


def schedule_model_calls(denoises, n: int) -> int:
    """Tile evaluations schedule mode makes over n steps: sum_t round(d_t * n)."""
    return sum(active_steps(d, n) for d in denoises)
