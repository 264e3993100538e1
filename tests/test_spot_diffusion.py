"""SpotDiffusion without wrap-around (issue 15): the partition moves, the latent never rolls.

* geometry (spot_diffusion.py, pure): at every offset a grid's shifted cells and a quadtree's
  shifted cores partition the canvas, stay on the patch grid, and no tile is a sliver;
* through ComfyUI's real KSampler with the local fixture model: the distance to the untiled
  sampler on issue 15's case for every shift method and seed, the pixels evaluated per step (a
  partition in the default mode), the context margin, per-tile denoise, area prompts.
"""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SHIFT_METHODS = ["random", "sorted", "fibonacci"]


@pytest.fixture(scope="module")
def sd(pack):
    return importlib.import_module(pack.__name__ + ".spot_diffusion")


@pytest.fixture(scope="module")
def qt(pack):
    return importlib.import_module(pack.__name__ + ".quadtree")


@pytest.fixture(scope="module")
def local(fx):
    return fx.local_model(0)


def coverage(H, W, rects):
    cover = torch.zeros(H, W, dtype=torch.int32)
    for y0, y1, x0, x1 in rects:
        cover[y0:y1, x0:x1] += 1
    return cover


def is_partition(H, W, rects) -> bool:
    return bool((coverage(H, W, rects) == 1).all())


# --------------------------------------------------------------------------- geometry

