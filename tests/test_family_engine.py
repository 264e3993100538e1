"""What model families need from the engine (issue 12), each pinned by the family that needs it:

* Cosmos Predict2 / Anima name their patch ``patch_spatial``: 104x120-px tiles (13x15 latent px) are
  aligned to its 2x2 patch (0.3.75 raised "should be divisible by spatial_patch_size 2" on them);
* PixArt divides by zero in its positional embedding under ~33 latent px: small grid tiles and small
  quadtree tiles are enlarged (logged); SpotDiffusion, whose tiles cannot overlap, refuses them clearly;
* Stable Cascade stage B's ``effnet`` is spatial at another scale: each tile gets its crop of the effnet
  resampled to the canvas (the model's own resampling), not a rounded crop of the small prior;
* HiDream's per-layer Llama tokens [B, layers, tokens, dim] are never cropped, even when tokens x dim
  has the canvas's proportions;
* a family whose conditioning encodes the canvas's token layout is refused with a clear error, and so is
  the autoregressive video sampler (its KV cache holds the whole frame's tokens).
"""
import logging

import pytest
import torch

import qtd_families as fam

pytestmark = pytest.mark.usefixtures("single_thread")     # tiny models: see conftest


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(method="Mixture of Diffusers", tile_batch_size=4), **kw})


def cosmos_family():
    import comfy.supported_models as sm
    names = [m.__name__ for m in sm.models]
    return "Anima" if "Anima" in names else "CosmosT2IPredict2"


def test_cosmos_patch_spatial_aligns_odd_tiles(pack, fx):
    t = fam.tiny(cosmos_family())
    assert pack.utils.latent_patch_size(t.model.model) == 2
    m, log = fx.logged(t.model)
    lat = torch.randn(2, 16, 1, 26, 30, generator=torch.Generator().manual_seed(1))
    out = fx.run_ksampler(tiled(pack, fx, m, tile_width=104, tile_height=120, tile_overlap=24), t.positive,
                          t.negative, lat, steps=2, cfg=3.0, denoise=0.8)
    assert torch.isfinite(out).all() and out.shape == lat.shape
    sizes = {s[-2:] for s in log.shapes}
    assert sizes and all(h % 2 == 0 and w % 2 == 0 for h, w in sizes), sizes
    assert all(s[2] == 1 for s in log.shapes)


def test_pixart_small_tiles_enlarged_not_crashing(pack, fx, caplog):
    t = fam.tiny("PixArtSigma")
    mt = pack.model_families.min_tile(t.model.model)
    assert mt == 34                 # (h + w) / 2 must exceed 32 latent px; on the 2x2 patch grid
    m, log = fx.logged(t.model)
    lat = t.latent.repeat(2, 1, 1, 1)
    with caplog.at_level(logging.INFO):
        out = fx.run_ksampler(tiled(pack, fx, m, tile_width=128, tile_height=128, tile_overlap=32), t.positive,
                              t.negative, lat, steps=2, cfg=3.0, denoise=0.8)
    assert torch.isfinite(out).all()
    assert all(min(s[-2:]) >= mt for s in log.shapes)
    assert any("enlarged" in r.getMessage() and "no tile under" in r.getMessage() for r in caplog.records)
    # quadtree tiles of 4-8 latent px: evaluated in enlarged windows
    img = fx.synthetic_photo(512, 512, seed=1)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=10.0, min_tile_size=32,
                             min_denoise=1.0, max_denoise=1.0, line_thickness=0, max_tile_size=128)
    assert min(min(tt.w, tt.h) for tt in layout.tiles) < mt * 8
    log.calls.clear()
    out = fx.run_ksampler(tiled(pack, fx, m, quadtree=layout, tile_overlap=16), t.positive, t.negative, lat,
                          steps=1, cfg=3.0, denoise=0.8)
    assert torch.isfinite(out).all() and all(min(s[-2:]) >= mt for s in log.shapes)


def test_pixart_spot_quadtree_refused_clearly(pack, fx):
    td = pack.tiled_diffusion
    img = fx.synthetic_photo(512, 512, seed=1)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=10.0, min_tile_size=32,
                             min_denoise=1.0, max_denoise=1.0, line_thickness=0, max_tile_size=128)
    cfg = td.TileConfig(method="SpotDiffusion", layout=layout)
    with pytest.raises(ValueError, match="smaller than the 272px this model takes.*min_tile_size"):
        td.plan_for(cfg, H=64, W=64, compression=8, align=2, device="cpu", dtype=torch.float32, min_tile=34)


