"""Variable denoise and skip through ComfyUI's real KSampler (issue 4)."""
import logging

import pytest
import torch


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_batch_size=4, method="Mixture of Diffusers", tile_overlap=64), **kw})


def layout_for(pack, fx, image, lo, hi, min_tile=64, max_tile=1024):
    return fx.visualize(pack, image, content_threshold=25.0, min_tile_size=min_tile, min_denoise=lo, max_denoise=hi,
                        max_tile_size=max_tile)[1]


@pytest.fixture(scope="module")
def local(fx):
    return fx.local_model(0)


@pytest.fixture(scope="module")
def photo(fx):
    return fx.synthetic_photo(384, 256, seed=1)   # flat sky on top, texture bottom right


@pytest.fixture(scope="module")
def source(fx, photo):
    return fx.FixtureVAE().encode(photo)


def conds(fx):
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def test_schedule_equals_shorter_img2img(pack, fx, local, photo, source):
    """d = 0.5 everywhere, 20 euler steps at denoise 0.8 == 10 steps at denoise 0.4 with tiling at full strength
    (both use the last 11 sigmas of a 25-step schedule)."""
    layout = layout_for(pack, fx, photo, 0.5, 0.5)
    assert len(layout.tiles) > 1 and {t.denoise for t in layout.tiles} == {0.5}
    pos, neg = conds(fx)
    a = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="schedule"), pos, neg, source,
                        steps=20, denoise=0.8, seed=7)
    b = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="off"), pos, neg, source,
                        steps=10, denoise=0.4, seed=7)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
    # and it is not trivially the source
    assert float((a - source).abs().mean()) > 1e-2


def test_full_strength_schedule_is_plain_tiling(pack, fx, local, photo, source):
    layout = layout_for(pack, fx, photo, 1.0, 1.0)
    pos, neg = conds(fx)
    a = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="schedule"), pos, neg, source,
                        steps=4, denoise=0.7)
    b = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="off"), pos, neg, source,
                        steps=4, denoise=0.7)
    assert torch.equal(a, b)


def core_interiors(layout, pred, margin):
    """Latent boxes (y0, y1, x0, x1) of the tiles satisfying pred, shrunk by margin latent px."""
    out = []
    for t in layout.tiles:
        if pred(t):
            y0, y1, x0, x1 = t.y // 8 + margin, (t.y + t.h) // 8 - margin, t.x // 8 + margin, (t.x + t.w) // 8 - margin
            if y1 > y0 and x1 > x0:
                out.append((y0, y1, x0, x1))
    return out


def test_zero_denoise_tiles_keep_the_source(pack, fx, local, photo, source):
    layout = layout_for(pack, fx, photo, 0.0, 0.9)
    assert min(t.denoise for t in layout.tiles) == 0.0 and max(t.denoise for t in layout.tiles) > 0.5
    pos, neg = conds(fx)
    out = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, tile_overlap=0), pos, neg, source, steps=6,
                          denoise=0.9)
    boxes = core_interiors(layout, lambda t: t.denoise == 0.0, 0)
    assert boxes
    for y0, y1, x0, x1 in boxes:
        assert torch.allclose(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-4)
    # the detailed tiles did change
    for y0, y1, x0, x1 in core_interiors(layout, lambda t: t.denoise > 0.5, 0):
        assert float((out - source)[..., y0:y1, x0:x1].abs().mean()) > 1e-2


def test_skip_preserves_source_exactly_and_saves_calls(pack, fx, local, photo, source, caplog):
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    sizes = sorted({t.min_side for t in layout.tiles})
    assert len(sizes) > 1
    skip_below = sizes[-1]        # every tile but the largest is skipped
    pos, neg = conds(fx)
    base, log = fx.logged(local)
    with caplog.at_level(logging.INFO):
        out = fx.run_ksampler(tiled(pack, fx, base, quadtree=layout, variable_denoise="off",
                                    skip_diffusion_below=skip_below, tile_overlap=0), pos, neg, source, steps=4,
                              denoise=0.8)
    small = core_interiors(layout, lambda t: t.min_side < skip_below, 0)
    for y0, y1, x0, x1 in small:
        assert torch.allclose(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-4)
    n_large = sum(1 for t in layout.tiles if t.min_side >= skip_below)
    assert sum(x[0] for x in log.shapes) == 4 * n_large * 2      # 4 steps x large tiles x (cond, uncond)
    text = caplog.text
    n_small = len(layout.tiles) - n_large
    assert f"[Quadtree Skip]: Will skip {n_small}/{len(layout.tiles)} tiles (min dimension < {skip_below}px)" in text


