"""Every current model family through the tile engine (issue 5): tiny real models built from
``comfy.supported_models`` configs with shrunk sizes, sampled with ComfyUI's real KSampler.

Choices pinned down here:

* SDXL: the ADM vector ``y`` (pooled text + size/crop embeddings) is repeated unchanged for every
  tile.  It is not re-encoded with the tile's own size/crop: SDXL's size conditioning describes the
  image being generated, and telling each tile it is a whole image of its own size (or a crop at
  its offset) would change what the model draws per tile and break seams; every tile keeps the
  conditioning of the canvas, as in untiled sampling.
* FLUX Fill-style ``c_concat`` (same size as the latent) is cropped per tile with the latent.
* Kontext-style ``ref_latents`` (a list of reference latents): a reference that covers the canvas
  (here the first, of the canvas's size) is cropped to each tile's box, one crop per tile row; one
  placed beside it (FLUX's default "offset" method, the second) goes whole to every tile row.  Where
  each tile meets the references is tested in test_reference_positions.py.
* 5-D latents [B, C, T, H, W] (Wan): tiled over H and W, T untouched.
* Patchifying models (SD3, FLUX, Wan: 2x2 patches): every tile window has even size and origin
  (except a window flush with an odd canvas edge), so the model never pads a tile.
"""
import pytest
import torch

W_PX, H_PX = 128, 96          # 16 x 12 latent


# --------------------------------------------------------------------------- tiny models

def _build(fx, config, cls, seed=0, **kw):
    import qtd_families
    config.set_inference_dtype(torch.float32, None)
    model = cls(config, device=torch.device("cpu"), **kw)
    qtd_families.seeded(model, seed)        # weights, and SD3's positional table (allocated empty)
    return fx._patcher(model)


def tiny_sdxl(fx):
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = fx.tiny_sd15_unet_config(64)
    cfg.update(adm_in_channels=64 + 6 * 256, use_linear_in_transformer=True, num_classes="sequential")
    config = sm.SDXL(cfg)
    config.unet_config.update(num_heads=2, num_head_channels=-1)
    return _build(fx, config, mb.SDXL, model_type=mb.ModelType.EPS)


def tiny_sd3(fx):
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
               pos_embed_max_size=32, num_patches=32 * 32, pos_embed_scaling_factor=None,
               x_block_self_attn_layers=[])
    return _build(fx, sm.SD3(cfg), mb.SD3)


def tiny_flux(fx, in_channels=16):
    """FLUX dev-style (guidance_embed); in_channels 96 = FLUX Fill (latent + image + 8x8 mask)."""
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = fx.tiny_flux_config(in_channels)
    config = (sm.FluxInpaint if in_channels > 16 else sm.Flux)(cfg)
    return _build(fx, config, mb.Flux)


def tiny_wan(fx):
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=77, in_dim=16, dim=32,
               ffn_dim=64, freq_dim=32, text_dim=64, out_dim=16, num_heads=2, num_layers=1)
    return _build(fx, sm.WAN21_T2V(cfg), mb.WAN21)


def set_values(conds, values):
    import node_helpers
    return node_helpers.conditioning_set_values(conds, values)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def family(fx, name, batch):
    """(model, positive, negative, latent) of one family."""
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    h, w = H_PX // 8, W_PX // 8
    if name == "sdxl":
        return tiny_sdxl(fx), pos, neg, torch.zeros(batch, 4, h, w)
    if name == "sd3":
        return tiny_sd3(fx), pos, neg, torch.zeros(batch, 16, h, w)
    if name == "flux":
        return tiny_flux(fx), set_values(pos, {"guidance": 2.5}), set_values(neg, {"guidance": 2.5}), \
            torch.zeros(batch, 16, h, w)
    if name == "flux_fill":
        extra = {"concat_latent_image": rand(batch, 16, h, w, seed=1),
                 "concat_mask": (rand(batch, 1, H_PX, W_PX, seed=2) > 0).float()}
        return tiny_flux(fx, 96), set_values(pos, extra), set_values(neg, extra), torch.zeros(batch, 16, h, w)
    if name == "kontext":
        refs = {"reference_latents": [rand(1, 16, h, w, seed=3), rand(1, 16, 6, 4, seed=4)]}
        return tiny_flux(fx), set_values(pos, refs), set_values(neg, refs), torch.zeros(batch, 16, h, w)
    if name == "wan":
        return tiny_wan(fx), pos, neg, torch.zeros(batch, 16, 3, h, w)
    raise ValueError(name)


FAMILIES = ["sdxl", "sd3", "flux", "flux_fill", "kontext", "wan"]


# --------------------------------------------------------------------------- helpers

def quadtree_layout(pack, fx):
    img = fx.synthetic_photo(W_PX, H_PX, seed=1)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=20.0, min_tile_size=32,
                             min_denoise=0.6, max_denoise=1.0, line_thickness=0, max_tile_size=64)
    return layout


