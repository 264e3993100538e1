"""Unit tests of the variable-denoise maths in variable_denoise.py (issue 4): pure functions, no model."""
import importlib
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

SETTINGS = dict(deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def vd(pack):
    return importlib.import_module(pack.__name__ + ".variable_denoise")


# --------------------------------------------------------------------------- scale mode

@pytest.mark.parametrize("d, p, expected, tol", [
    (0.2, 0.0, 0.75, 1e-12),
    (0.2, 0.5, 0.75 + 0.25 * 0.5 ** (1 / 1.2), 1e-12),   # = 0.8903...
    (0.2, 0.5, 0.89, 5e-3),
    (0.2, 1.0, 1.0, 1e-12),
    (0.8, 0.0, 0.90, 1e-12),
    (0.8, 0.5, 0.90 + 0.10 * 0.5 ** (1 / 1.8), 1e-12),
    (0.8, 1.0, 1.0, 1e-12),
    (0.0, 0.0, 0.70, 1e-12),
    (0.0, 0.25, 0.70 + 0.30 * 0.25, 1e-12),             # ramp 1: linear
    (1.0, 0.0, 1.0, 0.0),
    (1.0, 0.5, 1.0, 0.0),
    (1.0, 1.0, 1.0, 0.0),
])
def test_scale_alpha_values(vd, d, p, expected, tol):
    assert vd.scale_alpha(d, p) == pytest.approx(expected, abs=tol)


def test_scale_start_and_ramp(vd):
    assert vd.scale_start(0.2) == pytest.approx(0.75)
    assert vd.scale_start(0.8) == pytest.approx(0.90)
    assert vd.scale_ramp(0.2) == pytest.approx(1.2)
    assert vd.scale_ramp(0.8) == pytest.approx(1.8)


@settings(max_examples=200, **SETTINGS)
@given(d=st.floats(0.0, 1.0), p=st.floats(0.0, 1.0), q=st.floats(0.0, 1.0))
def test_scale_alpha_bounded_and_monotone_in_progress(vd, d, p, q):
    a, b = vd.scale_alpha(d, min(p, q)), vd.scale_alpha(d, max(p, q))
    start = 1.0 if d >= 1 else 0.70 + 0.25 * d
    assert start - 1e-12 <= a <= b + 1e-12 <= 1.0 + 2e-12
    assert vd.scale_alpha(d, 1.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- schedule mode

# round(d * n), half up, for the d values and step counts the issue names
ACTIVE = {
    1: {0: 0, 0.25: 0, 0.5: 1, 0.8: 1, 1: 1},
    2: {0: 0, 0.25: 1, 0.5: 1, 0.8: 2, 1: 2},
    20: {0: 0, 0.25: 5, 0.5: 10, 0.8: 16, 1: 20},
    37: {0: 0, 0.25: 9, 0.5: 19, 0.8: 30, 1: 37},
}


@pytest.mark.parametrize("n", sorted(ACTIVE))
@pytest.mark.parametrize("d", [0, 0.25, 0.5, 0.8, 1])
def test_activation_rule(vd, n, d):
    k = ACTIVE[n][d]
    assert vd.active_steps(d, n) == k
    assert vd.first_active_step(d, n) == n - k
    active = [i for i in range(n) if vd.is_active(d, i, n)]
    assert active == list(range(n - k, n)), "active steps must be the last round(d*n) steps"
    # tile_coefficients in schedule mode: (1, 1) while active, (0, 0) before
    for i in range(n):
        assert vd.tile_coefficients("schedule", d, False, i, n) == ((1.0, 1.0) if i in active else (0.0, 0.0))


@settings(max_examples=150, **SETTINGS)
@given(d=st.floats(0.0, 1.0), n=st.integers(1, 200))
def test_activation_is_a_suffix_of_round_dn_steps(vd, d, n):
    k = vd.active_steps(d, n)
    assert 0 <= k <= n and abs(k - d * n) <= 0.5 + 1e-9     # round(d * n)
    flags = [vd.is_active(d, i, n) for i in range(n)]
    assert sum(flags) == k
    assert flags == sorted(flags), "once active, a tile stays active"


@pytest.mark.parametrize("d, n", [(0.58, 25), (0.7, 45), (0.29, 50), (0.57, 50)])
def test_activation_rule_half_up_for_decimal_widget_values(vd, d, n):
    expected = math.floor(Fraction(str(d)) * n + Fraction(1, 2))
    assert vd.active_steps(d, n) == expected


def test_schedule_model_calls(vd):
    assert vd.schedule_model_calls([], 20) == 0
    assert vd.schedule_model_calls([0.0, 1.0, 0.5, 0.25, 0.8], 20) == 0 + 20 + 10 + 5 + 16
    assert vd.schedule_model_calls([0.5] * 7, 37) == 7 * 19
    assert vd.schedule_model_calls([1.0] * 3, 1) == 3


@settings(max_examples=60, **SETTINGS)
@given(ds=st.lists(st.floats(0.0, 1.0), max_size=12), n=st.integers(1, 60))
def test_schedule_model_calls_counts_active_tile_steps(vd, ds, n):
    counted = sum(1 for d in ds for i in range(n) if vd.tile_coefficients("schedule", d, False, i, n)[0] > 0)
    assert vd.schedule_model_calls(ds, n) == counted


# --------------------------------------------------------------------------- progress and steps

def test_progress(vd):
    assert vd.progress(0, 1) == 1.0
    assert vd.progress(0, 20) == 0.0
    assert vd.progress(19, 20) == 1.0
    assert vd.progress(5, 11) == pytest.approx(0.5)
    assert vd.progress(1, 2) == 1.0
    assert vd.progress(0, 2) == 0.0


def test_steps_of(vd):
    assert vd.steps_of([14.6, 0.0]) == 1
    assert vd.steps_of(torch.linspace(10, 0, 21)) == 20


def test_nearest_step_for_multi_evaluation_samplers(vd):
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]          # n = 5 steps
    for i, s in enumerate(sigmas[:-1]):
        assert vd.nearest_step(sigmas, s) == i           # the listed sigmas map to their index
    assert vd.nearest_step(sigmas, 6.0) == 1             # heun / dpmpp_2m_sde evaluate in between
    assert vd.nearest_step(sigmas, 2.2) == 2
    assert vd.nearest_step(sigmas, 0.6) == 4
    assert vd.nearest_step(sigmas, 0.01) == 4            # never the final sigma (there is no step 5)
    assert vd.nearest_step(sigmas, 100.0) == 0
    assert vd.nearest_step(torch.tensor(sigmas), 0.9) == 3


def test_tile_coefficients(vd):
    n = 11
    for i in range(n):
        p = i / (n - 1)
        assert vd.tile_coefficients("off", 0.3, False, i, n) == (1.0, 1.0)
        a, b = vd.tile_coefficients("scale", 0.3, False, i, n)
        assert a == 1.0 and b == pytest.approx(vd.scale_alpha(0.3, p))
        assert vd.tile_coefficients("scale", 1.0, False, i, n) == (1.0, 1.0)
        for mode in ("off", "scale", "schedule"):
            assert vd.tile_coefficients(mode, 0.7, True, i, n) == (0.0, 0.0)     # skipped: never evaluated
    assert vd.tile_coefficients("scale", 0.2, False, 5, 11)[1] == pytest.approx(0.75 + 0.25 * 0.5 ** (1 / 1.2))


# --------------------------------------------------------------------------- x0 space

def euler_step(x, x0, sigma, sigma_next):
    """ComfyUI's sample_euler: d = (x - x0) / sigma; x_next = x + d * (sigma_next - sigma)."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 0.89, 1.0])
@pytest.mark.parametrize("sigma, sigma_next", [(14.6, 9.7), (1.0, 0.5), (0.3, 0.0)])
def test_step_x0_makes_euler_take_alpha_times_the_full_step(vd, alpha, sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * sigma
    x0 = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    full = euler_step(x, x0, sigma, sigma_next) - x
    scaled = euler_step(x, vd.step_x0(x, x0, alpha), sigma, sigma_next) - x
    torch.testing.assert_close(scaled, alpha * full, rtol=1e-12, atol=1e-12)


def test_step_x0_does_not_multiply_x0(vd):
    # a prediction equal to the input means "no step": scaling the step must keep it so (alpha * x0
    # would drag the latent towards zero: grey, washed-out tiles)
    x = torch.full((1, 4, 3, 3), 2.5)
    assert torch.equal(vd.step_x0(x, x.clone(), 0.75), x)
    x0 = torch.zeros_like(x)
    torch.testing.assert_close(vd.step_x0(x, x0, 0.75), x * 0.25)     # x + 0.75 (0 - x)


def test_combine_x0_reductions(vd):
    g = torch.Generator().manual_seed(1)
    src, x, m = (torch.randn(1, 4, 6, 7, generator=g) for _ in range(3))
    one, zero = torch.ones(6, 7), torch.zeros(6, 7)
    torch.testing.assert_close(vd.combine_x0(src, x, m, one, one), m)          # all active, alpha 1
    torch.testing.assert_close(vd.combine_x0(src, x, m, zero, zero), src)      # nothing evaluated
    torch.testing.assert_close(vd.combine_x0(src, x, m, 1.0, 1.0), m)
    torch.testing.assert_close(vd.combine_x0(src, x, m, 0.0, 0.0), src)
    # all active at one alpha: the scaled step of the blend
    torch.testing.assert_close(vd.combine_x0(src, x, m, one, 0.8 * one), vd.step_x0(x, m, 0.8))
    # per pixel: left half inactive (source), right half active (model)
    a = torch.zeros(6, 7)
    a[:, 4:] = 1.0
    out = vd.combine_x0(src, x, m, a, a)
    torch.testing.assert_close(out[..., :4], src[..., :4])
    torch.testing.assert_close(out[..., 4:], m[..., 4:])


@settings(max_examples=40, **SETTINGS)
@given(w=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5), act=st.lists(st.booleans(), min_size=5, max_size=5),
       alphas=st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5), seed=st.integers(0, 1000))
def test_combine_x0_is_the_per_tile_blend(vd, w, act, alphas, seed):
    """One pixel covered by tiles t with normalised weights w_t (sum 1), all active tiles seeing the
    blend M: combine_x0 with A = sum_active w_t and beta = sum_active w_t alpha_t equals the weighted
    mean of the per-tile predictions (inactive: src; active: x + alpha_t (M - x))."""
    g = torch.Generator().manual_seed(seed)
    k = len(w)
    wt = torch.tensor(w, dtype=torch.float64)
    wt = wt / wt.sum()
    src, x, m = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3))
    active = torch.tensor(act[:k], dtype=torch.float64)
    alpha = torch.tensor(alphas[:k], dtype=torch.float64)
    A = (wt * active).sum()
    beta = (wt * active * alpha).sum()
    # per tile: active -> x + alpha (M - x); inactive -> src
    per_tile = torch.stack([vd.step_x0(x, m, float(alpha[j])) if act[j] else src for j in range(k)])
    expected = (wt[:, None] * per_tile).sum(0)
    torch.testing.assert_close(vd.combine_x0(src, x, m, A, beta), expected, rtol=1e-10, atol=1e-10)