@settings(max_examples=80, **SETTINGS)
@given(L=st.integers(1, 90), t=st.integers(1, 40), align=st.sampled_from([1, 2]))
def test_grid_cuts_at_every_offset(sd, L, t, align):
    """Cuts {o + k t} minus those leaving an edge piece below half a tile: interior cells are t,
    edge cells in [t/2, 3t/2) (the whole axis, < 2t, when it is shorter than two tiles)."""
    t = max(align, t // align * align)
    for o in range(0, t, align):
        cuts = sd.grid_cuts(L, t, o)
        segs = sd.segments(cuts, L)
        assert segs[0][0] == 0 and segs[-1][1] == L
        assert all(a < b for a, b in segs) and all(c % align == 0 for c in cuts)
        assert all((c - o) % t == 0 for c in cuts)
        sizes = [b - a for a, b in segs]
        if t >= L:
            assert sizes == [L]
            continue
        assert all(s == t for s in sizes[1:-1])
        assert all(2 * s >= t for s in sizes), (L, t, o, sizes)        # no sliver
        if len(sizes) > 1:
            assert all(2 * s < 3 * t for s in (sizes[0], sizes[-1])), (L, t, o, sizes)
        else:
            assert L < 2 * t
        # a dropped cut would have left a sliver: every cut that is not kept lies within t/2 of an edge
        for c in range(o % t or t, L, t):
            assert (c in cuts) == (2 * c >= t and 2 * (L - c) >= t)


@settings(max_examples=40, **SETTINGS)
@given(H=st.integers(1, 48), W=st.integers(1, 48), th=st.integers(1, 30), tw=st.integers(1, 30),
       oy=st.integers(0, 29), ox=st.integers(0, 29), margin=st.integers(0, 6))
def test_grid_partition_and_margin_windows(sd, H, W, th, tw, oy, ox, margin):
    """Each core in a window of the run's fixed sizes (the tile, or the longest edge piece, plus the
    margin): at most two heights and two widths over every offset; ``exact`` windows are the cores
    grown by the margin."""
    part = sd.SpotPartition(H, W, 1, tile=(th, tw))
    boxes, cores = part.windows(oy % th, ox % tw, margin)
    assert is_partition(H, W, cores.tolist())
    mh, mw = part.max_window(margin)
    heights, widths = part.window_sizes(margin)
    assert len(heights) <= 2 and len(widths) <= 2
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in zip(boxes.tolist(), cores.tolist()):
        assert 0 <= y0 <= cy0 < cy1 <= y1 <= H and 0 <= x0 <= cx0 < cx1 <= x1 <= W
        assert y1 - y0 in heights and x1 - x0 in widths
        assert y1 - y0 <= mh and x1 - x0 <= mw
    exact, same = part.windows(oy % th, ox % tw, margin, exact=True)
    assert torch.equal(same, cores)
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in zip(exact.tolist(), cores.tolist()):
        assert y1 - y0 == min(H, cy1 - cy0 + 2 * margin) and x1 - x0 == min(W, cx1 - cx0 + 2 * margin)
    assert cores.shape[0] <= part.max_tiles()


def quadtree_cores(qt, H, W, seed, align):
    g = torch.Generator().manual_seed(seed)
    cell = int(torch.randint(8, 64, (1,), generator=g))
    img = torch.rand(-(-H * 8 // cell), -(-W * 8 // cell), 3, generator=g)
    img = img.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:H * 8, :W * 8].contiguous()
    layout = qt.scale_layout(qt.build_quadtree(img, 10.0, 16, 256, 0.2, 0.8), W, H, align)
    return [(t.y, t.y + t.h, t.x, t.x + t.w) for t in layout.tiles]


@settings(max_examples=30, **SETTINGS)
@given(H=st.integers(2, 48), W=st.integers(2, 48), seed=st.integers(0, 2**31 - 1), align=st.sampled_from([1, 2]))
def test_quadtree_partition_shifts_whole(sd, qt, H, W, seed, align):
    """A quadtree's internal edges move by d, |d| <= half the smallest core side: the same tiles
    (same order), a partition at every offset, interior tiles unchanged, edge tiles within 1/2..3/2."""
    cores = quadtree_cores(qt, H, W, seed, align)
    part = sd.SpotPartition(H, W, align, cores=cores)
    assert [tuple(c) for c in part.cores(*part.rest()).tolist()] == cores
    heights, widths = part.window_sizes()
    for oy in part.offset_range(0):
        for ox in part.offset_range(1):
            boxes, moved = part.windows(oy, ox)
            for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in zip(boxes.tolist(), moved.tolist()):
                assert y0 <= cy0 < cy1 <= y1 and x0 <= cx0 < cx1 <= x1 and y1 - y0 in heights and x1 - x0 in widths
            moved = [tuple(c) for c in moved.tolist()]
            assert len(moved) == len(cores) and is_partition(H, W, moved)
            for (a0, a1, b0, b1), (c0, c1, d0, d1) in zip(cores, moved):
                for lo, hi, nlo, nhi, L in ((a0, a1, c0, c1, H), (b0, b1, d0, d1, W)):
                    assert (nlo == 0) == (lo == 0) and (nhi == L) == (hi == L)    # canvas edges stay
                    assert nlo % align == 0 or nlo == 0
                    if 0 < lo and hi < L:
                        assert nhi - nlo == hi - lo
                    assert 2 * (nhi - nlo) >= hi - lo - align and 2 * (nhi - nlo) <= 3 * (hi - lo) + align


def test_offsets_schedules(sd):
    ys, xs = sd.step_offsets(8, (32, 48), "random", 5)
    assert ys == sd.spot_offsets(8, 32, "random", 5) and xs == sd.spot_offsets(8, 48, "random", 6)
    alt_y, alt_x = sd.step_offsets(8, (32, 48), "random", 5, schedule="alternate", rest=(1, 2))
    assert alt_y[::2] == ys[::2] and alt_y[1::2] == [1] * 4
    assert alt_x[1::2] == xs[1::2] and alt_x[::2] == [2] * 4
    assert sorted(sd.spot_offsets(8, 32, "random", 5)) == sd.spot_offsets(8, 32, "sorted", 5)
    with pytest.raises(ValueError, match="schedule"):
        sd.step_offsets(2, (4, 4), "random", 0, schedule="bogus")


# --------------------------------------------------------------------------- issue 15's case

CASE = dict(steps=8, cfg=4.0, sampler_name="euler", denoise=0.7)
CASE_H, CASE_W = 64, 96          # latent px; 256-px tiles = 32 latent px
# Issue 15 asks for <= 0.08 where its harness measured the wrap-around SpotDiffusion at 0.114-0.126.
# This harness (scripts/measure_spot_seams.py) measures that same old code at 0.0141-0.0154 and
# reproduces the other numbers in the same ratios (x 7.9-8.4), so 0.08 is about 0.0099 here.
# Every tile in a window of its own size (edge_windows "exact", the default until issue 21) measures
# 0.0063-0.0071 (seed 0: 0.0064); edge pieces in the run's fixed window sizes (now the default)
# 0.0023-0.0032.  The wrong variant, a partition that never moves, measures 0.0077 in both modes
# (test_tiles_that_never_move_are_worse): both bounds reject it (EXACT_BOUND was 0.0095, which did not).
BOUND = 0.0045
EXACT_BOUND = 0.0072


def case_latent():
    return torch.randn(1, 4, CASE_H, CASE_W, generator=torch.Generator().manual_seed(3)) * 2.0


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(method="SpotDiffusion", enable_overlap=False, tile_width=256, tile_height=256, tile_batch_size=8),
        **kw})


