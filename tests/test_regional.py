"""Regional prompts under tiling (issue 13), through ComfyUI's real KSampler and its own
ConditioningSetArea / ConditioningSetMask / ConditioningCombine nodes."""
import pytest
import torch

import qtd_fixtures as fx

W_PX, H_PX = 384, 256         # 48 x 32 latent


def core(name):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def regional(kind, base, region_prompt, box=(96, 64, 192, 160)):
    """``base`` combined with ``region_prompt`` restricted to the pixel box (x, y, w, h): an area, a
    mask set to its bounds (an area call too), or a plain mask (a canvas call with a weight map)."""
    x, y, w, h = box
    if kind == "area":
        (r,) = fx.call_node(core("ConditioningSetArea"), conditioning=region_prompt, width=w, height=h, x=x, y=y,
                            strength=1.0)
    else:
        mask = torch.zeros(1, H_PX, W_PX)
        mask[:, y:y + h, x:x + w] = 1.0
        (r,) = fx.call_node(core("ConditioningSetMask"), conditioning=region_prompt, mask=mask, strength=1.0,
                            set_cond_area="mask bounds" if kind == "mask_bounds" else "default")
    return fx.call_node(core("ConditioningCombine"), conditioning_1=base, conditioning_2=r)[0]


def tiled(pack, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_batch_size=4, method="Mixture of Diffusers", tile_overlap=64), **kw})


@pytest.fixture(scope="module")
def local():
    return fx.local_model(0)


@pytest.fixture(scope="module")
def photo():
    return fx.synthetic_photo(W_PX, H_PX, seed=1)      # flat sky on top, texture bottom right


@pytest.fixture(scope="module")
def source(photo):
    return fx.FixtureVAE().encode(photo)


@pytest.fixture(scope="module")
def prompts():
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("a red barn", tokens=154), \
        fx.tiny_conditioning("blurry")


