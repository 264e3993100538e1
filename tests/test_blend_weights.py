"""Blend weights, read back by construction through ComfyUI's real sampler (issue 25, item 2).

A stand-in model (``fx.logged(model, answer=...)``: the one model-call recorder, answering instead of
the model) predicts, for every tile it is given, x0 = (1, v_t, 0, 0): a constant value v_t that names
the tile's window.  The canvas is a position latent, so each tile's input says where its window lies
(``fx.window_of``).  One euler step from sigma_max to 0 with no noise added (KSamplerAdvanced's
add_noise off) returns the blended x0 itself, so at every pixel p the output is

    sum_t w_t(p) v_t / sum_t w_t(p)     over the windows t covering p,

and channel 0 is the partition of unity.  The test computes that sum from the windows the model was
given and the weights the README states (MultiDiffusion: uniform; Mixture of Diffusers: per axis a
Gaussian of that axis's window side, std 0.1 of it, centred; SpotDiffusion: a partition, each pixel
exactly one tile's prediction) and compares.  Each test also computes the blend a plausible wrong
implementation gives (Gaussian MultiDiffusion, uniform Mixture of Diffusers, a Gaussian from the
other axis's side or from the smaller side, SpotDiffusion's windows averaged) and asserts the
output is far from it: the check can tell them apart.
"""
import pytest
import torch

import qtd_fixtures as fx

H, W = 24, 40                     # latent px: a 320 x 192 px canvas
TOL = 1e-4                        # float rounding of one euler step on inputs up to ~50
APART = 1e-2                      # how far a wrong variant's blend lies at least (measured: >= 0.03)


def value(y0, x0, h, w):
    """A value per window, spread over [0, 1)."""
    return ((y0 * 131 + x0 * 71 + h * 17 + w * 7) % 97) / 97.0


def gaussian(n, std_of=None):
    """exp(-(i - (n-1)/2)^2 / (2 (0.1 m)^2)), m = ``std_of`` or n: the README's per-axis weight."""
    i = torch.arange(n, dtype=torch.float64)
    s = 0.1 * (std_of or n)
    return torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * s * s))


WEIGHTS = {
    "uniform": lambda h, w: torch.ones(h, w, dtype=torch.float64),
    "gaussian per axis": lambda h, w: gaussian(h)[:, None] * gaussian(w)[None, :],
    "gaussian of the other axis": lambda h, w: gaussian(h, w)[:, None] * gaussian(w, h)[None, :],
    "gaussian of the smaller side": lambda h, w: gaussian(h, min(h, w))[:, None] * gaussian(w, min(h, w))[None, :],
}


def blend(windows, weight):
    """sum_t w_t v_t / sum_t w_t per pixel, for windows (y0, x0, h, w, v)."""
    num = torch.zeros(H, W, dtype=torch.float64)
    den = torch.zeros(H, W, dtype=torch.float64)
    for y0, x0, h, w, v in windows:
        wt = WEIGHTS[weight](h, w)
        num[y0:y0 + h, x0:x0 + w] += wt * v
        den[y0:y0 + h, x0:x0 + w] += wt
    assert bool((den > 0).all()), "a pixel no window covers"
    return (num / den).float()


def read_back(pack, **inputs):
    """(blended x0 [4, H, W] in the model's space, the windows the model was given (y0, x0, h, w, v))."""
    local = fx.local_model(0)
    fmt = local.model.latent_format
    canvas = fx.position_latent(4, H, W)
    seen = fx.position_latent(4, H, W)
    seen = fmt.process_in(seen)[0]            # what the model is given: the latent in the model's space
    windows = []

    def answer(call):
        rows = []
        for row in call.x:
            h, w = row.shape[-2:]
            y0, x0 = fx.window_of(row, seen)
            assert torch.allclose(row, seen[:, y0:y0 + h, x0:x0 + w], atol=1e-5), "not a crop of the canvas"
            v = value(y0, x0, h, w)
            windows.append((y0, x0, h, w, v))
            rows.append(torch.stack([torch.ones(h, w), torch.full((h, w), v), torch.zeros(h, w), torch.zeros(h, w)]))
        return torch.stack(rows).to(call.x)

    model, log = fx.logged(local, answer)
    spot_inputs = inputs.pop("spot", None)
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=model, tile_batch_size=3, **inputs)
    (tm,) = fx.call_node(pack.nodes.QuadtreeDiffusion, **args)
    if spot_inputs:
        tm = spot(pack, tm, **spot_inputs)
    import nodes as comfy_nodes
    pos, neg = fx.tiny_conditioning("a"), fx.tiny_conditioning("b")
    (out,) = comfy_nodes.common_ksampler(tm, 0, 1, 1.0, "euler", "normal", pos, neg, {"samples": canvas},
                                         disable_noise=True, start_step=0, last_step=1, force_full_denoise=True)
    assert log.calls and all(len(c.cou) == 1 for c in log.calls)      # CFG 1: the positive prompt only
    return fmt.process_in(out["samples"])[0], windows