def spot(pack, fx, model, **kw):
    return fx.call_node(pack.nodes.SpotDiffusionParams_QuadtreeDiffusion, model=model, **kw)[0]


@pytest.fixture(scope="module")
def case(pack, fx, local):
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    lat = case_latent()
    ref = fx.run_ksampler(local, pos, neg, lat, **CASE)
    return pos, neg, lat, ref


def pixels_per_step(log) -> dict:
    """From a ``fx.CallLog`` set before Quadtree Diffusion: latent pixels evaluated per canvas row, summed
    per timestep."""
    out = {}
    for call in log.calls:
        t = round(float(call.t.reshape(-1)[0]), 4)
        out[t] = out.get(t, 0) + call.x.shape[0] // len(call.cou) * call.x.shape[-2] * call.x.shape[-1]
    return out


def step_pixels(plan, oy, ox, margin=0, exact=False):
    """Latent pixels of every window of one step's shifted partition."""
    b = plan.spot_set(oy, ox, margin, exact).boxes
    return int(((b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])).sum())


@pytest.mark.parametrize("method", SHIFT_METHODS)
def test_close_to_untiled_for_every_shift_seed(pack, fx, local, case, method, capsys):
    """mean |tiled - untiled| / std(untiled) <= BOUND for shift seeds 0-7; every step evaluates its
    partition's windows once (the pixels the plan states), in at most 4 window shapes per run
    (SpotDiffusion's fixed edge windows; each shape at most two batch sizes)."""
    pos, neg, lat, ref = case
    base, log = fx.logged(local)
    m = tiled(pack, fx, base)
    td = pack.tiled_diffusion
    plan = td.plan_for(td.TileConfig(method="SpotDiffusion", tile_width=256, tile_height=256), H=CASE_H, W=CASE_W,
                       compression=8, align=1, device="cpu", dtype=torch.float32)
    possible = {step_pixels(plan, oy, ox) for oy in range(32) for ox in range(32)}
    errs = []
    for seed in range(8):
        log.calls.clear()
        out = fx.run_ksampler(spot(pack, fx, m, shift_method=method, seed=seed), pos, neg, lat, **CASE)
        errs.append(float((out - ref).abs().mean()) / float(ref.std()))
        per_step = pixels_per_step(log)
        assert len(per_step) == CASE["steps"]
        assert set(per_step.values()) <= possible, per_step
        assert len({s[-2:] for s in log.shapes}) <= 4, log.shapes
    with capsys.disabled():
        print(f"\n[spot seams] {method}: " + " ".join(f"{e:.4f}" for e in errs))
    assert max(errs) <= BOUND, errs