def interiors(layout, pred):
    return [(t.y // 8, (t.y + t.h) // 8, t.x // 8, (t.x + t.w) // 8) for t in layout.tiles if pred(t)]


@pytest.mark.parametrize("kind", ["area", "mask_bounds", "mask"])
def test_zero_denoise_and_skipped_tiles_keep_the_source_under_a_regional_prompt(pack, local, photo, source,
                                                                                 prompts, kind):
    base, region, neg = prompts
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=photo, content_threshold=25.0, min_tile_size=32,
                             min_denoise=0.0, max_denoise=0.9, line_thickness=0, max_tile_size=128)
    sizes = sorted({t.min_side for t in layout.tiles})
    zero = interiors(layout, lambda t: t.denoise == 0.0)
    skip_below = sizes[1] if len(sizes) > 2 else 0         # the smallest tiles are skipped
    skipped = interiors(layout, lambda t: t.min_side < skip_below)
    pos = regional(kind, base, region, box=(0, 0, W_PX, H_PX // 2 + 64))   # over flat sky and texture alike
    out = fx.run_ksampler(tiled(pack, local, quadtree=layout, tile_overlap=0, skip_diffusion_below=skip_below),
                          pos, neg, source, steps=4, denoise=0.9)
    assert zero and skipped
    for y0, y1, x0, x1 in zero + skipped:
        torch.testing.assert_close(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-4, rtol=0)
    changed = interiors(layout, lambda t: t.denoise > 0.0 and t.min_side >= skip_below)
    assert changed and all(float((out - source)[..., a:b, c:d].abs().mean()) > 1e-2 for a, b, c, d in changed)


@pytest.mark.parametrize("kind", ["area", "mask_bounds", "mask"])
def test_one_tile_with_regional_prompts_equals_untiled(pack, local, source, prompts, kind):
    base, region, neg = prompts
    pos = regional(kind, base, region)
    ref = fx.run_ksampler(local, pos, neg, source, steps=3, denoise=0.8)
    out = fx.run_ksampler(tiled(pack, local, tile_width=W_PX, tile_height=H_PX), pos, neg, source, steps=3,
                          denoise=0.8)
    assert torch.equal(out, ref)
    assert not torch.allclose(ref, fx.run_ksampler(local, base, neg, source, steps=3, denoise=0.8), atol=1e-3)


def test_grid_with_regional_prompts_is_as_close_to_untiled_as_without(pack, local, source, prompts):
    """Mixture of Diffusers on a 2x2-ish grid: tiled vs untiled, mean |diff| / std <= 1e-3, with two
    regional prompts (an area and a mask set to its bounds) as without them."""
    base, region, neg = prompts
    pos = regional("mask_bounds", regional("area", base, region, box=(200, 40, 160, 120)), fx.tiny_conditioning("sea"),
                   box=(24, 128, 176, 112))
    m = tiled(pack, local, tile_width=256, tile_height=192, tile_overlap=64)
    for p in (base, pos):
        ref = fx.run_ksampler(local, p, neg, source, steps=3, denoise=0.8)
        out = fx.run_ksampler(m, p, neg, source, steps=3, denoise=0.8)
        assert float((out - ref).abs().mean() / ref.std()) <= 1e-3


def test_a_regional_prompt_costs_model_work_only_on_the_tiles_it_touches(pack, prompts, source):
    """The area prompt's context is evaluated on exactly the windows that intersect its area (clipped to
    it), never on the others, and no model call is canvas-sized."""
    base, region, neg = prompts
    model, log = fx.logged(fx.local_model(0))
    box = (16, 8, 64, 48)                                  # px: inside the top-left tile's window only
    m = tiled(pack, model, tile_width=192, tile_height=128, tile_overlap=32, variable_denoise="off")
    fx.run_ksampler(m, regional("area", base, region, box=box), neg, source, steps=2, denoise=0.8)
    ctx = region[0][0][0]
    with_region = [(tuple(call.x.shape[-2:]), n) for call in log.calls
                   for n in [sum(torch.equal(r[:77], ctx[:77]) for r in call.c["c_crossattn"])] if n]
    assert with_region and all(shape == (48 // 8, 64 // 8) for shape, _ in with_region)
    assert sum(n for _, n in with_region) == 2        # one window touches it, 2 steps
    assert max(s[-2] * s[-1] for s in log.shapes) < (H_PX // 8) * (W_PX // 8)


@pytest.mark.parametrize("method", ["Mixture of Diffusers", "SpotDiffusion"])
def test_a_mask_prompt_costs_model_work_only_on_the_tiles_its_mask_touches(pack, prompts, source, monkeypatch,
                                                                           method):
    """A plain mask prompt (a canvas call weighted by the mask) is evaluated only on the windows
    holding a pixel of its mask, and the result is the same as evaluating it on every window."""
    base, region, neg = prompts
    model, log = fx.logged(fx.local_model(0))
    box = (16, 8, 64, 48)                                  # px: inside the top-left tile only
    m = tiled(pack, model, tile_width=192, tile_height=128, tile_overlap=32, variable_denoise="off", method=method)
    pos = regional("mask", base, region, box=box)
    out = fx.run_ksampler(m, pos, neg, source, steps=2, denoise=0.8)
    ctx = region[0][0][0]

    def region_evaluations():
        return sum(int(torch.equal(r[:77], ctx[:77])) for call in log.calls for r in call.c["c_crossattn"])

    def all_evaluations():
        return sum(call.c["c_crossattn"].shape[0] for call in log.calls)

    touched, total = region_evaluations(), all_evaluations()
    assert touched == 2                                    # one window holds the mask, 2 steps
    log.calls.clear()
    monkeypatch.setattr(pack.regional, "chunk_masks", lambda *a, **k: None)     # every window, as before
    ref = fx.run_ksampler(m, pos, neg, source, steps=2, denoise=0.8)
    assert region_evaluations() > 2 * touched and all_evaluations() > total
    # the same up to float rounding: the mask prompt now shares model calls with fewer rows (the
    # model's kernels round differently by batch size, ~1e-5 per call here)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
    assert float((out - ref).abs().mean() / ref.std()) < 1e-6
    without = fx.run_ksampler(m, base, neg, source, steps=2, denoise=0.8)
    assert float((ref - without).abs().amax()) > 1e-2      # the mask prompt matters


@pytest.mark.parametrize("kind", ["area", "mask"])
def test_each_image_of_a_batch_keeps_its_zero_denoise_tiles_under_a_regional_prompt(pack, local, photo, prompts,
                                                                                     kind):
    """An IMAGE batch of two different images has a layout per image; under a regional prompt each
    latent item is tiled with its own layout, and its d = 0 tiles keep its own source."""
    base, region, neg = prompts
    images = torch.cat([photo, photo.flip(2)])             # mirrored: another layout
    _, layouts = fx.call_node(pack.nodes.QuadtreeVisualizer, image=images, content_threshold=25.0, min_tile_size=32,
                              min_denoise=0.0, max_denoise=0.9, line_thickness=0, max_tile_size=128)
    assert isinstance(layouts, tuple) and len(layouts) == 2
    assert [(t.x, t.y, t.w) for t in layouts[0].tiles] != [(t.x, t.y, t.w) for t in layouts[1].tiles]
    src = fx.FixtureVAE().encode(images)
    pos = regional(kind, base, region, box=(0, 0, W_PX, H_PX // 2 + 64))
    out = fx.run_ksampler(tiled(pack, local, quadtree=layouts, tile_overlap=0), pos, neg, src, steps=4, denoise=0.9)
    for i, layout in enumerate(layouts):
        zero = interiors(layout, lambda t: t.denoise == 0.0)
        changed = interiors(layout, lambda t: t.denoise > 0.0)
        assert zero and changed
        for y0, y1, x0, x1 in zero:
            torch.testing.assert_close(out[i:i + 1, :, y0:y1, x0:x1], src[i:i + 1, :, y0:y1, x0:x1], atol=1e-4, rtol=0)
        assert all(float((out - src)[i, :, a:b, c:d].abs().mean()) > 1e-2 for a, b, c, d in changed)


# --------------------------------------------------------------------------- fewer, fuller calls (issue 21)

def two_areas(base):
    """Two area prompts of one size at two places: ComfyUI evaluates them in one call (equal inputs)."""
    first = regional("area", base, fx.tiny_conditioning("a red barn"), box=(16, 8, 128, 96))
    return regional("area", first, fx.tiny_conditioning("a blue lake"), box=(224, 136, 128, 96))


def calls_per_step(log, steps):
    return len(log.calls) / steps


def test_two_area_prompts_share_model_calls(pack, prompts, source, monkeypatch):
    """Two area prompts of one size arrive in one ComfyUI call, each chunk on its own box: windows of one
    size from both boxes go into the same model calls (rows of both prompts in one call), fewer calls per
    step than one set of calls per box, and the same result up to float rounding."""
    base, _, neg = prompts
    pos = two_areas(base)
    model, log = fx.logged(fx.local_model(0))
    m = tiled(pack, model, tile_width=128, tile_height=96, tile_overlap=32, variable_denoise="off")
    out = fx.run_ksampler(m, pos, neg, source, steps=2, denoise=0.8)
    barn, lake = (fx.tiny_conditioning(t)[0][0][0] for t in ("a red barn", "a blue lake"))

    def holds(call, ctx):
        return any(torch.equal(r[:77], ctx[:77]) for r in call.c["c_crossattn"])

    shared = [call for call in log.calls if holds(call, barn) and holds(call, lake)]
    assert shared, "no model call held both area prompts' windows"
    batched = calls_per_step(log, 2)
    log.calls.clear()
    monkeypatch.setattr(pack.regional, "batchable", lambda *a, **k: False)      # one set of calls per box
    ref = fx.run_ksampler(m, pos, neg, source, steps=2, denoise=0.8)
    apart = calls_per_step(log, 2)
    assert not any(holds(call, barn) and holds(call, lake) for call in log.calls)
    assert batched < apart, (batched, apart)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_mask_prompt_shares_the_canvas_prompts_calls(pack, prompts, source):
    """A plain mask prompt's rows ride in the canvas prompt's model calls on the windows its mask touches
    (cond, uncond and the mask prompt in one call), not in calls of their own."""
    base, region, neg = prompts
    model, log = fx.logged(fx.local_model(0))
    m = tiled(pack, model, tile_width=192, tile_height=128, tile_overlap=32, variable_denoise="off")
    fx.run_ksampler(m, regional("mask", base, region, box=(16, 8, 64, 48)), neg, source, steps=2, denoise=0.8)
    ctx = region[0][0][0]
    with_mask = [call for call in log.calls if any(torch.equal(r[:77], ctx[:77]) for r in call.c["c_crossattn"])]
    assert with_mask and all(len(call.cou) == 3 for call in with_mask), [call.cou for call in with_mask]
