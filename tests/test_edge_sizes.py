"""Edge canvas sizes through ComfyUI's real KSampler (issue 6).

A canvas smaller than one tile, an 8x8 latent (64x64 px), a 1-latent-pixel strip left over after
two tiles, and more than 1,000 tiles.  In-process with the local fixture model (known receptive
radius), plus two of the sizes through a real server compared with the in-process result.
"""
import logging

import pytest
import torch

import qtd_fixtures as fx

METHODS = ["MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"]




@pytest.fixture(scope="module")
def local():
    return fx.local_model(0)


@pytest.fixture(scope="module")
def local_r2():
    """Receptive radius 2: an 8-latent-px window (64-px tile) has a 4-px interior free of its edges."""
    m = fx.local_model(0, num_layers=2)
    assert m.receptive_radius == 2
    return m


def conds():
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def source(w, h, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, h // 8, w // 8, generator=g) * 2.0


def tiled(pack, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_width=64, tile_height=64, tile_overlap=32, tile_batch_size=4), **kw})


def layout_of(pack, image, **kw):
    return fx.visualize(pack, image, **{**dict(min_denoise=1.0, max_denoise=1.0), **kw})[1]


def plan(pack, H, W, **kw):
    td = pack.tiled_diffusion
    cfg = td.TileConfig(**{**dict(tile_width=64, tile_height=64, tile_overlap=32), **kw})
    return td.plan_for(cfg, H=H, W=W, compression=8, align=1, device="cpu", dtype=torch.float32)


def assert_covered(p):
    """Every latent pixel is blended with total weight 1 (cores partition the canvas for SpotDiffusion)."""
    if p.spot:
        cover = torch.zeros(p.H, p.W, dtype=torch.int32)
        for w in p.windows:
            y0, y1, x0, x1 = w.core
            cover[y0:y1, x0:x1] += 1
        assert bool((cover == 1).all()), cover
    else:
        total = p.level_maps.sum(0)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5), (float(total.min()), float(total.max()))


