"""Properties of the engine's Plan geometry (issues 3 and 6): windows, blend weights, level maps.

``plan_for(cfg, H, W, compression, align, device, dtype)`` is pure geometry (no model), so it is
checked over random canvases, tile sizes, overlaps, quadtree layouts and methods: every window
inside the canvas, normalised weights positive and summing to 1 at every latent pixel, the
variable-denoise level maps a partition of unity, windows of one core size of one window size.
"""
import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
METHODS = ["MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"]
C = 8   # latent compression (SD-style VAE)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def qt(pack):
    return importlib.import_module(pack.__name__ + ".quadtree")


@pytest.fixture(scope="module")
def tp(pack):
    return importlib.import_module(pack.__name__ + ".tile_plan")


def image(h, w, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.rand(h, w, 3, generator=g)
    if kind == "patch":
        img = torch.full((h, w, 3), 0.5)
        y0, x0 = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        img[y0:, x0:] = torch.rand(h - y0, w - x0, 3, generator=g)
        return img
    cell = int(torch.randint(8, 96, (1,), generator=g))
    small = torch.rand(-(-h // cell), -(-w // cell), 3, generator=g)
    return small.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:h, :w].contiguous()


def scatter(plan, values: dict):
    """Sum the per-window tensors of ``values`` back onto the canvas."""
    out = torch.zeros(plan.H, plan.W, dtype=torch.float64)
    for i, v in values.items():
        w = plan.windows[i]
        out[w.y0:w.y1, w.x0:w.x1] += v.to(torch.float64)
    return out


def check_plan(tp, qt, plan, cfg, H, W, align, dtype):
    """The invariants every plan must satisfy; returns the plan for further checks."""
    assert (plan.H, plan.W) == (H, W)
    assert len(plan.windows) >= 1
    layout_mode = cfg.layout is not None or cfg.method == "SpotDiffusion"
    cores_cov = torch.zeros(H, W, dtype=torch.int32)
    wins_cov = torch.zeros(H, W, dtype=torch.int32)
    size_of_core = {}
    for w in plan.windows:
        # every window inside the canvas, non-empty, containing its core
        assert 0 <= w.y0 < w.y1 <= H and 0 <= w.x0 < w.x1 <= W, (w, H, W)
        cy0, cy1, cx0, cx1 = w.core
        assert w.y0 <= cy0 < cy1 <= w.y1 and w.x0 <= cx0 < cx1 <= w.x1, w
        cores_cov[cy0:cy1, cx0:cx1] += 1
        wins_cov[w.y0:w.y1, w.x0:w.x1] += 1
        # windows of one core size have one window size (a window is shifted inside, never clipped)
        size_of_core.setdefault((cy1 - cy0, cx1 - cx0), set()).add(w.size)
        if plan.spot:
            assert (w.y0, w.y1, w.x0, w.x1) == w.core, "SpotDiffusion evaluates the cores as they are"
        # skip flag from the core's smaller side in pixels
        assert w.skipped == (cfg.skip_below > 0 and min(cy1 - cy0, cx1 - cx0) * C < cfg.skip_below), w
        assert plan.levels[w.level] == (w.denoise, w.skipped)
    assert all(len(s) == 1 for s in size_of_core.values()), size_of_core
    assert int(wins_cov.min()) >= 1, "a latent pixel is in no window"
    if layout_mode:
        assert int(cores_cov.min()) == 1 and int(cores_cov.max()) == 1, "the cores must partition the canvas"

    # normalised weights of the full evaluated set: positive, finite, summing to 1 at every pixel
    n = len(plan.windows)
    assert len(plan.weights) == n
    for i, w in enumerate(plan.windows):
        # raw weights stay float32 (a Gaussian corner weight underflows in float16); normalised ones are cast
        assert plan.weights[i].shape == w.size and plan.weights[i].dtype == torch.float32
    norm = plan.normalized(tuple(range(n)))
    assert sorted(norm) == list(range(n))
    for i, v in norm.items():
        assert v.shape == plan.windows[i].size and v.dtype == dtype
        # positive in float32/bfloat16; in float16 a weight below 6e-8 of a dominated window rounds to 0
        floor_ok = float(v.min()) >= 0.0 if dtype == torch.float16 else float(v.min()) > 0.0
        assert bool(torch.isfinite(v).all()) and floor_ok, (i, plan.windows[i])
    total = scatter(plan, norm)
    assert float((total - 1).abs().max()) <= TOL[dtype], float((total - 1).abs().max())

    # level maps: [levels, H, W], non-negative, summing to 1 at every pixel
    maps = plan.level_maps
    assert maps.shape == (len(plan.levels), H, W)
    assert float(maps.min()) >= 0.0
    assert float((maps.to(torch.float64).sum(0) - 1).abs().max()) <= TOL[dtype]
    if not plan.spot:   # each level's map is the sum of its windows' normalised weights
        for lvl in range(len(plan.levels)):
            own = scatter(plan, {i: v for i, v in norm.items() if plan.windows[i].level == lvl})
            assert torch.allclose(maps[lvl].to(torch.float64), own, atol=TOL[dtype])
    return plan


# --------------------------------------------------------------------------- properties

quadtrees = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["noise", "patch", "blocks"]), st.integers(0, 2**31 - 1),
              st.floats(0.0, 80.0), st.sampled_from([8, 16, 32, 64, 128]), st.sampled_from([64, 128, 256, 1024]),
              st.sampled_from([1, 2])),    # image scale: the layout's image is latent*8*k px
)


