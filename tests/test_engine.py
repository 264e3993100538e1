"""The tile engine through ComfyUI's real KSampler (issue 3).

The local fixture model has a known receptive field, so with an overlap wider than it the
tiled result must stay close to the untiled one; one tile covering the canvas must give
exactly the untiled result.
"""
import pytest
import torch

METHODS = ["MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"]


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_batch_size=4), **kw})


def conds(fx):
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def source_latent(w, h, batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h // 8, w // 8, generator=g) * 2.0


@pytest.fixture(scope="module")
def local(fx):
    return fx.local_model(0)


@pytest.mark.parametrize("method", METHODS)
def test_one_tile_equals_untiled(pack, fx, local, method):
    pos, neg = conds(fx)
    lat = source_latent(256, 192)
    ref = fx.run_ksampler(local, pos, neg, lat, steps=4, cfg=7.0, denoise=0.7)
    m = tiled(pack, fx, local, method=method, tile_width=256, tile_height=192)
    out = fx.run_ksampler(m, pos, neg, lat, steps=4, cfg=7.0, denoise=0.7)
    assert torch.equal(out, ref)


def test_one_leaf_quadtree_equals_untiled(pack, fx, local):
    pos, neg = conds(fx)
    flat = torch.full((1, 192, 256, 3), 0.5)
    _, layout = fx.visualize(pack, flat, content_threshold=25.0, min_tile_size=64, min_denoise=1.0, max_denoise=1.0,
                             max_tile_size=1024)
    assert len(layout.tiles) == 1
    lat = source_latent(256, 192)
    ref = fx.run_ksampler(local, pos, neg, lat, steps=4, denoise=0.7)
    out = fx.run_ksampler(tiled(pack, fx, local, quadtree=layout), pos, neg, lat, steps=4, denoise=0.7)
    assert torch.equal(out, ref)


def seam_report(windows, out, ref, radius):
    """Max |tiled - untiled| within ``radius`` latent px of a window edge inside the canvas (where a
    tile's zero padding differs from the untiled model's context) vs everywhere else; ``windows``:
    (y0, y1, x0, x1) latent boxes."""
    H, W = out.shape[-2:]
    err = (out - ref).abs().amax(dim=(0, 1))
    band = torch.zeros(H, W, dtype=torch.bool)
    for y0, y1, x0, x1 in windows:
        for x in (x0, x1):
            if 0 < x < W:
                band[y0:y1, max(0, x - radius):x + radius] = True
        for y in (y0, y1):
            if 0 < y < H:
                band[max(0, y - radius):y + radius, x0:x1] = True
    return float(err[band].max()), float(err[~band].max() if (~band).any() else 0.0)


def hand_tiled(model, boxes_of_call, rule):
    """A test-side tiled model (a unet function wrapper, each box of the latent run through the model on
    its own): ``boxes_of_call(k)`` the (y0, y1, x0, x1) boxes of the k-th model call; ``rule`` "average"
    (each pixel the mean of the boxes covering it: MultiDiffusion), "last" (the last box covering a pixel
    wins: overlap without a blend), or ("wrap", offsets) (the latent rolled by the call's (dy, dx) with
    wrap-around, the boxes a partition of the rolled latent, rolled back: the old SpotDiffusion)."""
    state = {"k": 0}

    def wrapper(apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        k = state["k"]
        state["k"] += 1
        shift = rule[1][k] if isinstance(rule, tuple) else (0, 0)
        x = torch.roll(x, shift, dims=(-2, -1))
        num, den = torch.zeros_like(x), torch.zeros_like(x[:1, :1])
        for y0, y1, x0, x1 in boxes_of_call(k):
            x0_box = apply_model(x[..., y0:y1, x0:x1], t, **c)
            if rule == "last":
                num[..., y0:y1, x0:x1], den[..., y0:y1, x0:x1] = x0_box, 1.0
            else:
                num[..., y0:y1, x0:x1] += x0_box
                den[..., y0:y1, x0:x1] += 1.0
        return torch.roll(num / den, (-shift[0], -shift[1]), dims=(-2, -1))

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m


# Measured (local model, radius 3 latent px; 64-px = 8 latent px overlap; 4 euler steps at CFG 7 on a
# 512x384 canvas, 256-px tiles; latent std 2.17), max |tiled - untiled| near tile edges / elsewhere:
#   Mixture of Diffusers 0.0001 / 0.0000; MultiDiffusion 0.608 / 0.0115; SpotDiffusion 0.301 / 0.0144.
# Wrong variants, built test-side on the same windows: MultiDiffusion's windows without the blend
# (the last window wins) 1.19 / 0.023; the old SpotDiffusion (latent rolled with wrap-around) 0.95 / 1.03.
# Bounds: the measurement with a margin, each under its wrong variant.
SEAM_BOUNDS = {"Mixture of Diffusers": (0.001, 0.0005), "MultiDiffusion": (0.75, 0.03),
               "SpotDiffusion": (0.45, 0.03)}


@pytest.mark.parametrize("method", METHODS)
def test_tiled_close_to_untiled(pack, fx, local, method, capsys):
    """Near window edges (where a tile's zero padding meets the model's receptive field) and elsewhere,
    each bounded; the wrong variant of each method, run test-side on the same windows, breaks a bound."""
    pos, neg = conds(fx)
    lat = source_latent(512, 384)
    ref = fx.run_ksampler(local, pos, neg, lat, steps=4, denoise=0.8)
    m = tiled(pack, fx, local, method=method, tile_width=256, tile_height=256, tile_overlap=64)
    out = fx.run_ksampler(m, pos, neg, lat, steps=4, denoise=0.8)
    windows = [(w.y0, w.y1, w.x0, w.x1) for w in fx.plan_of(pack, m, *lat.shape[-2:]).windows]
    boundary, interior = seam_report(windows, out, ref, local.receptive_radius)
    with capsys.disabled():
        print(f"\n[seam] {method}: max |tiled-untiled| near tile edges {boundary:.4f}, elsewhere {interior:.4f} "
              f"(latent std {float(ref.std()):.2f})")
    near, elsewhere = SEAM_BOUNDS[method]
    assert boundary < near and interior < elsewhere, (boundary, interior)
    if method == "Mixture of Diffusers":
        return
    if method == "MultiDiffusion":
        same = fx.run_ksampler(hand_tiled(local, lambda k: windows, "average"), pos, neg, lat, steps=4, denoise=0.8)
        assert float((same - out).abs().max()) < 1e-4          # the test-side average is the engine's blend
        wrong = hand_tiled(local, lambda k: windows, "last")
    else:
        H, W = lat.shape[-2:]
        grid = [(y, min(y + 32, H), x, min(x + 32, W)) for y in range(0, H, 32) for x in range(0, W, 32)]
        g = torch.Generator().manual_seed(0)
        wrong = hand_tiled(local, lambda k: grid, ("wrap", [tuple(int(v) for v in torch.randint(0, 32, (2,),
                                                                                              generator=g))
                                                            for _ in range(8)]))
    bad = fx.run_ksampler(wrong, pos, neg, lat, steps=4, denoise=0.8)
    bad_boundary, bad_interior = seam_report(windows, bad, ref, local.receptive_radius)
    with capsys.disabled():
        print(f"[seam] {method}, wrong variant: near tile edges {bad_boundary:.4f}, elsewhere {bad_interior:.4f}")
    assert bad_boundary >= near or bad_interior >= elsewhere


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("cfg", [1.0, 7.0])
def test_samplers_and_cfg(pack, fx, local, sampler, cfg):
    pos, neg = conds(fx)
    lat = source_latent(320, 256)
    ref = fx.run_ksampler(local, pos, neg, lat, steps=3, cfg=cfg, sampler_name=sampler, denoise=0.8)
    m = tiled(pack, fx, local, method="Mixture of Diffusers", tile_width=192, tile_height=192, tile_overlap=64)
    out = fx.run_ksampler(m, pos, neg, lat, steps=3, cfg=cfg, sampler_name=sampler, denoise=0.8)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert float((out - ref).abs().max()) < 0.06  # 8 latent px overlap at radius 3: Gaussian leak <= ~2% of the edge error


def test_batch_two_non_square_not_multiple_of_tile(pack, fx, local):
    pos, neg = conds(fx)
    lat = source_latent(456, 280, batch=2)   # 57x35 latent, tiles of 24 latent px
    ref = fx.run_ksampler(local, pos, neg, lat, steps=3, denoise=0.8)
    m = tiled(pack, fx, local, method="Mixture of Diffusers", tile_width=192, tile_height=192, tile_overlap=64,
              tile_batch_size=3)
    out = fx.run_ksampler(m, pos, neg, lat, steps=3, denoise=0.8)
    assert out.shape == (2, 4, 35, 57)
    assert float((out - ref).abs().max()) < 0.01
    # the two batch items are different samples, each tiled correctly
    assert float((out[0] - out[1]).abs().mean()) > 0.1


def test_inpaint_model_c_concat_is_cropped(pack, fx):
    model = fx.local_inpaint_model(0)
    pos, neg = conds(fx)
    lat = source_latent(320, 256)
    mask = torch.zeros(1, 1, 256, 320)
    mask[..., 64:192, 96:256] = 1.0
    latent = {"samples": lat, "noise_mask": mask}
    ref = fx.run_ksampler(model, pos, neg, latent, steps=3, denoise=1.0)
    m = tiled(pack, fx, model, method="Mixture of Diffusers", tile_width=192, tile_height=192, tile_overlap=64)
    out = fx.run_ksampler(m, pos, neg, latent, steps=3, denoise=1.0)
    assert float((out - ref).abs().max()) < 0.01


def test_area_conditioned_prompt(pack, fx, local):
    import nodes as comfy_nodes
    pos, neg = conds(fx)
    area_pos = comfy_nodes.ConditioningSetArea().append(fx.tiny_conditioning("a red barn"), 256, 192, 128, 64, 1.0)[0]
    both = comfy_nodes.ConditioningCombine().combine(pos, area_pos)[0]
    lat = source_latent(512, 320)
    ref = fx.run_ksampler(local, both, neg, lat, steps=3, denoise=0.8)
    m = tiled(pack, fx, local, method="Mixture of Diffusers", tile_width=192, tile_height=192, tile_overlap=64)
    out = fx.run_ksampler(m, both, neg, lat, steps=3, denoise=0.8)
    assert float((out - ref).abs().max()) < 0.01
    # and the area prompt really changed the result inside its area
    plain = fx.run_ksampler(m, pos, neg, lat, steps=3, denoise=0.8)
    assert float((out - plain)[..., 8:32, 16:48].abs().mean()) > 1e-3


def test_input_model_is_not_mutated(pack, fx, local):
    before = dict(local.model_options)
    wrappers_before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in local.wrappers.items()}
    tiled(pack, fx, local)
    assert "model_function_wrapper" not in local.model_options
    assert local.model_options.keys() == before.keys()
    assert {k: {kk: list(vv) for kk, vv in v.items()} for k, v in local.wrappers.items()} == wrappers_before


def test_composes_with_existing_wrapper(pack, fx, local):
    """A model_function_wrapper already on the model is called for every tile batch."""
    calls = []

    def doubling(apply_model, args):
        calls.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    base = local.clone()
    base.set_model_unet_function_wrapper(doubling)
    pos, neg = conds(fx)
    m = tiled(pack, fx, base, tile_width=128, tile_height=128, tile_overlap=0, tile_batch_size=2)
    fx.run_ksampler(m, pos, neg, source_latent(256, 256), steps=2, denoise=0.5)
    # 2x2 tiles of 16x16 latent px, batches of 2 tiles x (cond, uncond)
    assert calls and all(s[-2:] == (16, 16) and s[0] == 4 for s in calls)


def test_memory_planning_sees_tile_batch(pack, fx, local):
    import comfy.sampler_helpers
    seen = []
    m = tiled(pack, fx, local, tile_width=128, tile_height=128, tile_overlap=0, tile_batch_size=2)

    def spy(executor, model, noise_shape, conds, *args, **kwargs):
        seen.append(list(noise_shape))
        return executor(model, noise_shape, conds, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "zz_spy", spy)
    pos, neg = conds(fx)
    fx.run_ksampler(m, pos, neg, source_latent(512, 512), steps=1, denoise=0.5)
    assert seen and seen[-1][-2:] == [16, 16] and seen[-1][0] == 2


def test_interrupt_between_tile_batches(pack, fx, local):
    import comfy.model_management as mm
    pos, neg = conds(fx)
    m = tiled(pack, fx, local, tile_width=128, tile_height=128, tile_overlap=0, tile_batch_size=1)
    calls = []

    def interrupting(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m2 = m.clone()
    engine = type(m.model_options["model_function_wrapper"])(m.model_options["model_function_wrapper"].cfg,
                                                              interrupting)
    m2.set_model_unet_function_wrapper(engine)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fx.run_ksampler(m2, pos, neg, source_latent(512, 512), steps=2, denoise=0.5)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2   # stopped at the next tile batch, not at the end of the step


def test_wrappers_forward_arguments_they_do_not_know(pack, fx, local):
    """ComfyUI adds arguments to its wrapper executors over time (0.6.0: PREPARE_SAMPLING got
    ``force_full_load=``, later ``force_offload=``).  A probe wrapper outside each of ours adds an
    unknown keyword; a probe inside ours must receive it (and drops it before ComfyUI's own
    function).  The unet function wrapper passes unknown arguments to a wrapper it composes with."""
    import comfy.patcher_extension
    wmp = comfy.patcher_extension.WrappersMP
    kinds = (wmp.SAMPLER_SAMPLE, wmp.PREPARE_SAMPLING, wmp.CALC_COND_BATCH)
    seen = {}

    def outer(kind):
        def probe(executor, *args, **kwargs):
            return executor(*args, qtd_probe=kind, **kwargs)
        return probe

    def inner(kind):
        def probe(executor, *args, **kwargs):
            seen.setdefault(kind, []).append(kwargs.pop("qtd_probe", None))
            return executor(*args, **kwargs)
        return probe

    def inner_unet(apply_model, args, *extra, **kwargs):
        seen.setdefault("unet", []).append((extra, kwargs))
        seen.setdefault("unet_args", []).append(sorted(args))
        return apply_model(args["input"], args["timestep"], **args["c"])

    base = local.clone()
    base.set_model_unet_function_wrapper(inner_unet)
    for kind in kinds:
        base.add_wrapper_with_key(kind, "a_outer_probe", outer(kind))
    m = tiled(pack, fx, base, tile_width=128, tile_height=128, tile_overlap=0, tile_batch_size=2)
    for kind in kinds:
        m.add_wrapper_with_key(kind, "z_inner_probe", inner(kind))
    engine = m.model_options["model_function_wrapper"]
    # a newer ComfyUI's args may hold more than the four keys the engine tiles (one fork adds cond_scale)
    m.set_model_unet_function_wrapper(lambda f, a: engine(f, {**a, "cond_scale": 4.0}, "positional", qtd_probe="unet"))
    pos, neg = conds(fx)
    out = fx.run_ksampler(m, pos, neg, source_latent(256, 256), steps=2, denoise=0.5)
    assert torch.isfinite(out).all()
    for kind in kinds:
        assert seen.get(kind) and all(v == kind for v in seen[kind]), (kind, seen.get(kind))
    # 2x2 tiles in batches of 2, two steps: every tile batch's call got the extra arguments
    assert len(seen["unet"]) == 4 and all(e == (("positional",), {"qtd_probe": "unet"}) for e in seen["unet"])
    # ... and the args keys the engine does not tile, unchanged
    assert all(a == ["c", "cond_or_uncond", "cond_scale", "input", "timestep"] for a in seen["unet_args"]), seen["unet_args"]


def test_nodes_and_runs_leave_the_input_model_unchanged(pack, fx, local):
    """ModelPatcher.clone() deep-copied model_options up to 0.13 and shares everything but dicts and
    lists since 0.14: the nodes and a sampling run must change nothing reachable from the input
    model (its model_options, transformer_options, wrappers), whatever clone copies."""
    base = local.clone()
    base.model_options["transformer_options"] = {"user_key": [1, 2]}

    def snapshot(m):
        to = m.model_options.get("transformer_options", {})
        return (sorted(m.model_options), sorted(to), repr(to.get("user_key")),
                {k: sorted(v) for k, v in m.wrappers.items()}, m.model_options.get("model_function_wrapper"))

    before = snapshot(base)
    m = tiled(pack, fx, base, tile_width=128, tile_height=128, tile_overlap=0, tile_batch_size=2)
    (s,) = fx.call_node(pack.nodes.SpotDiffusionParams_QuadtreeDiffusion, model=m, shift_method="sorted", seed=3)
    tiled_before = snapshot(m)
    pos, neg = conds(fx)
    fx.run_ksampler(s, pos, neg, source_latent(256, 256), steps=2, denoise=0.5)
    assert snapshot(base) == before
    assert snapshot(m) == tiled_before
    assert pack.utils.SPOT_KEY not in m.model_options.get("transformer_options", {})
    assert pack.utils.RUN_KEY not in s.model_options.get("transformer_options", {})   # the run's state left with it


@pytest.mark.parametrize("fit", [1, 5, 12])
def test_auto_tile_batch_fills_the_free_memory(pack, fx, local, fit, monkeypatch):
    """tile_batch_size 0 (auto): with the device's free memory set so that ``fit`` tiles fit in 0.8 of it
    at 1.5x the model's memory estimate, every call fits and the 12 same-size windows go in the fewest
    calls of at most ``fit`` tiles: 12, 3, 1 calls per step (a fixed batch, whatever its size, gives one
    of these for every free memory).  CFG 1: one prompt, so ComfyUI's own cond / uncond batching, which
    reads the free memory too, stays out of it."""
    import comfy.model_management as mm
    per_tile = local.model.memory_required([1, 4, 16, 16]) * 1.5
    free = (fit + 0.5) * per_tile / 0.8
    real = mm.get_free_memory
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                        (free, free) if torch_free_too else free)
    model, log = fx.logged(local)
    m = tiled(pack, fx, model, method="MultiDiffusion", tile_width=128, tile_height=128, tile_overlap=0,
              tile_batch_size=0)
    pos, neg = conds(fx)
    fx.run_ksampler(m, pos, neg, source_latent(512, 384), steps=2, cfg=1.0, denoise=0.8)
    monkeypatch.setattr(mm, "get_free_memory", real)
    assert {c.x.shape[-2:] for c in log.calls} == {(16, 16)}
    tiles = [c.x.shape[0] // len(c.cou) for c in log.calls]
    assert sum(tiles) == 2 * 12
    assert len(tiles) == 2 * -(-12 // fit), tiles                        # the fewest calls of at most `fit`
    for c in log.calls:
        assert local.model.memory_required(list(c.x.shape)) * 1.5 <= 0.8 * free


class HostSyncs:
    """Counts the host syncs (``aten::_local_scalar_dense``: every ``.item()``, ``.tolist()``, ``float(t)``,
    ``bool(t)`` of a floating-point tensor: latents, predictions, sigmas, weights) in each step of a
    sampling run after the first, where the engine has planned its tiles and read the run's sigmas;
    ``on_step`` is the sampler callback that opens the next step.  Tile geometry is int64 on the CPU by
    construction (``tile_windows.as_rects``), whatever the model's device: reading it is no device sync,
    and on this CPU-only machine it could not be told apart from one, so integer reads are not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counts = self.counts = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counts and func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
                    counts[-1] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def on_step(self, i, *args):
        self.counts.append(0)


@pytest.mark.parametrize("method", METHODS)
def test_no_host_syncs_inside_a_step(pack, fx, local, method):
    """From the second step on, a tiled step makes exactly the host syncs of the untiled step (those of
    ComfyUI's sampler): the engine reads its step from the sampler's callback and its sigmas once per
    run, and crops, batches and blends on the device.  (A wrong variant, the step index read as
    ``float(timestep)`` per call, adds one per model call.)"""
    import comfy.sample
    pos, neg = conds(fx)
    lat = source_latent(512, 384)
    syncs = {}
    for name, m in (("untiled", local), ("tiled", tiled(pack, fx, local, method=method, tile_width=256,
                                                          tile_height=256, tile_overlap=64))):
        count = HostSyncs()
        noise = comfy.sample.prepare_noise(lat, 0)
        with count.mode:
            comfy.sample.sample(m, noise, 4, 7.0, "euler", "normal", pos, neg, lat, denoise=0.8,
                                callback=count.on_step, disable_pbar=True, seed=0)
        syncs[name] = count.counts[:-1]          # steps 2..4 (the last callback closes the run)
    assert len(syncs["tiled"]) == 3 and syncs["tiled"] == syncs["untiled"], syncs