def test_schedule_saves_model_calls(pack, fx, local, photo, source, caplog):
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    pos, neg = conds(fx)
    counts = {}
    for mode in ("off", "schedule"):
        base, log = fx.logged(local)
        with caplog.at_level(logging.INFO):
            fx.run_ksampler(tiled(pack, fx, base, quadtree=layout, variable_denoise=mode), pos, neg, source,
                            steps=10, denoise=0.8)
        counts[mode] = sum(x[0] // 2 for x in log.shapes)
    expected = pack.variable_denoise.schedule_model_calls([t.denoise for t in layout.tiles], 10)
    assert counts["off"] == 10 * len(layout.tiles)
    assert counts["schedule"] == expected < counts["off"]
    assert "[Quadtree Variable Denoise]: Loaded sigmas from store, length=11" in caplog.text
    assert "[Quadtree Variable Denoise]: ENABLED - Tiles will be denoised adaptively (mode=schedule)" in caplog.text
    assert "run done:" in caplog.text


def test_scale_mode_takes_alpha_times_the_step(pack, fx, local, source):
    """Single tile covering the canvas with d = 0.4: equals the untiled model with the same alpha
    applied by a plain wrapper as x0' = x + alpha (x0 - x)."""
    vd = pack.variable_denoise
    d = 0.4
    flat = torch.full((1, 256, 384, 3), 0.5)
    layout = layout_for(pack, fx, flat, d, d)
    assert len(layout.tiles) == 1
    pos, neg = conds(fx)
    steps = 5
    a = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="scale"), pos, neg, source,
                        steps=steps, denoise=0.8)

    state = {"i": 0}

    def plain_alpha(apply_model, args):
        x = args["input"]
        x0 = apply_model(x, args["timestep"], **args["c"])
        alpha = vd.scale_alpha(d, vd.progress(state["i"], steps))
        state["i"] += 1
        return x + alpha * (x0 - x)

    ref_model = local.clone()
    ref_model.set_model_unet_function_wrapper(plain_alpha)
    b = fx.run_ksampler(ref_model, pos, neg, source, steps=steps, denoise=0.8)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # x0' = x + alpha (x0 - x) keeps the latent's level; scaling x0 itself (x0' = alpha x0, the
    # mistake this mode must not make) drags it towards zero: grey, washed-out tiles
    state["i"] = 0

    def wrong_scaling(apply_model, args):
        x0 = apply_model(args["input"], args["timestep"], **args["c"])
        alpha = vd.scale_alpha(d, vd.progress(state["i"], steps))
        state["i"] += 1
        return alpha * x0

    wrong_model = local.clone()
    wrong_model.set_model_unet_function_wrapper(wrong_scaling)
    wrong = fx.run_ksampler(wrong_model, pos, neg, source, steps=steps, denoise=0.8)
    assert float(a.abs().mean()) > float(wrong.abs().mean())


def test_scale_mode_logs_smooth_scaling_once(pack, fx, local, photo, source, caplog):
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    pos, neg = conds(fx)
    with caplog.at_level(logging.INFO):
        fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, variable_denoise="scale"), pos, neg, source,
                        steps=4, denoise=0.8)
    assert caplog.text.count("[Quadtree Variable Denoise]: SMOOTH SCALING - tile_denoise=0.200, progress=0.000, "
                             "start_scale=0.750, scale=0.750") == 1


def test_runs_do_not_share_state(pack, fx, local, photo, source):
    """Two different settings run one after the other give what each gives alone."""
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    pos, neg = conds(fx)
    m1 = tiled(pack, fx, local, quadtree=layout, variable_denoise="schedule")
    m2 = tiled(pack, fx, local, quadtree=layout, variable_denoise="scale", method="SpotDiffusion")
    a1 = fx.run_ksampler(m1, pos, neg, source, steps=6, denoise=0.8)
    b1 = fx.run_ksampler(m2, pos, neg, source, steps=4, denoise=0.6)
    a2 = fx.run_ksampler(m1, pos, neg, source, steps=6, denoise=0.8)
    b2 = fx.run_ksampler(m2, pos, neg, source, steps=4, denoise=0.6)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.parametrize("method", ["Mixture of Diffusers", "SpotDiffusion"])
