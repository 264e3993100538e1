"""Noise inversion through the tiled model (issue 21): ComfyUI's FlipSigmas + SamplerCustom, then
resampling, with the local fixture model and ComfyUI's own custom-sampling nodes.

* the inversion (ascending sigmas) and the round trip run through the tiled model as through the
  untiled one (one tile: bit for bit; a grid: to float rounding of the tile blend);
* per-tile denoise mirrors under ascending sigmas: a tile of strength d is inverted in the first
  round(d n) steps (the reverse of the descending run's last round(d n)), d = 0 tiles stay the image;
* the resampling run that starts from the engine's last inversion takes the inverted image as its
  source, so per-tile denoise undoes each tile's inversion at its own level.
"""
import logging
from collections import Counter

import pytest
import torch

import qtd_fixtures as fx

STEPS = 8


@pytest.fixture(scope="module")
def ncs():
    import comfy_extras.nodes_custom_sampler as ncs
    if not hasattr(ncs, "FlipSigmas"):
        pytest.skip("this ComfyUI has no FlipSigmas node")
    return ncs


@pytest.fixture(scope="module")
def case():
    photo = fx.synthetic_photo(384, 256, seed=1)
    return photo, fx.FixtureVAE().encode(photo), fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def schedules(ncs, model):
    down = fx.call_node(ncs.BasicScheduler, model=model, scheduler="normal", steps=STEPS, denoise=1.0)[0]
    return fx.call_node(ncs.FlipSigmas, sigmas=down)[0], down


def sample(ncs, model, sigmas, latent, case):
    _, _, pos, neg = case
    sampler = fx.call_node(ncs.KSamplerSelect, sampler_name="euler")[0]
    out = fx.call_node(ncs.SamplerCustom, model=model, add_noise=False, noise_seed=0, cfg=1.0, positive=pos,
                       negative=neg, sampler=sampler, sigmas=sigmas, latent_image={"samples": latent})
    return out[0]["samples"]


def tiled(pack, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(tile_width=128, tile_height=128, tile_overlap=32, tile_batch_size=4, variable_denoise="off"),
        **kw})


def rel(a, b):
    return float((a - b).abs().mean() / b.std())


def test_inversion_and_round_trip_through_the_tiled_model(pack, ncs, case):
    _, src, _, _ = case
    model = fx.local_model(0)
    up, down = schedules(ncs, model)
    assert float(up[0]) < float(up[-1])
    inv = sample(ncs, model, up, src, case)
    back = sample(ncs, model, down, inv, case)
    one = tiled(pack, model, tile_width=384, tile_height=256)
    assert torch.equal(sample(ncs, one, up, src, case), inv)
    grid = tiled(pack, model)
    inv_t = sample(ncs, grid, up, src, case)
    back_t = sample(ncs, grid, down, inv_t, case)
    assert rel(inv_t, inv) < 1e-3 and rel(back_t, back) < 1e-3          # measured 3e-4 and 2e-4
    assert rel(inv, src) > 0.5                                         # it did invert


def interiors(layout, pred):
    return [(t.y // 8, (t.y + t.h) // 8, t.x // 8, (t.x + t.w) // 8) for t in layout.tiles if pred(t)]


def rows_per_step(log):
    """Tile rows the model was given, per sampler sigma."""
    out = Counter()
    for call in log.calls:
        out[round(float(call.t.reshape(-1)[0]), 4)] += call.x.shape[0]
    return out


def test_per_tile_denoise_mirrors_under_ascending_sigmas(pack, ncs, case, caplog):
    photo, src, _, _ = case
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=photo, content_threshold=25.0, min_tile_size=32,
                             min_denoise=0.0, max_denoise=1.0, line_thickness=1, max_tile_size=1024)
    assert {t.denoise for t in layout.tiles} == {0.0, 0.5, 1.0}
    zero = interiors(layout, lambda t: t.denoise == 0.0)
    changed = interiors(layout, lambda t: t.denoise > 0.0)
    assert zero and changed
    model, log = fx.logged(fx.local_model(0))
    m = tiled(pack, model, quadtree=layout, variable_denoise="schedule", tile_overlap=0)
    up, down = schedules(ncs, model)
    with caplog.at_level(logging.INFO):
        inv = sample(ncs, m, up, src, case)
        up_rows = rows_per_step(log)
        log.calls.clear()
        back = sample(ncs, m, down, inv, case)
        down_rows = rows_per_step(log)
    assert "noise inversion (ascending sigmas): each tile is inverted up to its own denoise" in caplog.text
    assert "resampling this model's last inversion" in caplog.text
    # a tile of strength d: the inversion's first round(d n) steps, the resampling's last round(d n)
    assert [up_rows[round(float(s), 4)] for s in up[:-1]] == [down_rows[round(float(s), 4)] for s in down[:-1]][::-1]
    assert up_rows[round(float(up[0]), 4)] > up_rows[round(float(up[-2]), 4)]
    for y0, y1, x0, x1 in zero:             # d = 0: the image, inverted or not
        torch.testing.assert_close(inv[..., y0:y1, x0:x1], src[..., y0:y1, x0:x1], atol=1e-5, rtol=0)
        torch.testing.assert_close(back[..., y0:y1, x0:x1], src[..., y0:y1, x0:x1], atol=1e-5, rtol=0)
    assert all(float((inv - src)[..., a:b, c:d].abs().mean()) > 1e-2 for a, b, c, d in changed)
    # each tile undone from its own level: closer to the image than a full inversion's round trip
    full = tiled(pack, fx.local_model(0), quadtree=layout, tile_overlap=0)
    back_full = sample(ncs, full, down, sample(ncs, full, up, src, case), case)
    assert rel(back, src) < rel(back_full, src)                  # measured 0.096 and 0.226


def test_a_run_from_another_latent_keeps_its_own_source(pack, ncs, case, caplog):
    """Only a run that starts from the engine's last inversion (no noise added) takes its source."""
    _, src, _, _ = case
    m = tiled(pack, fx.local_model(0))
    up, down = schedules(ncs, m)
    inv = sample(ncs, m, up, src, case)
    with caplog.at_level(logging.INFO):
        sample(ncs, m, down, inv + 0.01, case)
    assert "resampling this model's last inversion" not in caplog.text