# ----------------------------------------------------------------------------------- smaller than a tile

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("w, h", [(48, 40), (64, 64)], ids=["48x40px", "8x8latent"])
def test_canvas_within_one_tile_equals_untiled(pack, local, method, w, h):
    """The smallest tile (64 px) already covers the canvas: one window, the untiled result exactly."""
    pos, neg = conds()
    lat = source(w, h)
    assert len(plan(pack, h // 8, w // 8, method=method).windows) == 1
    ref = fx.run_ksampler(local, pos, neg, lat, steps=3, denoise=0.7)
    out = fx.run_ksampler(tiled(pack, local, method=method), pos, neg, lat, steps=3, denoise=0.7)
    assert torch.equal(out, ref)


def test_quadtree_of_image_smaller_than_min_tile_equals_untiled(pack, local):
    image = fx.synthetic_photo(48, 40, seed=1)
    lay = layout_of(pack, image, min_tile_size=128)
    assert [(t.x, t.y, t.w, t.h) for t in lay.tiles] == [(0, 0, 48, 40)]
    pos, neg = conds()
    lat = source(48, 40)
    ref = fx.run_ksampler(local, pos, neg, lat, steps=3, denoise=0.7)
    out = fx.run_ksampler(tiled(pack, local, quadtree=lay), pos, neg, lat, steps=3, denoise=0.7)
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------- 8x8 latent, 1-px tiles

@pytest.mark.parametrize("method", METHODS)
def test_8x8_latent_with_one_pixel_quadtree_tiles_covers_and_schedules_each(pack, local, method):
    """content_threshold 0 and min_tile_size 8 split a noisy 64x64 image into 64 tiles of one latent
    pixel: every pixel is still covered with weight 1, sampling stays finite and changes the latent, and
    (MultiDiffusion, Mixture of Diffusers) each one-pixel tile is evaluated exactly in the steps its own
    denoise makes it active."""
    noisy = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(0))
    lay = layout_of(pack, noisy, content_threshold=0.0, min_tile_size=8, min_denoise=0.4, max_denoise=0.9)
    assert len(lay.tiles) == 64 and {(t.w, t.h) for t in lay.tiles} == {(8, 8)}
    assert_covered(plan(pack, 8, 8, method=method, tile_overlap=16, layout=lay))
    pos, neg = conds()
    lat = source(64, 64)
    model, log = fx.logged(local)
    out = fx.run_ksampler(tiled(pack, model, method=method, tile_overlap=16, quadtree=lay), pos, neg, lat,
                          steps=3, denoise=0.7)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    assert not torch.equal(out, lat)
    if method != "SpotDiffusion":
        rows = sum(call.x.shape[0] // len(call.cou) for call in log.calls)
        assert rows == pack.variable_denoise.schedule_model_calls([t.denoise for t in lay.tiles], 3)


# ----------------------------------------------------------------------------------- 1-px leftover strip

@pytest.mark.parametrize("method", METHODS)
def test_one_pixel_strip_left_over_after_two_tiles_is_covered(pack, local_r2, method):
    """Latent width 17 = 2 tiles of 8 + 1.  Grid windows spread to cover it (no 1-px window);
    SpotDiffusion's 1-px column joins its neighbour (a 9-px cell; no tile below half a tile at any
    shift).  Mixture of Diffusers with an overlap wider than the model's receptive radius stays close
    to the untiled result; every method stays finite."""
    p = plan(pack, 16, 17, method=method)
    assert_covered(p)
    if method == "SpotDiffusion":
        assert sorted({w.core[3] - w.core[2] for w in p.windows}) == [8, 9], [w.core for w in p.windows]
        assert min(min(w.size) for o in range(8) for w in p.spot_windows(o, o)) >= 4
    else:
        assert {w.size for w in p.windows} == {(8, 8)} and max(w.x1 for w in p.windows) == 17
    pos, neg = conds()
    lat = source(136, 128)
    ref = fx.run_ksampler(local_r2, pos, neg, lat, steps=3, denoise=0.8)
    out = fx.run_ksampler(tiled(pack, local_r2, method=method), pos, neg, lat, steps=3, denoise=0.8)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    if method == "Mixture of Diffusers":
        err = float((out - ref).abs().max())
        assert err < 0.05 * float(ref.std()), (err, float(ref.std()))   # measured 0.09 / std 3.05


# ----------------------------------------------------------------------------------- > 1,000 tiles

def test_more_than_1000_tiles_warns_once_and_stays_close_to_untiled(pack, local_r2, caplog):
    """1056x1056 px with 64-px tiles and 32-px overlap: 32 x 32 = 1,024 windows.  The engine warns once
    per run (not once per model call) and, with the overlap wider than the model's radius, the blend of
    1,024 tiles stays close to the untiled result."""
    H = W = 1056 // 8
    p = plan(pack, H, W)
    assert len(p.windows) == 1024
    assert_covered(p)
    pos, neg = conds()
    lat = source(1056, 1056)
    ref = fx.run_ksampler(local_r2, pos, neg, lat, steps=2, denoise=0.8)
    with caplog.at_level(logging.INFO):
        out = fx.run_ksampler(tiled(pack, local_r2, tile_batch_size=64), pos, neg, lat, steps=2, denoise=0.8)
    warnings = [r for r in caplog.records if "sampling will be slow" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert "1024 tiles: sampling will be slow" in warnings[0].getMessage()
    assert "2 model calls" in caplog.text, caplog.text[-2000:]      # the warning was not repeated per call
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    std = float(ref.std())
    # measured: mean 0.064, max 0.61 for std 10.1 (2 steps, radius 2)
    assert float(err.mean()) < 0.02 * std and float(err.max()) < 0.15 * std, (float(err.mean()), float(err.max()), std)


# ----------------------------------------------------------------------------------- through the server

@pytest.mark.slow
@pytest.mark.parametrize("w, h", [(136, 128), (64, 64)], ids=["strip", "8x8latent"])
def test_edge_sizes_through_the_server_match_in_process(comfy_server, pack, local, w, h):
    import qtd_reliability as rl  # registered by conftest.py (tests/reliability.py)
    oi = comfy_server.object_info()
    kw = dict(method="Mixture of Diffusers", overlap=32, tile_width=64, tile_height=64, tile_batch_size=4,
              steps=3, cfg=5.0, seed=21, width=w, height=h, text=f"edge {w}x{h}", negative="blurry")
    entry, log = rl.run_with_log(comfy_server, rl.tiled_prompt(oi, **kw), 240)
    served = rl.saved_latent(comfy_server, entry)
    assert served.shape == (1, 4, h // 8, w // 8)
    assert any(f"grid on a {w // 8}x{h // 8} latent" in ln for ln in rl.engine_lines(log)), rl.engine_lines(log)
    pos, neg = fx.tiny_conditioning(kw["text"]), fx.tiny_conditioning("blurry")
    mine = fx.run_ksampler(tiled(pack, local, method=kw["method"], tile_overlap=32), pos, neg,
                           fx.empty_latent(w, h), seed=21, steps=3, cfg=5.0)
    assert torch.allclose(served, mine, atol=1e-4, rtol=1e-4), float((served - mine).abs().max())