def tiled(pack, fx, model, mode, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    if mode == "quadtree":
        kw = dict(quadtree=quadtree_layout(pack, fx), **kw)
    return fx.tiled(pack, model, **{**dict(tile_batch_size=4, tile_width=64, tile_height=64, tile_overlap=16), **kw})


# --------------------------------------------------------------------------- every family, both modes

@pytest.mark.parametrize("name", FAMILIES)
def test_family_tiled_sampling(pack, fx, name):
    """Grid and quadtree, batch 1 and 2: finite, right shape, the model only ever sees tiles."""
    for mode, batch in (("grid", 1), ("quadtree", 2)) if name != "flux" else \
            (("grid", 1), ("grid", 2), ("quadtree", 1), ("quadtree", 2)):
        model, pos, neg, lat = family(fx, name, batch)
        m, log = fx.logged(model)
        out = fx.run_ksampler(tiled(pack, fx, m, mode), pos, neg, lat, steps=2, cfg=3.0)
        assert out.shape == lat.shape and torch.isfinite(out).all(), (mode, batch)
        assert log.calls
        for call in log.calls:
            x, c = call.x, call.c
            assert x.shape[1:-2] == lat.shape[1:-2]                  # channels (and T) untouched
            assert x.shape[-2] < lat.shape[-2] or x.shape[-1] < lat.shape[-1]   # a tile, not the canvas
            assert x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0     # no padding by 2x2-patch models
            rows = x.shape[0]
            if name == "sdxl":
                assert c["y"].shape[0] == rows
            if name in ("flux", "flux_fill", "kontext"):
                assert c["guidance"].shape[0] == rows
            if name == "flux_fill":
                assert c["c_concat"].shape[0] == rows and c["c_concat"].shape[-2:] == x.shape[-2:]
            if name == "kontext":
                # the canvas-sized reference cropped to the tile, the one placed beside it whole
                assert [r.shape for r in c["ref_latents"]] == [(rows, 16, *x.shape[-2:]), (rows, 16, 6, 4)]


# --------------------------------------------------------------------------- exactness per family

@pytest.mark.parametrize("name", ["flux", "flux_fill", "kontext", "wan"])
def test_one_tile_equals_untiled(pack, fx, name):
    model, pos, neg, lat = family(fx, name, 2)
    lat = lat + rand(*lat.shape, seed=9)
    ref = fx.run_ksampler(model, pos, neg, lat, steps=2, cfg=3.0, denoise=0.8)
    out = fx.run_ksampler(tiled(pack, fx, model, "grid", tile_width=W_PX, tile_height=H_PX), pos, neg, lat,
                          steps=2, cfg=3.0, denoise=0.8)
    assert torch.equal(out, ref)


def _plan(pack, m, batch_item=0):
    engine = m.model_options["model_function_wrapper"]
    return pack.tiled_diffusion.plan_for(engine.cfg, H=H_PX // 8, W=W_PX // 8, compression=8, align=2,
                                         device="cpu", dtype=torch.float32,
                                         item=batch_item)


def test_conditioning_per_tile(pack, fx):
    """What each tile gets, compared with the canvas call: SDXL y and FLUX guidance repeated,
    FLUX Fill c_concat cropped to the tile, Kontext's canvas-sized reference cropped to the tile and
    the one beside it whole, chunk-major rows."""
    def canvas_and_tiles(name):
        model, pos, neg, lat = family(fx, name, 2)
        m, log = fx.logged(model)
        fx.run_ksampler(m, pos, neg, lat, steps=1, cfg=3.0)
        (full,) = log.calls
        log.calls.clear()
        mt = tiled(pack, fx, m, "grid", tile_batch_size=3)
        fx.run_ksampler(mt, pos, neg, lat, steps=1, cfg=3.0)
        return full, log.calls, _plan(pack, mt)

    for name in ("sdxl", "flux_fill", "kontext"):
        full, calls, plan = canvas_and_tiles(name)
        N = full.x.shape[0]                  # 2 chunks x 2 items
        seen = set()
        for call in calls:
            k = call.x.shape[0] // N
            x = call.x.reshape(2, k, 2, *call.x.shape[1:])
            for j in range(k):
                # which window is tile j: find it from the latent itself (x is the noisy canvas)
                wins = [w for w in plan.windows if w.size == x.shape[-2:]
                        and torch.equal(x[:, j], full.x.reshape(2, 2, *full.x.shape[1:])[..., w.y0:w.y1, w.x0:w.x1])]
                assert len(wins) >= 1
                w = wins[0]
                seen.add((w.y0, w.x0))
                for key, v in call.c.items():
                    if key in ("transformer_options", "control"):
                        continue
                    fv = full.c[key]
                    if key == "ref_latents":
                        for i, (a, b) in enumerate(zip(v, fv)):
                            b = b.reshape(2, 2, *b.shape[1:])
                            if i == 0:
                                b = b[..., w.y0:w.y1, w.x0:w.x1]
                            assert torch.equal(a.reshape(2, k, 2, *a.shape[1:])[:, j], b)
                        continue
                    if not torch.is_tensor(v) or v.shape[0] != call.x.shape[0]:
                        continue
                    vv = v.reshape(2, k, 2, *v.shape[1:])[:, j]
                    fvv = fv.reshape(2, 2, *fv.shape[1:])
                    if key == "c_concat":
                        fvv = fvv[..., w.y0:w.y1, w.x0:w.x1]
                    assert torch.equal(vv, fvv), (name, key)
        assert seen == {(w.y0, w.x0) for w in plan.windows}, name


# --------------------------------------------------------------------------- patch alignment

def _check_aligned(plan, a=2):
    for w in plan.windows:
        for lo, hi, n in ((w.y0, w.y1, plan.H), (w.x0, w.x1, plan.W)):
            # an odd size only for a window flush with an odd canvas edge (a partition's last cell);
            # an odd origin only for a window flush with the far edge
            assert (hi - lo) % a == 0 or (hi == n and n % a), (w, plan.H, plan.W)
            assert lo % a == 0 or hi == n, (w, plan.H, plan.W)


@pytest.mark.parametrize("H,W", [(12, 16), (25, 33), (41, 40), (64, 37)])
def test_patch_aligned_windows(pack, fx, H, W):
    td = pack.tiled_diffusion
    layout = quadtree_layout(pack, fx)
    for method in ("MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"):
        for tile_px, overlap_px in ((40, 24), (64, 16), (72, 8), (120, 40)):
            cfg = td.TileConfig(method=method, tile_overlap=overlap_px, tile_width=tile_px, tile_height=tile_px,
                                tile_batch_size=4)
            _check_aligned(td.plan_for(cfg, H=H, W=W, compression=8, align=2, device="cpu", dtype=torch.float32))
            cfg = td.TileConfig(method=method, tile_overlap=overlap_px, tile_batch_size=4, layout=layout)
            _check_aligned(td.plan_for(cfg, H=H, W=W, compression=8, align=2,
                                       device="cpu", dtype=torch.float32, check_aspect=False))


def test_flux_tiles_never_padded(pack, fx):
    """Odd tile sizes/overlaps in pixels (5 and 3 latent px) on an odd canvas: the FLUX model still
    only gets even-sized tiles, except one flush with the odd edge."""
    model, pos, neg, _ = family(fx, "flux", 1)
    lat = torch.zeros(1, 16, 11, 14)
    m, log = fx.logged(model)
    out = fx.run_ksampler(tiled(pack, fx, m, "grid", tile_width=40, tile_height=40, tile_overlap=24), pos, neg,
                          lat, steps=1, cfg=1.0)
    assert torch.isfinite(out).all()
    assert log.calls
    for call in log.calls:
        h, w = call.x.shape[-2:]
        assert (h % 2 == 0 or h == 11) and w % 2 == 0, (h, w)


@pytest.mark.parametrize("name", ["wan", "flux_fill"])
def test_spot_diffusion_tiles_are_the_shifted_partition(pack, fx, name):
    """SpotDiffusion on 2x2-patch models, 5-D (Wan) and with a c_concat (FLUX Fill), batch 2: every
    tile the model gets is a window of the step's shifted partition, found in the canvas latent
    itself (never rolled), on the patch grid, with T untouched and c_concat cropped alike; the
    windows are exactly the partition (each once)."""
    sd = pack.spot_diffusion
    model, pos, neg, lat = family(fx, name, 2)
    m, log = fx.logged(model)
    fx.run_ksampler(m, pos, neg, lat, steps=1, cfg=3.0)
    (full,) = log.calls
    log.calls.clear()
    mt = tiled(pack, fx, m, "grid", method="SpotDiffusion", tile_width=48, tile_height=40)
    fx.run_ksampler(mt, pos, neg, lat, steps=1, cfg=3.0)
    plan = _plan(pack, mt)
    ys, xs = sd.step_offsets(1, plan.periods, "random", 0, plan.align, sd.DEFAULT_SCHEDULE, plan.partition.rest())
    windows = plan.spot_windows(ys[0], xs[0])
    assert plan.periods == (4, 6) and len(windows) > 1
    N = full.x.shape[0]
    canvas = full.x.reshape(2, 2, *full.x.shape[1:])
    seen = []
    for call in log.calls:
        k = call.x.shape[0] // N
        x = call.x.reshape(2, k, 2, *call.x.shape[1:])
        assert x.shape[3:-2] == lat.shape[1:-2]                      # channels (and T) untouched
        for j in range(k):
            (w,) = [w for w in windows
                    if w.size == x.shape[-2:] and torch.equal(x[:, j], canvas[..., w.y0:w.y1, w.x0:w.x1])]
            assert w.y0 % 2 == 0 and w.x0 % 2 == 0 and w.size[0] % 2 == 0 and w.size[1] % 2 == 0
            seen.append(w)
            if name == "flux_fill":
                v, fv = call.c["c_concat"], full.c["c_concat"]
                vv = v.reshape(2, k, 2, *v.shape[1:])[:, j]
                assert torch.equal(vv, fv.reshape(2, 2, *fv.shape[1:])[..., w.y0:w.y1, w.x0:w.x1])
    assert sorted(seen, key=lambda w: w.core) == sorted(windows, key=lambda w: w.core)