@settings(max_examples=60, **SETTINGS)
@given(H=st.integers(1, 40), W=st.integers(1, 40), method=st.sampled_from(METHODS),
       overlap=st.one_of(st.integers(0, 40).map(lambda k: 8 * k), st.integers(0, 400)),
       enable=st.booleans(), tw=st.integers(8, 400), th=st.integers(8, 400),
       skip=st.sampled_from([0, 0, 16, 64, 200]), align=st.sampled_from([1, 1, 2]),
       qtree=quadtrees, dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
def test_plan_properties(tp, qt, H, W, method, overlap, enable, tw, th, skip, align, qtree, dtype):
    layout = None
    if qtree is not None:
        kind, seed, thr, mn, mx, k = qtree
        layout = qt.build_quadtree(image(H * C * k, W * C * k, kind, seed), thr, mn, mx, 0.1, 0.9)
    cfg = tp.TileConfig(method=method, enable_overlap=enable, tile_overlap=overlap, tile_batch_size=4,
                        skip_below=skip, variable_denoise="schedule", tile_width=tw, tile_height=th, layout=layout)
    plan = tp.plan_for(cfg, H=H, W=W, compression=C, align=align, device="cpu", dtype=dtype)
    check_plan(tp, qt, plan, cfg, H, W, align, dtype)

    if layout is not None:   # the windows are the layout scaled to the latent, in order, with its denoise
        scaled = qt.scale_layout(layout, W, H, align)
        assert [w.core for w in plan.windows] == [(t.y, t.y + t.h, t.x, t.x + t.w) for t in scaled.tiles]
        assert [w.denoise for w in plan.windows] == [float(t.denoise) for t in scaled.tiles]
    else:
        assert all(w.denoise == 1.0 for w in plan.windows)
        # the tile in latent px, clamped to the canvas, at least one patch (align) where the canvas allows
        eth = max(max(1, min(H, th // C)), min(H, align))
        etw = max(max(1, min(W, tw // C)), min(W, align))
        eth, etw = tp.snap_tile(eth, H, align), tp.snap_tile(etw, W, align)   # on the model's patch grid
        if method == "SpotDiffusion":          # the non-overlapping grid partition, the last cell >= half a tile
            assert {(w.core[1] - w.core[0]) for w in plan.windows if w.core[1] < H} <= {eth}
            assert {(w.core[3] - w.core[2]) for w in plan.windows if w.core[3] < W} <= {etw}
            assert all(2 * (w.core[1] - w.core[0]) >= min(eth, H) and 2 * (w.core[3] - w.core[2]) >= min(etw, W)
                       for w in plan.windows)
            heights, widths = plan.partition.window_sizes()
            assert len(heights) <= 2 and len(widths) <= 2         # a run's windows: at most 4 shapes
            for oy in range(0, eth, align):      # every step's shifted partition: on the patch grid, a partition
                for ox in range(0, etw, align):
                    cover = torch.zeros(H, W, dtype=torch.int32)
                    for w in plan.spot_windows(oy, ox):
                        cy0, cy1, cx0, cx1 = w.core          # each core in a window of the run's sizes
                        assert 0 <= w.y0 <= cy0 < cy1 <= w.y1 <= H and 0 <= w.x0 <= cx0 < cx1 <= w.x1 <= W
                        assert w.size[0] in heights and w.size[1] in widths
                        assert cy0 % align == 0 and cx0 % align == 0
                        assert w.y0 % align == 0 or w.y1 == H
                        assert w.x0 % align == 0 or w.x1 == W
                        cover[cy0:cy1, cx0:cx1] += 1
                    assert bool((cover == 1).all())
        else:                                  # equal windows, the last row/column flush with the edge
            assert {w.size for w in plan.windows} == {(eth, etw)}
            assert max(w.y1 for w in plan.windows) == H and max(w.x1 for w in plan.windows) == W
            ov = overlap // C if enable else 0
            limit = min(eth, etw) // 2
            clamped = ov > limit
            assert any("clamp" in n for n in plan.notes) == clamped, (plan.notes, ov, limit)
            eff = min(ov, limit)
            ys = sorted({w.y0 for w in plan.windows})
            xs = sorted({w.x0 for w in plan.windows})
            for starts, size in ((ys, eth), (xs, etw)):
                for a, b in zip(starts, starts[1:]):
                    assert a + size - b >= eff, ("neighbours must share >= the overlap", starts, size, eff)


@pytest.mark.parametrize("method", [
    "MultiDiffusion",
    "SpotDiffusion",
    "Mixture of Diffusers",
])
def test_half_precision_plan(tp, qt, method):
    cfg = tp.TileConfig(method=method, tile_overlap=64, tile_width=256, tile_height=256)
    plan = tp.plan_for(cfg, H=48, W=40, compression=C, align=1, device="cpu", dtype=torch.float16)
    check_plan(tp, qt, plan, cfg, 48, 40, 1, torch.float16)


# --------------------------------------------------------------------------- grid examples

def grid_plan(tp, H, W, tile=1024, overlap=64, method="Mixture of Diffusers", tile_h=None, align=1, **kw):
    cfg = tp.TileConfig(method=method, tile_overlap=overlap, tile_width=tile, tile_height=tile_h or tile, **kw)
    return cfg, tp.plan_for(cfg, H=H, W=W, compression=C, align=align, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_tile_larger_than_canvas_is_clamped(tp, qt, method):
    cfg, plan = grid_plan(tp, 20, 30, tile=1024, overlap=512, method=method)
    check_plan(tp, qt, plan, cfg, 20, 30, 1, torch.float32)
    assert [(w.y0, w.y1, w.x0, w.x1) for w in plan.windows] == [(0, 20, 0, 30)]
    norm = plan.normalized((0,))
    assert torch.allclose(norm[0], torch.ones(20, 30))


def test_overlap_over_half_a_tile_is_clamped_and_noted(tp, qt):
    cfg, plan = grid_plan(tp, 40, 40, tile=128, overlap=200)     # 16-px latent tiles, 25-px overlap
    check_plan(tp, qt, plan, cfg, 40, 40, 1, torch.float32)
    assert any("clamp" in n and "200" in n for n in plan.notes), plan.notes
    xs = sorted({w.x0 for w in plan.windows})
    assert xs[0] == 0 and xs[-1] == 40 - 16
    assert len(xs) == math.ceil((40 - 16) / 8) + 1                  # stride = half a tile
    _, ok = grid_plan(tp, 40, 40, tile=128, overlap=64)
    assert not ok.notes


def test_overlap_clamped_in_quadtree_mode_is_noted(tp, qt):
    img = torch.full((256, 256, 3), 0.5)
    img[:128, :128] = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(0))
    layout = qt.build_quadtree(img, 10.0, 32, 1024, 0.2, 0.8)      # smallest side 32 px = 4 latent
    cfg = tp.TileConfig(method="Mixture of Diffusers", tile_overlap=512, layout=layout)
    plan = tp.plan_for(cfg, H=32, W=32, compression=C, align=1, device="cpu", dtype=torch.float32)
    check_plan(tp, qt, plan, cfg, 32, 32, 1, torch.float32)
    assert any("clamp" in n for n in plan.notes), plan.notes


def test_non_multiple_canvas(tp, qt):
    cfg, plan = grid_plan(tp, 37, 23, tile=64, overlap=16, method="MultiDiffusion")
    check_plan(tp, qt, plan, cfg, 37, 23, 1, torch.float32)
    assert {w.size for w in plan.windows} == {(8, 8)}
    assert max(w.y1 for w in plan.windows) == 37 and max(w.x1 for w in plan.windows) == 23


@pytest.mark.parametrize("method", METHODS)
def test_one_pixel_leftover_strip(tp, qt, method):
    cfg, plan = grid_plan(tp, 9, 17, tile=64, overlap=0, method=method)   # 8-px tiles on 17 x 9
    check_plan(tp, qt, plan, cfg, 9, 17, 1, torch.float32)
    if method == "SpotDiffusion":     # the 1-px strips join their neighbours (no sliver below half a tile)
        assert sorted({w.core for w in plan.windows}) == [(0, 9, 0, 8), (0, 9, 8, 17)]
    else:
        assert {w.size for w in plan.windows} == {(8, 8)}
        assert max(w.x1 for w in plan.windows) == 17


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quadtree", [False, True])
@pytest.mark.parametrize("align", [1, 2])
def test_one_latent_pixel_canvas(tp, qt, method, quadtree, align):
    layout = qt.build_quadtree(torch.rand(8, 8, 3), 0.0, 1, 1024, 0.2, 0.8) if quadtree else None
    cfg = tp.TileConfig(method=method, tile_overlap=64, tile_width=512, tile_height=512, layout=layout)
    plan = tp.plan_for(cfg, H=1, W=1, compression=C, align=align, device="cpu", dtype=torch.float32)
    check_plan(tp, qt, plan, cfg, 1, 1, align, torch.float32)
    assert [(w.y0, w.y1, w.x0, w.x1) for w in plan.windows] == [(0, 1, 0, 1)]


def test_aspect_mismatch_is_refused_naming_the_quadtree(tp, qt):
    layout = qt.build_quadtree(torch.full((256, 256, 3), 0.5), 25.0, 64, 1024, 0.2, 0.8)
    cfg = tp.TileConfig(layout=layout)
    with pytest.raises(ValueError, match="quadtree"):
        tp.plan_for(cfg, H=32, W=48, compression=C, align=1, device="cpu", dtype=torch.float32)
    # the same aspect at another size is scaled, not refused
    plan = tp.plan_for(cfg, H=48, W=48, compression=C, align=1, device="cpu", dtype=torch.float32)
    check_plan(tp, qt, plan, cfg, 48, 48, 1, torch.float32)


# --------------------------------------------------------------------------- more than 1,000 tiles

def test_more_than_1000_grid_tiles(tp, qt):
    cfg, plan = grid_plan(tp, 34, 33, tile=8, overlap=0, method="MultiDiffusion")
    assert len(plan.windows) == 34 * 33 > 1000
    check_plan(tp, qt, plan, cfg, 34, 33, 1, torch.float32)


def test_more_than_1000_quadtree_tiles(tp, qt):
    img = torch.rand(256, 288, 3, generator=torch.Generator().manual_seed(0))
    layout = qt.build_quadtree(img, 0.0, 8, 1024, 0.2, 0.8)
    assert len(layout.tiles) > 1000
    cfg = tp.TileConfig(method="Mixture of Diffusers", tile_overlap=64, layout=layout)
    plan = tp.plan_for(cfg, H=32, W=36, compression=C, align=1,
                       device="cpu", dtype=torch.float32)       # 1-latent-px cores, clamped margin
    assert len(plan.windows) == len(layout.tiles)
    check_plan(tp, qt, plan, cfg, 32, 36, 1, torch.float32)