def never_moving(pack, monkeypatch):
    """The wrong variant: the partition never moves (every step at the unshifted partition's offsets)."""
    sd = pack.spot_diffusion
    monkeypatch.setattr(sd, "step_offsets", lambda n, periods, method, seed, align=1, schedule=None, rest=(0, 0):
                        ([rest[0]] * n, [rest[1]] * n))


@pytest.mark.parametrize("edge_windows", ["fixed", "exact"])
def test_tiles_that_never_move_are_worse(pack, fx, local, case, edge_windows, monkeypatch, capsys):
    """The bounds above reject SpotDiffusion whose partition never moves (its seams stay in place)."""
    pos, neg, lat, ref = case
    never_moving(pack, monkeypatch)
    m = spot(pack, fx, tiled(pack, fx, local), shift_method="random", seed=0)
    m.model_options["transformer_options"][pack.utils.SPOT_KEY]["edge_windows"] = edge_windows
    err = float((fx.run_ksampler(m, pos, neg, lat, **CASE) - ref).abs().mean()) / float(ref.std())
    with capsys.disabled():
        print(f"\n[spot seams] never moving, {edge_windows} edge windows: {err:.4f}")
    assert err > (BOUND if edge_windows == "fixed" else EXACT_BOUND), err


def test_exact_edge_windows_partition_the_canvas(pack, fx, local, case):
    """edge_windows "exact": every tile in a window of its own size, so a step evaluates exactly the
    canvas's pixels (the fewest), at the seam error of that partition."""
    pos, neg, lat, ref = case
    base, log = fx.logged(local)
    m = spot(pack, fx, tiled(pack, fx, base), shift_method="random", seed=0)
    m.model_options["transformer_options"][pack.utils.SPOT_KEY]["edge_windows"] = "exact"
    out = fx.run_ksampler(m, pos, neg, lat, **CASE)
    assert set(pixels_per_step(log).values()) == {CASE_H * CASE_W}, pixels_per_step(log)
    err = float((out - ref).abs().mean()) / float(ref.std())
    assert err <= EXACT_BOUND, err
    assert len({s[-2:] for s in log.shapes}) > 4          # the edge tiles' shapes change with the shifts


def test_margin_at_the_receptive_field_equals_untiled(pack, fx, local, case):
    """A context margin as wide as the model's receptive field (3 latent px = 24 px) leaves no seam:
    the result is the untiled one; a step evaluates its windows, each grown by the margin."""
    pos, neg, lat, ref = case
    base, log = fx.logged(local)
    m = spot(pack, fx, tiled(pack, fx, base), shift_method="random", seed=1, context_margin=24)
    out = fx.run_ksampler(m, pos, neg, lat, **CASE)
    assert float((out - ref).abs().max()) < 1e-5      # float rounding only (convolutions of other sizes)
    td = pack.tiled_diffusion
    plan = td.plan_for(td.TileConfig(method="SpotDiffusion", tile_width=256, tile_height=256), H=CASE_H, W=CASE_W,
                       compression=8, align=1, device="cpu", dtype=torch.float32)
    possible = {step_pixels(plan, oy, ox, 3) for oy in range(32) for ox in range(32)}
    assert set(pixels_per_step(log).values()) <= possible
    half = spot(pack, fx, tiled(pack, fx, local), shift_method="random", seed=1, context_margin=8)
    none = spot(pack, fx, tiled(pack, fx, local), shift_method="random", seed=1)
    err = [float((fx.run_ksampler(mm, pos, neg, lat, **CASE) - ref).abs().mean()) for mm in (none, half)]
    # measured 0.0075 -> 0.0030 (0.40x); the margin ignored would be 1x
    assert err[1] < 0.45 * err[0], err