def test_image_batch_gives_one_layout_per_item(pack, fx, local, method):
    """Two different images in one IMAGE batch: each latent item is tiled by its own layout
    (SpotDiffusion: each item's own layout, shifted)."""
    a = fx.synthetic_photo(256, 256, seed=1)
    b = torch.flip(a, dims=[1])                       # sky at the bottom, detail on top
    _, layouts = fx.visualize(pack, torch.cat([a, b]), content_threshold=25.0, min_tile_size=64, min_denoise=0.0,
                              max_denoise=1.0)
    assert isinstance(layouts, tuple) and len(layouts) == 2 and layouts[0].tiles != layouts[1].tiles
    vae = fx.FixtureVAE()
    src = torch.cat([vae.encode(a), vae.encode(b)])
    pos, neg = conds(fx)
    both = fx.run_ksampler(tiled(pack, fx, local, quadtree=layouts, tile_overlap=0, method=method), pos, neg, src,
                           steps=4, denoise=0.8)
    for i, lay in enumerate(layouts):
        for y0, y1, x0, x1 in core_interiors(lay, lambda t: t.denoise == 0.0, 0):
            assert torch.allclose(both[i, :, y0:y1, x0:x1], src[i, :, y0:y1, x0:x1], atol=1e-4)
    one = fx.run_ksampler(tiled(pack, fx, local, quadtree=layouts[:1] and layouts[0], tile_overlap=0, method=method),
                          pos, neg, src, steps=4, denoise=0.8)
    assert not torch.allclose(one[1], both[1])
    with pytest.raises(ValueError, match="quadtree: 2 layouts"):
        fx.run_ksampler(tiled(pack, fx, local, quadtree=layouts), pos, neg, src[:1], steps=1, denoise=0.5)


def test_layout_of_another_size_is_scaled_and_logged(pack, fx, local, photo, source, caplog):
    """A quadtree built on a 2x image drives a latent of the 1x image: scaled, logged once per run."""
    big = torch.nn.functional.interpolate(photo.movedim(-1, 1), scale_factor=2, mode="nearest").movedim(1, -1)
    layout = layout_for(pack, fx, big, 0.0, 1.0, min_tile=128)
    pos, neg = conds(fx)
    with caplog.at_level(logging.INFO):
        out = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, tile_overlap=0), pos, neg, source, steps=3,
                              denoise=0.8)
    assert caplog.text.count("quadtree built for a 768x512px image, scaled to the 384x256px latent") == 1
    for t in layout.tiles:          # d = 0 tiles, in latent units of the small image, keep the source
        if t.denoise == 0.0:
            y0, y1, x0, x1 = t.y // 16, (t.y + t.h) // 16, t.x // 16, (t.x + t.w) // 16
            assert torch.allclose(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-4)


def test_empty_latent_with_variable_denoise_warns_once(pack, fx, local, photo, caplog):
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    pos, neg = conds(fx)
    empty = torch.zeros(1, 4, 32, 48)
    with caplog.at_level(logging.INFO):
        fx.run_ksampler(tiled(pack, fx, local, quadtree=layout, skip_diffusion_below=128), pos, neg, empty,
                        steps=3, denoise=1.0)
    assert caplog.text.count("[Quadtree Variable Denoise]: WARNING - variable denoise with an empty") == 1
    assert caplog.text.count("[Quadtree Skip]: skip_diffusion_below=128px with an empty (all-zero) latent") == 1