def test_cascade_b_effnet_cropped_after_canvas_resample(pack, fx):
    t = fam.tiny("Stable_Cascade_B")
    m, log = fx.logged(t.model)
    lat = t.latent.repeat(2, 1, 1, 1)
    out = fx.run_ksampler(tiled(pack, fx, m, tile_width=128, tile_height=128, tile_overlap=64), t.positive,
                          t.negative, lat, steps=1, cfg=3.0, denoise=0.8)
    assert torch.isfinite(out).all()
    prior = t.positive[0][1]["stable_cascade_prior"]
    canvas = torch.nn.functional.interpolate(prior, size=(16, 16), mode="bilinear", align_corners=True)
    seen = set()
    for call in log.calls:
        x, c = call.x, call.c
        eff = c["effnet"]
        h, w = x.shape[-2:]
        assert tuple(eff.shape[-2:]) == (h // 4, w // 4) and eff.shape[0] == x.shape[0]
        for r in range(eff.shape[0]):
            hits = [(y, xx) for y in range(0, 17 - h // 4) for xx in range(0, 17 - w // 4)
                    if torch.equal(eff[r], canvas[0, :, y:y + h // 4, xx:xx + w // 4])]
            assert hits, "an effnet tile is no crop of the canvas-resampled effnet"
            seen.update(hits)
    assert len(seen) > 1


def test_hidream_llama_tokens_never_cropped(pack, fx):
    """Llama tokens [B, 2 layers, 16 tokens, 16 dims] on a 16x16 latent: the shape of a canvas at scale 1."""
    import node_helpers
    t = fam.tiny("HiDream")
    # the tiny HiDream projects Llama features of width 48: give 16 tokens of width 48 on a 16 x 48 canvas
    llama = lambda s: torch.randn(1, 2, 16, 48, generator=torch.Generator().manual_seed(s))   # noqa: E731
    pos = node_helpers.conditioning_set_values(t.positive, {"conditioning_llama3": llama(1)})
    neg = node_helpers.conditioning_set_values(t.negative, {"conditioning_llama3": llama(2)})
    m, log = fx.logged(t.model)
    lat = torch.randn(1, 16, 16, 48, generator=torch.Generator().manual_seed(3))
    out = fx.run_ksampler(tiled(pack, fx, m, tile_width=128, tile_height=128, tile_overlap=32), pos, neg, lat,
                          steps=1, cfg=3.0, denoise=0.8)
    assert torch.isfinite(out).all()
    assert log.calls and all(call.c["encoder_hidden_states_llama3"].shape[-2:] == (16, 48) for call in log.calls)


def test_untileable_family_refused_clearly(pack):
    mf = pack.model_families

    class HiDreamO1Transformer(torch.nn.Module):
        pass

    class Base:
        diffusion_model = HiDreamO1Transformer()

    with pytest.raises(ValueError, match=r"cannot tile this model \(HiDreamO1Transformer\).*remove Quadtree Diffusion"):
        mf.check_tileable(Base())
    Base.diffusion_model = torch.nn.Identity()
    mf.check_tileable(Base())


def test_ar_video_sampler_refused_clearly(pack, fx):
    """Causal Wan with ComfyUI's ar_video sampler (where this ComfyUI has it): untiled it samples; tiled,
    the KV cache it carries in transformer_options is for the whole frame, so the engine refuses the run."""
    import comfy.k_diffusion.sampling as kds
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models as sm
    if not hasattr(kds, "sample_ar_video") or "WAN21_CausalAR_T2V" not in [m.__name__ for m in sm.models]:
        pytest.skip("this ComfyUI has no autoregressive video sampler")
    t = fam.tiny("WAN21_CausalAR_T2V")
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": 1})
    sigmas = comfy.samplers.calculate_sigmas(t.model.get_model_object("model_sampling"), "simple", 2)
    noise = torch.randn(t.latent.shape, generator=torch.Generator().manual_seed(4))
    out = comfy.sample.sample_custom(t.model, noise, 1.0, sampler, sigmas, t.positive, t.negative, t.latent, seed=1)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"cannot tile this run \(ar_state\).*use another sampler"):
        comfy.sample.sample_custom(tiled(pack, fx, t.model, tile_width=64, tile_height=64, tile_overlap=32), noise, 1.0,
                                   sampler, sigmas, t.positive, t.negative, t.latent, seed=1)