def test_memory_planning_sees_the_largest_shifted_window(pack, fx):
    td = pack.tiled_diffusion
    cfg = td.TileConfig(method="SpotDiffusion", tile_width=256, tile_height=256, tile_batch_size=2)
    engine = td.TiledDiffusion(cfg)
    h, w, n = engine._largest_tile(CASE_H, CASE_W, 8, 1)
    assert (h, w) == (47, 47) and n == 12      # edge tiles up to 3/2 of 32 - 1; 3 x 4 tiles at o = 16
    assert engine._largest_tile(CASE_H, CASE_W, 8, 1, margin=3)[:2] == (53, 53)
    plan = td.plan_for(cfg, H=CASE_H, W=CASE_W, compression=8, align=1, device="cpu", dtype=torch.float32)
    seen = {w.size for oy in range(32) for ox in range(32) for w in plan.spot_windows(oy, ox)}
    assert max(s[0] for s in seen) == 47 and max(s[1] for s in seen) == 47


# --------------------------------------------------------------------------- what SpotDiffusion keeps supporting

def test_quadtree_schedule_keeps_source_and_partitions(pack, fx, local):
    """A quadtree with per-tile denoise 0..1: d = 0 tiles stay the source exactly, inactive shifted
    tiles are not evaluated (each step evaluates fewer pixels than with every tile active), the
    result moves."""
    photo = fx.synthetic_photo(384, 256, seed=1)
    src = fx.FixtureVAE().encode(photo)
    _, layout = fx.visualize(pack, photo, min_tile_size=64, min_denoise=0.0, max_denoise=1.0)
    base, log = fx.logged(local)
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    m = spot(pack, fx, tiled(pack, fx, base, quadtree=layout), shift_method="fibonacci", seed=2)
    out = fx.run_ksampler(m, pos, neg, src, steps=6, denoise=0.9)
    zero = [t for t in layout.tiles if t.denoise == 0.0]
    assert zero
    for t in zero:
        sl = (..., slice(t.y // 8, (t.y + t.h) // 8), slice(t.x // 8, (t.x + t.w) // 8))
        assert torch.allclose(out[sl], src[sl], atol=1e-4)
    counted = pixels_per_step(log)
    log.calls.clear()
    m_off = spot(pack, fx, tiled(pack, fx, base, quadtree=layout, variable_denoise="off"), shift_method="fibonacci",
                 seed=2)
    fx.run_ksampler(m_off, pos, neg, src, steps=6, denoise=0.9)
    everything = pixels_per_step(log)
    assert counted and counted.keys() == everything.keys()
    assert all(counted[t] <= everything[t] for t in counted)
    assert sum(counted.values()) < sum(everything.values())
    assert float((out - src).abs().mean()) > 1e-2


def test_area_prompt_and_batch(pack, fx, local):
    """An area-conditioned prompt (tiled on its own grid) and a batch of two: finite, each item its own."""
    import nodes as comfy_nodes
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    area = comfy_nodes.ConditioningSetArea().append(fx.tiny_conditioning("a red barn"), 256, 192, 128, 64, 1.0)[0]
    both = comfy_nodes.ConditioningCombine().combine(pos, area)[0]
    lat = torch.randn(2, 4, 40, 64, generator=torch.Generator().manual_seed(4)) * 2.0
    m = spot(pack, fx, tiled(pack, fx, local), shift_method="sorted", seed=1)
    out = fx.run_ksampler(m, both, neg, lat, steps=3, denoise=0.8)
    plain = fx.run_ksampler(m, pos, neg, lat, steps=3, denoise=0.8)
    ref = fx.run_ksampler(local, both, neg, lat, steps=3, denoise=0.8)
    assert torch.isfinite(out).all() and float((out[0] - out[1]).abs().mean()) > 0.1
    assert float((out - plain)[..., 8:32, 16:48].abs().mean()) > 1e-3      # the area prompt acts
    assert float((out - ref).abs().mean()) < 0.02 * float(ref.std())