def test_sampler_without_step_reports_is_flagged(pack, fx, local, photo, source, caplog):
    """A custom sampler that never calls ComfyUI's callback: the run end says per-step settings could not follow."""
    import comfy.samplers
    import comfy.sample
    layout = layout_for(pack, fx, photo, 0.2, 0.8)
    model = tiled(pack, fx, local, quadtree=layout)
    inner = comfy.samplers.ksampler("euler")

    class Silent(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            return inner.sample(model_wrap, sigmas, extra_args, None, noise, latent_image, denoise_mask, True)

    pos, neg = conds(fx)
    noise = comfy.sample.prepare_noise(source, 0)
    sigmas = comfy.samplers.calculate_sigmas(local.get_model_object("model_sampling"), "normal", 4)
    with caplog.at_level(logging.INFO):
        comfy.sample.sample_custom(model, noise, 7.0, Silent(), sigmas, pos, neg, source)
    assert "the sampler never reported a finished step" in caplog.text
    with caplog.at_level(logging.INFO):
        caplog.clear()
        fx.run_ksampler(model, pos, neg, source, steps=4, denoise=0.8)
    assert "the sampler never reported a finished step" not in caplog.text


def test_spotdiffusion_schedule_keeps_zero_tiles_and_skips_inactive_ones(pack, fx, local, photo, source):
    """SpotDiffusion evaluates shifted tiles: at each step exactly those whose core holds a pixel of a
    tile active at that step (d = 0, 0.5, 1) are evaluated, and d = 0 tiles still come out as the source.
    (Mutations this count catches: every shifted tile evaluated; tiles switching on a step early.)"""
    layout = layout_for(pack, fx, photo, 0.0, 1.0, min_tile=32)
    assert {t.denoise for t in layout.tiles} == {0.0, 0.5, 1.0}
    pos, neg = conds(fx)
    base, log = fx.logged(local)
    model = tiled(pack, fx, base, quadtree=layout, method="SpotDiffusion")
    out = fx.run_ksampler(model, pos, neg, source, steps=8, denoise=0.9)
    zero = core_interiors(layout, lambda t: t.denoise == 0.0, 0)
    assert zero
    for y0, y1, x0, x1 in zero:
        assert torch.allclose(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-4)
    # exactly the shifted tiles whose core holds a pixel of an active tile are evaluated, each step
    # (the default SpotDiffusion parameters: random, seed 0, both axes)
    sd, td = pack.spot_diffusion, pack.tiled_diffusion
    plan = td.plan_for(model.model_options["model_function_wrapper"].cfg, H=source.shape[-2],
                       W=source.shape[-1], compression=8, align=1, device="cpu", dtype=torch.float32)
    n = 8
    ys, xs = sd.step_offsets(n, plan.periods, "random", 0, plan.align, sd.DEFAULT_SCHEDULE, plan.partition.rest())
    act = activity(layout, n, *source.shape[-2:])
    expected = [sum(bool(act[k, y0:y1, x0:x1].any()) for y0, y1, x0, x1 in plan.partition.cores(ys[k], xs[k]).tolist())
                for k in range(n)]
    per_step = {}
    for call in log.calls:
        t = round(float(call.t.reshape(-1)[0]), 4)
        per_step[t] = per_step.get(t, 0) + call.x.shape[0] // len(call.cou)
    assert list(per_step.values()) == expected, (per_step, expected)
    assert sum(expected) < n * len(layout.tiles)         # some were inactive
    assert float((out - source).abs().mean()) > 1e-2


# --------------------------------------------------------------------------- every kind of sampler (issue 25, item 3)

# One evaluation per step (euler), multistep with history (uni_pc), stochastic multistep (dpmpp_2m_sde,
# dpmpp_3m_sde: fresh noise every step), and two evaluations per step: heun (its corrector at the next
# step's sigma), dpmpp_sde and dpm_2 (a midpoint between the step's sigmas), all after the step's callback.
ONE_EVALUATION = ["euler", "uni_pc", "dpmpp_2m_sde", "dpmpp_3m_sde"]
TWO_EVALUATIONS = ["heun", "dpmpp_sde", "dpm_2"]



def sample(model, pos, neg, latent, sampler, steps, denoise, seed=7, cfg=4.0, on_step=None):
    """ComfyUI's sampler as the KSampler runs it (same noise), with ``on_step(i, x)`` at ComfyUI's callback
    of step i (after the step's first model evaluation; x in the sampler's own space)."""
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    cb = None if on_step is None else (lambda i, x0, x, total: on_step(i, x))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", pos, neg, latent, denoise=denoise,
                               callback=cb, disable_pbar=True, seed=seed)


def evaluation_steps(sampler, n):
    """The step each model evaluation of an n-step run belongs to, in order (two-evaluation samplers take
    one evaluation in their last step, to sigma 0)."""
    two = sampler in TWO_EVALUATIONS
    return [i for i in range(n) for _ in range(2 if two and i < n - 1 else 1)]