def assert_blend(out, windows, right, wrong):
    assert float((out[0] - 1).abs().max()) < TOL, "the weights do not sum to 1"
    err = float((out[1] - blend(windows, right)).abs().max())
    assert err < TOL, (right, err)
    for name in wrong:
        apart = float((out[1] - blend(windows, name)).abs().max())
        assert apart > APART, f"the output is also the blend of {name!r} ({apart}): the check cannot tell them apart"


GRID = dict(tile_width=256, tile_height=128, tile_overlap=64)           # 32 x 16 latent px windows, 8 px overlap


def test_multidiffusion_averages_uniformly(pack):
    out, windows = read_back(pack, method="MultiDiffusion", **GRID)
    assert len(windows) == 4 and {(h, w) for _, _, h, w, _ in windows} == {(16, 32)}
    assert_blend(out, windows, "uniform", ["gaussian per axis"])


def test_mixture_of_diffusers_uses_a_gaussian_per_axis_of_that_axis_side(pack):
    out, windows = read_back(pack, method="Mixture of Diffusers", **GRID)
    assert len(windows) == 4
    assert_blend(out, windows, "gaussian per axis", ["uniform", "gaussian of the other axis",
                                                     "gaussian of the smaller side"])


@pytest.fixture(scope="module")
def layout(pack):
    """A quadtree of 31 tiles of three sizes (160 x 96, 80 x 48, 40 x 24 px) on the 320 x 192 px canvas."""
    photo = fx.synthetic_photo(W * 8, H * 8, seed=1)
    (_, lay) = fx.visualize(pack, photo, min_tile_size=16, min_denoise=1.0, max_denoise=1.0, max_tile_size=160)
    assert len({(t.w, t.h) for t in lay.tiles}) == 3
    return lay


@pytest.mark.parametrize("method, right, wrong", [
    ("MultiDiffusion", "uniform", ["gaussian per axis"]),
    ("Mixture of Diffusers", "gaussian per axis", ["uniform", "gaussian of the other axis", "gaussian of the smaller side"]),
])
def test_quadtree_windows_of_every_size_blend_by_their_own_size(pack, layout, method, right, wrong):
    """Windows of several sizes (each tile grown by half the overlap, clipped at the canvas), some not
    square: each is weighted by its own sides."""
    out, windows = read_back(pack, method=method, quadtree=layout, tile_overlap=16, variable_denoise="off")
    assert len(windows) == len(layout.tiles)
    assert len({(h, w) for _, _, h, w, _ in windows}) >= 3 and any(h != w for _, _, h, w, _ in windows)
    assert_blend(out, windows, right, wrong)


def spot(pack, model, **inputs):
    return fx.call_node(pack.nodes.SpotDiffusionParams_QuadtreeDiffusion, model=model, **inputs)[0]


@pytest.mark.parametrize("case", ["grid", "grid, context margin", "quadtree"])
def test_spotdiffusion_takes_exactly_one_tile_per_pixel(pack, layout, case):
    """Each pixel is exactly one evaluated window's prediction (weights 0 or 1), taken from a
    rectangle (the tile's core) inside that window; the cores cover the canvas once.  With a context
    margin the windows overlap: the wrong variant, blending the overlapping windows, is far off."""
    inputs = dict(method="SpotDiffusion", tile_width=128, tile_height=128)
    if case == "quadtree":
        inputs.update(quadtree=layout, variable_denoise="off")
    if case == "grid, context margin":
        inputs.update(spot=dict(shift_method="random", seed=1, context_margin=16))
    out, windows = read_back(pack, **inputs)
    assert float((out[0] - 1).abs().max()) < TOL
    owner = torch.full((H, W), -1)
    for i, (y0, x0, h, w, v) in enumerate(windows):
        mine = (out[1] - v).abs() < TOL
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y0:y0 + h, x0:x0 + w] = True
        mine &= inside
        if mine.any():
            ys, xs = mine.nonzero(as_tuple=True)
            core = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
            assert bool(mine[core[0]:core[1], core[2]:core[3]].all()), "a tile's pixels are not a rectangle"
            assert bool((owner[mine] == -1).all()), "two tiles claim a pixel"
            owner[mine] = i
    assert bool((owner >= 0).all()), "a pixel no single tile's prediction explains (a blend of several)"
    cover = torch.zeros(H, W, dtype=torch.int32)
    for y0, x0, h, w, _ in windows:
        cover[y0:y0 + h, x0:x0 + w] += 1
    if case == "grid, context margin":
        assert int(cover.max()) > 1                        # the windows overlap ...
        assert float((out[1] - blend(windows, "uniform")).abs().max()) > APART     # ... and are not averaged