def activity(layout, n, H, W):
    """[n, H, W] bool: where a tile is active at each step, by the README's rule (the last round(d n) of n
    steps, half up; the tiles here do not overlap)."""
    act = torch.zeros(n, H, W, dtype=torch.bool)
    for t in layout.tiles:
        first = n - int(t.denoise * n + 0.5 + 1e-9)
        act[first:, t.y // 8:(t.y + t.h) // 8, t.x // 8:(t.x + t.w) // 8] = True
    return act


def stepwise_reference(fx, local, layout, src, n, steps):
    """The spec as a plain post-CFG hook on the same tiles at full strength: at the k-th model evaluation,
    x0 = the model's where the tile is active at step ``steps[k]``, the source latent elsewhere."""
    src_in = local.model.latent_format.process_in(src)
    act = activity(layout, n, *src.shape[-2:])
    k = iter(steps)

    def post_cfg(args):
        return torch.where(act[next(k)], args["denoised"], src_in.to(args["denoised"]))

    off = own_tiles(fx, local, layout, "off")
    off.set_model_sampler_post_cfg_function(post_cfg)
    return off


def own_tiles(fx, model, layout, mode):
    """Each quadtree tile on its own (MultiDiffusion, no overlap): a pixel's x0 is its tile's."""
    return tiled(fx.load_pack(), fx, model, quadtree=layout, method="MultiDiffusion", tile_overlap=0,
                 variable_denoise=mode)


@pytest.mark.parametrize("sampler", ONE_EVALUATION + TWO_EVALUATIONS)
def test_schedule_is_the_stepwise_switch_for_every_sampler(pack, fx, local, photo, source, sampler):
    """Per-tile denoise 0, 0.5, 1 (schedule): every model evaluation inside step i uses step i's setting:
    the run equals the same tiles at full strength where a plain post-CFG hook sets x0 = source for the
    tiles not active at the evaluation's step.  d = 0 tiles come out as the source.  The wrong variant,
    tiles switching on one step late, is far off (euler)."""
    layout = layout_for(pack, fx, photo, 0.0, 1.0, min_tile=32)
    assert {t.denoise for t in layout.tiles} == {0.0, 0.5, 1.0}
    pos, neg = conds(fx)
    n, denoise = 6, 0.8
    out = sample(own_tiles(fx, local, layout, "schedule"),
                 pos, neg, source, sampler, n, denoise)
    steps = evaluation_steps(sampler, n)
    ref = sample(stepwise_reference(fx, local, layout, source, n, steps), pos, neg, source, sampler, n, denoise)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), float((out - ref).abs().max())
    # uni_pc ends at sigma 0.001 through an eps parametrisation: the source to that sampler's float
    # precision (measured max 0.021 on latents of std ~2)
    tol = 4e-2 if sampler == "uni_pc" else 1e-4
    for y0, y1, x0, x1 in core_interiors(layout, lambda t: t.denoise == 0.0, 0):
        err = float((out - source)[..., y0:y1, x0:x1].abs().max())
        assert err <= tol, err
    assert float((out - source).abs().mean()) > 1e-2
    if sampler == "euler":
        late = sample(stepwise_reference(fx, local, layout, source, n, [max(0, i - 1) for i in steps]),
                      pos, neg, source, sampler, n, denoise)
        assert float((out - late).abs().max()) > 1e-1


@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "heun"])
def test_inactive_tiles_stay_exactly_on_the_noising_path(pack, fx, local, photo, source, sampler):
    """Deterministic samplers: until a tile is active, its latent at every step's callback is exactly
    source + sigma_i * the run's noise (the img2img noising path; uni_pc's latent is that over
    sqrt(1 + sigma_i^2)), multistep and two-evaluation samplers too."""
    import comfy.sample
    import comfy.samplers
    layout = layout_for(pack, fx, photo, 0.0, 1.0, min_tile=32)
    pos, neg = conds(fx)
    n, denoise = 6, 0.8
    sigmas = comfy.samplers.KSampler(local, steps=n, device="cpu", sampler=sampler, scheduler="normal",
                                     denoise=denoise).sigmas
    src_in, noise = local.model.latent_format.process_in(source), comfy.sample.prepare_noise(source, 7)
    act = activity(layout, n, *source.shape[-2:])
    checked = []

    def on_step(i, x):
        # k-diffusion samplers: the latent step i started from, idle where no step before i was active.
        # uni_pc: the latent at sigma_i already corrected with step i's evaluation (its last callback: the
        # final latent), idle where step i is not active either
        if sampler == "uni_pc" and i == n - 1:
            return
        seen = i + 1 if sampler == "uni_pc" else i
        idle = ~act[seen - 1] if seen else torch.ones_like(act[0])
        sigma = float(sigmas[i])
        expected = src_in + sigma * noise
        if sampler == "uni_pc":
            expected = expected / (1.0 + sigma ** 2) ** 0.5
        checked.append((i, int(idle.sum()), float((x.detach() - expected)[..., idle].abs().max())))

    model = own_tiles(fx, local, layout, "schedule")
    sample(model, pos, neg, source, sampler, n, denoise, on_step=on_step)
    assert len(checked) == (n - 1 if sampler == "uni_pc" else n), checked
    assert all(idle > 0 for _, idle, _ in checked)          # the d = 0 tiles are idle all the way
    assert max(err for _, _, err in checked) < 1e-4 * float(sigmas[0]), checked
