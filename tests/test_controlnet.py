"""Per-tile ControlNet / T2I-Adapter (issue 5), through ComfyUI's real KSampler and control classes.

A tiny real ``comfy.cldm.cldm.ControlNet`` (the tiny SD1.5 UNet's config, seeded weights) is
wrapped in ``comfy.controlnet.ControlNet`` through a recording module, so every control call's
``x`` and ``hint`` are seen.  The hint is a gradient image whose pixels are all distinct, so a
recorded hint tile identifies the window it was cut from.
"""
from collections import Counter, defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

W_PX, H_PX = 96, 64                   # canvas: 12 x 8 latent
TILE = 48                             # grid tiles: 6 x 6 latent, 6 of them with a 16 px overlap
STEPS = 2


# --------------------------------------------------------------------------- fixtures

class Recorder(torch.nn.Module):
    """Wraps a control model; records (x shape, hint) of every call, then runs the real model.
    ``timesteps`` holds each ControlNet call's first timestep (which sampler step it belongs to)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.dtype = getattr(inner, "dtype", torch.float32)
        self.unshuffle_amount = getattr(inner, "unshuffle_amount", None)
        self.calls = []
        self.timesteps = []

    def forward(self, *args, **kw):
        if "hint" in kw:                      # ControlNet: x=, hint=, timesteps=, context=
            self.calls.append((tuple(kw["x"].shape), kw["hint"].detach().clone()))
            self.timesteps.append(float(kw["timesteps"].reshape(-1)[0]))
            return self.inner(**kw)
        (hint,) = args                        # T2I adapter: the hint only
        self.calls.append((None, hint.detach().clone()))
        return self.inner(hint)


def tiny_controlnet(fx, seed):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    cfg = fx.tiny_sd15_unet_config()
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, num_heads=2, num_head_channels=-1, dtype=torch.float32,
               operations=comfy.ops.disable_weight_init, device=torch.device("cpu"))
    net = comfy.cldm.cldm.ControlNet(**cfg)
    fx.init_module_(net, seed)
    with torch.no_grad():      # ComfyUI's zero convs start at 0; give them weight so control shows
        for zc in list(net.zero_convs) + [net.middle_block_out]:
            zc[0].weight.mul_(0.5)
    rec = Recorder(net.eval())
    return comfy.controlnet.ControlNet(rec, load_device=torch.device("cpu")), rec


def tiny_t2i(fx, seed):
    import comfy.controlnet
    import comfy.t2i_adapter.adapter
    ad = comfy.t2i_adapter.adapter.Adapter(cin=3 * 64, channels=[32, 64], nums_rb=1, ksize=1, sk=True,
                                           use_conv=False, xl=False)
    fx.init_module_(ad, seed)
    rec = Recorder(ad.eval())
    return comfy.controlnet.T2IAdapter(rec, 3, 8, "nearest-exact", device=torch.device("cpu")), rec


def gradient(batch=1, w=W_PX, h=H_PX):
    """IMAGE [B,H,W,3]: every pixel distinct (channel 0 = row, 1 = column), batch items differ."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    imgs = []
    for b in range(batch):
        imgs.append(torch.stack([yy / 1000.0 + b, xx / 1000.0 + 2 * b, torch.sin(yy * 0.37 + xx * 0.11)], -1))
    return torch.stack(imgs)


def with_control(pn, control, image, strength=1.0, start=0.0, end=1.0, vae=None, make=lambda c: c):
    """Attach a control to (positive, negative) like ControlNetApplyAdvanced does -- one control
    object shared by both, chained onto any control already there -- also for strength 0, which
    that node short-circuits.  ``make`` turns the prepared copy into the control that is used."""
    hint = image.movedim(-1, 1)
    made = {}
    res = []
    for conds_ in pn:
        out = []
        for cond, opts in conds_:
            d = dict(opts)
            prev = d.get("control")
            if prev not in made:
                made[prev] = make(control.copy().set_cond_hint(hint, strength, (start, end), vae=vae))
                made[prev].set_previous_controlnet(prev)
            d["control"] = made[prev]
            d["control_apply_to_uncond"] = False
            out.append([cond, d])
        res.append(out)
    return tuple(res)


def conds(fx):
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(tile_batch_size=4, tile_width=TILE, tile_height=TILE, tile_overlap=16, method="MultiDiffusion"),
        **kw})


def plan_of(pack, m, w_px=W_PX, h_px=H_PX):
    """The engine's plan for the canvas (the model's own patch alignment)."""
    td = pack.tiled_diffusion
    engine = m.model_options["model_function_wrapper"]
    align = pack.utils.latent_patch_size(m.model)
    return td.plan_for(engine.cfg, H=h_px // 8, W=w_px // 8, compression=8, align=align,
                       device="cpu", dtype=torch.float32)


def latent(batch=1, seed=5, w=W_PX, h=H_PX):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h // 8, w // 8, generator=g)


@pytest.fixture(scope="module")
def sd15(fx):
    return fx.tiny_sd15(0)


@pytest.fixture(scope="module")
def cnet(fx):
    return tiny_controlnet(fx, 11)


@pytest.fixture(scope="module")
def cnet2(fx):
    return tiny_controlnet(fx, 12)


def window_of(crop, hint_px, windows, s=8):
    """The plan window whose crop of ``hint_px`` [C,H,W] (``s`` hint px per latent px) equals
    ``crop`` [C,h,w] (or None)."""
    for w in windows:
        ref = hint_px[:, w.y0 * s:w.y1 * s, w.x0 * s:w.x1 * s]
        if ref.shape == crop.shape and torch.equal(ref, crop):
            return (w.y0, w.y1, w.x0, w.x1)
    return None


def seen_windows(calls, hint_imgs, windows, n_chunks, batch, s=8):
    """For every control call: each hint row is a window's crop of its batch item's image, the
    chunk blocks repeat, the hint is 8x the x tile; returns the Counter of windows seen (per chunk)."""
    seen = Counter()
    for xshape, hint in calls:
        assert xshape is None or tuple(hint.shape[-2:]) == (xshape[-2] * s, xshape[-1] * s)
        rows = hint.shape[0]
        if xshape is not None and rows == 1:        # single tile, single image: broadcast by conv
            k = 1
        else:
            assert rows % (n_chunks * batch) == 0, (rows, n_chunks, batch)
            k = rows // (n_chunks * batch)
            blocks = hint.reshape(n_chunks, k * batch, *hint.shape[1:])
            for ch in range(1, n_chunks):
                assert torch.equal(blocks[ch], blocks[0])
        for j in range(k):
            for b in range(batch):
                row = hint[min(j * batch + b, rows - 1)]
                win = window_of(row, hint_imgs[b if rows > 1 else 0], windows, s)
                assert win is not None, f"hint row {j},{b} is no window's crop of image {b}"
                if b == 0:
                    seen[win] += 1
                else:   # the same tile for every batch item
                    assert win == window_of(hint[j * batch], hint_imgs[0], windows, s)
    return seen


def size_keyed(control):
    """``control`` as newer ComfyUI's ControlNet, which caches its prepared hint per latent size in
    ``cond_hints`` (upstream PR 15832; tests/upstream.py transcribes it).  Its cache is pre-filled with
    wrong hints for the canvas and for the tile size: a tile copy sharing that dict would hand every tile
    of that size that wrong hint."""
    import qtd_upstream
    control = qtd_upstream.make_size_keyed(control)
    for h, w in ((H_PX // 8, W_PX // 8), (TILE // 8, TILE // 8)):
        control.cond_hints[(h, w)] = torch.full((1, 3, h * 8, w * 8), -7.0)
    return control


# --------------------------------------------------------------------------- crops end to end

@pytest.mark.parametrize("k,batch,cache", [(1, 1, "comfy"), (4, 1, "comfy"), (4, 2, "comfy"), (4, 1, "size_keyed")])
def test_each_tile_sees_its_own_crop(pack, fx, sd15, cnet, k, batch, cache):
    control, rec = cnet
    img = gradient(batch)
    pos, neg = conds(fx)
    pos, neg = with_control((pos, neg), control, img, make=size_keyed if cache == "size_keyed" else lambda c: c)
    m = tiled(pack, fx, sd15, tile_batch_size=k)
    plan = plan_of(pack, m)
    assert len(plan.windows) > 4
    rec.calls.clear()
    out = fx.run_ksampler(m, pos, neg, latent(batch), steps=STEPS, cfg=5.0)
    assert torch.isfinite(out).all()
    hint_imgs = img.movedim(-1, 1)
    seen = seen_windows(rec.calls, hint_imgs, plan.windows, n_chunks=2, batch=batch)
    expected = Counter({(w.y0, w.y1, w.x0, w.x1): STEPS for w in plan.windows})
    assert seen == expected
    # no canvas-sized control pass: every control call ran on at most k tiles of tile size
    assert all(x[-2:] == (TILE // 8, TILE // 8) and x[0] <= 2 * k * batch for x, _ in rec.calls)
    assert len(rec.calls) == STEPS * -(-len(plan.windows) // k)


def test_hint_other_resolution_resized_once_then_cropped(pack, fx, sd15, cnet):
    """A hint of another size is resized to the canvas like ComfyUI does, then cropped."""
    import comfy.utils
    control, rec = cnet
    small = gradient(1, w=W_PX // 2 + 3, h=H_PX // 2)
    pos, neg = conds(fx)
    pos, neg = with_control((pos, neg), control, small)
    m = tiled(pack, fx, sd15)
    plan = plan_of(pack, m)
    rec.calls.clear()
    fx.run_ksampler(m, pos, neg, latent(), steps=2, cfg=5.0)
    full = comfy.utils.common_upscale(small.movedim(-1, 1), W_PX, H_PX, "nearest-exact", "center")
    seen = seen_windows(rec.calls, full, plan.windows, n_chunks=2, batch=1)
    assert seen == Counter({(w.y0, w.y1, w.x0, w.x1): 2 for w in plan.windows})


def test_spot_diffusion_crops_are_the_shifted_partition(pack, fx, sd15, cnet):
    """SpotDiffusion shifts its tiles, never the latent: each hint tile is the hint under its window
    (nothing wraps around the canvas edge), the windows of every step cover the canvas in the run's
    few fixed shapes (each core in a window of the tile's size or the longest edge piece's), and
    the partition moves from step to step."""
    control, rec = cnet
    img = gradient(1)
    pos, neg = conds(fx)
    pos, neg = with_control((pos, neg), control, img)
    m = tiled(pack, fx, sd15, method="SpotDiffusion", tile_width=48, tile_height=32)
    rec.calls.clear()
    rec.timesteps.clear()
    out = fx.run_ksampler(m, pos, neg, latent(), steps=4, cfg=5.0)
    assert torch.isfinite(out).all()
    hint = img.movedim(-1, 1)[0]
    per_step = defaultdict(set)
    for (_, h), t in zip(rec.calls, rec.timesteps):
        for row in h.reshape(-1, *h.shape[-3:]):
            y = int(round(float(row[0, 0, 0]) * 1000))     # channel 0 encodes the source row
            x = int(round(float(row[1, 0, 0]) * 1000))     # channel 1 the source column
            hh, ww = row.shape[-2:]
            assert y % 8 == 0 and x % 8 == 0 and y + hh <= H_PX and x + ww <= W_PX
            assert torch.equal(row, hint[:, y:y + hh, x:x + ww])
            per_step[t].add((y, x, hh, ww))
    assert len(per_step) == 4
    for rects in per_step.values():
        cover = torch.zeros(H_PX, W_PX, dtype=torch.int32)
        for y, x, hh, ww in rects:
            cover[y:y + hh, x:x + ww] += 1
        assert bool((cover >= 1).all()), sorted(rects)
    assert len({(hh, ww) for rects in per_step.values() for _, _, hh, ww in rects}) <= 4
    assert len({frozenset(r) for r in per_step.values()}) > 1, "the partition never moved"


# --------------------------------------------------------------------------- exactness

def test_tile_control_equals_get_control_on_each_crop(pack, fx, sd15, cnet, cnet2):
    """tile_control on a batch of 3 tiles (2 cond chunks, batch 2, a chain
    of two ControlNets) == ComfyUI's get_control per tile with that tile's crop as the hint."""
    tc, td = pack.tile_control, pack.tiled_diffusion
    (c1, _), (c2, _) = cnet, cnet2
    img = gradient(2).movedim(-1, 1)
    img2 = torch.flip(img, dims=(-1,)) * 0.5
    base = sd15.model
    pre = lambda a: base.model_sampling.percent_to_sigma(a)       # noqa: E731

    def chain(h1, h2):
        a = c1.copy().set_cond_hint(h1, 0.8, (0.0, 1.0))
        b = c2.copy().set_cond_hint(h2, 1.3, (0.0, 1.0)).set_previous_controlnet(a)
        b.pre_run(base, pre)
        return b

    H, W, n, B = H_PX // 8, W_PX // 8, 2, 2
    ctl = chain(img, img2)
    to = {}
    marker = tc.ControlProxy(ctl).get_control(torch.zeros(n * B, 4, H, W), None, {}, n, to)
    wins = [pack.tile_plan.Window(0, 6, 0, 6, (0, 6, 0, 6)), pack.tile_plan.Window(2, 8, 6, 12, (2, 8, 6, 12)),
            pack.tile_plan.Window(2, 8, 3, 9, (2, 8, 3, 9))]
    k = len(wins)
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(n * k * B, 4, 6, 6, generator=g)
    tt = torch.full((n * k * B,), 3.0)
    ctx = torch.randn(n * k * B, 77, 64, generator=g)
    out = marker.tile_control(xt, tt, {"c_crossattn": ctx, "transformer_options": to},
                              td.TileBatch(tuple(wins), H, W, n))
    for j, w in enumerate(wins):
        rows = torch.tensor([ch * k * B + j * B + b for ch in range(n) for b in range(B)])
        crop = lambda im: im[..., w.y0 * 8:w.y1 * 8, w.x0 * 8:w.x1 * 8]   # noqa: E731
        ref = chain(crop(img), crop(img2)).get_control(xt[rows], tt[rows], {"c_crossattn": ctx[rows]}, n, to)
        for key in ("input", "middle", "output"):
            assert len(out[key]) == len(ref[key])
            for a, r in zip(out[key], ref[key]):
                assert (a is None) == (r is None)
                if a is not None:
                    torch.testing.assert_close(a[rows], r, rtol=1e-4, atol=1e-5)
    # each control of the chain prepared once at the canvas size, kept in the call's cache, not the control
    prepared = [hint for _, hint in marker.hints.values()]
    assert len(prepared) == 2 and all(h.shape[-2:] == (H_PX, W_PX) for h in prepared)
    assert ctl.cond_hint is None and ctl.previous_controlnet.cond_hint is None


@pytest.mark.parametrize("chain", [1, 2])
def test_one_tile_with_control_equals_untiled(pack, fx, sd15, cnet, cnet2, chain):
    pos, neg = conds(fx)
    img = gradient(1)
    for (control, _), s, start in ((cnet, 0.9, 0.0), (cnet2, 1.2, 0.4))[:chain]:
        pos, neg = with_control((pos, neg), control, img, s, start, 1.0)
    lat = latent()
    ref = fx.run_ksampler(sd15, pos, neg, lat, steps=STEPS, cfg=5.0)
    out = fx.run_ksampler(tiled(pack, fx, sd15, tile_width=W_PX, tile_height=H_PX), pos, neg, lat,
                          steps=STEPS, cfg=5.0)
    assert torch.equal(out, ref)
    no_ctl = fx.run_ksampler(sd15, *conds(fx), lat, steps=STEPS, cfg=5.0)
    assert not torch.allclose(ref, no_ctl, atol=1e-3), "the control has no visible effect"


def test_chain_of_two_each_sees_its_own_crop(pack, fx, sd15, cnet, cnet2):
    (c1, r1), (c2, r2) = cnet, cnet2
    img1, img2 = gradient(1), gradient(1) * 0.5
    pos, neg = conds(fx)
    pos, neg = with_control(with_control((pos, neg), c1, img1), c2, img2)
    m = tiled(pack, fx, sd15, tile_batch_size=3)
    plan = plan_of(pack, m)
    r1.calls.clear()
    r2.calls.clear()
    fx.run_ksampler(m, pos, neg, latent(), steps=2, cfg=5.0)
    expected = Counter({(w.y0, w.y1, w.x0, w.x1): 2 for w in plan.windows})
    assert seen_windows(r1.calls, img1.movedim(-1, 1), plan.windows, 2, 1) == expected
    assert seen_windows(r2.calls, img2.movedim(-1, 1), plan.windows, 2, 1) == expected


def test_strength_zero_and_outside_timestep_range_equal_no_control(pack, fx, sd15, cnet):
    control, rec = cnet
    img = gradient(1)
    pos, neg = conds(fx)
    m = tiled(pack, fx, sd15)
    lat = latent()
    ref = fx.run_ksampler(m, pos, neg, lat, steps=STEPS, cfg=5.0)
    # strength 0: the control runs per tile and adds exactly nothing
    rec.calls.clear()
    out = fx.run_ksampler(m, *with_control((pos, neg), control, img, 0.0), lat, steps=STEPS, cfg=5.0)
    assert len(rec.calls) > 0
    assert torch.equal(out, ref)
    # outside its range at every step (start = end = 100%): never runs, exactly no control
    rec.calls.clear()
    out = fx.run_ksampler(m, *with_control((pos, neg), control, img, 1.0, 1.0, 1.0), lat, steps=STEPS, cfg=5.0)
    assert rec.calls == []
    assert torch.equal(out, ref)


def test_partial_timestep_range_runs_on_the_same_steps_as_untiled(pack, fx, sd15, cnet):
    control, rec = cnet
    img = gradient(1)
    pn = with_control(conds(fx), control, img, 1.0, 0.5, 1.0)     # second half of the steps only
    m = tiled(pack, fx, sd15)
    n_tiles = len(plan_of(pack, m).windows)
    lat = latent()
    rec.calls.clear()
    fx.run_ksampler(sd15, *pn, lat, steps=3, cfg=5.0)
    untiled_steps = len(rec.calls)
    assert 0 < untiled_steps < 3
    rec.calls.clear()
    fx.run_ksampler(m, *pn, lat, steps=3, cfg=5.0)
    tiles_seen = sum(h.shape[0] // 2 for _, h in rec.calls)
    assert tiles_seen == untiled_steps * n_tiles


# --------------------------------------------------------------------------- T2I adapter

def test_t2i_adapter_per_tile(pack, fx, sd15):
    adapter, rec = tiny_t2i(fx, 21)
    img = gradient(1)
    pos, neg = conds(fx)
    pos, neg = with_control((pos, neg), adapter, img)
    lat = latent()
    ref = fx.run_ksampler(sd15, pos, neg, lat, steps=2, cfg=5.0)
    one = fx.run_ksampler(tiled(pack, fx, sd15, tile_width=W_PX, tile_height=H_PX), pos, neg, lat, steps=2,
                          cfg=5.0)
    assert torch.equal(one, ref)
    m = tiled(pack, fx, sd15, tile_batch_size=4)
    plan = plan_of(pack, m)
    rec.calls.clear()
    out = fx.run_ksampler(m, pos, neg, lat, steps=2, cfg=5.0)
    assert torch.isfinite(out).all()
    seen = seen_windows(rec.calls, img.movedim(-1, 1), plan.windows, n_chunks=2, batch=1)
    assert seen == Counter({(w.y0, w.y1, w.x0, w.x1): 2 for w in plan.windows})


# --------------------------------------------------------------------------- memory

class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op creates (no ComfyUI function is replaced)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def canvas_violations(shapes, n_rows, w_px=W_PX, h_px=H_PX, latent_ch=4, hint_ch=3):
    """Tensors holding more than the sampler's own canvas latents or the hint image itself:
    latent-canvas-sized with more than n_rows x latent channels, pixel-canvas-sized with more
    than hint channels."""
    H, W = h_px // 8, w_px // 8
    bad = []
    for s in shapes:
        if len(s) >= 3 and s[-2:] == (H, W) and int(torch.tensor(s[:-2]).prod()) > n_rows * latent_ch:
            bad.append(s)
        if len(s) >= 3 and s[-2:] == (h_px, w_px) and int(torch.tensor(s[:-2]).prod()) > hint_ch:
            bad.append(s)
    return bad


def largest(shapes):
    return max(int(torch.tensor(s).prod()) for s in shapes if len(s))


def test_memory_is_bounded_by_the_tile_batch(pack, fx, sd15, cnet):
    """Every tensor created while sampling (recorded at the aten level): no canvas-sized control or
    unet pass, no canvas x channels x tile-batch tensor, and the largest tensor is the same on a
    canvas with 4x the pixels (it is set by the tile batch, not the canvas)."""
    control, rec = cnet
    m = tiled(pack, fx, sd15, tile_batch_size=4)
    logs = {}
    for scale in (1, 2):
        w, h = W_PX * scale, H_PX * scale
        pn = with_control(conds(fx), control, gradient(1, w=w, h=h))
        with ShapeLog() as logs[scale]:
            fx.run_ksampler(m, *pn, latent(w=w, h=h), steps=1, cfg=5.0)
        # the largest latent-canvas tensor is the sampler's own cond+uncond x; pixel-canvas: the hint
        assert canvas_violations(logs[scale].shapes, n_rows=2, w_px=w, h_px=h) == []
    with ShapeLog() as plain:
        fx.run_ksampler(sd15, *with_control(conds(fx), control, gradient(1)), latent(), steps=1, cfg=5.0)
    assert canvas_violations(plain.shapes, n_rows=2)      # the check does see an untiled control pass
    assert largest(logs[2].shapes) == largest(logs[1].shapes)
    print(f"largest tensor: tiled {largest(logs[1].shapes)} elements on {W_PX}x{H_PX}px and "
          f"{largest(logs[2].shapes)} on {2 * W_PX}x{2 * H_PX}px; untiled {largest(plain.shapes)} on {W_PX}x{H_PX}px")


@pytest.mark.parametrize("kind", ["area", "mask"])
def test_regional_prompt_with_control(pack, fx, sd15, cnet, monkeypatch, kind):
    """A control on a regional prompt. Area: ComfyUI fits the whole hint to the area, and the area's
    calls are evaluated on the canvas windows clipped to it. Plain mask: its prompt's rows are
    evaluated apart from the others, on the windows its mask touches, with their control rows. Both
    match untiled when one tile covers the canvas; with small tiles the mask prompt matches the
    evaluation on every window."""
    import nodes as comfy_nodes
    control, _ = cnet
    pos, neg = conds(fx)
    dog = fx.tiny_conditioning("a dog")
    if kind == "area":
        (region,) = comfy_nodes.ConditioningSetArea().append(dog, 64, 48, 16, 8, 1.0)
    else:
        mask = torch.zeros(1, H_PX, W_PX)
        mask[:, 8:24, 8:24] = 1.0                          # inside the top-left tiles only
        (region,) = comfy_nodes.ConditioningSetMask().append(dog, mask, "default", 1.0)
    pos = comfy_nodes.ConditioningCombine().combine(pos, region)[0]
    pn = with_control((pos, neg), control, gradient(1))
    lat = latent()
    ref = fx.run_ksampler(sd15, *pn, lat, steps=2, cfg=5.0)
    out = fx.run_ksampler(tiled(pack, fx, sd15, tile_width=W_PX, tile_height=H_PX), *pn, lat, steps=2, cfg=5.0)
    assert torch.equal(out, ref)
    small = tiled(pack, fx, sd15, tile_width=32, tile_height=32)
    out = fx.run_ksampler(small, *pn, lat, steps=2, cfg=5.0)
    assert torch.isfinite(out).all()
    if kind == "mask":
        monkeypatch.setattr(pack.regional, "chunk_masks", lambda *a, **k: None)     # every window
        every = fx.run_ksampler(small, *pn, lat, steps=2, cfg=5.0)
        torch.testing.assert_close(out, every, atol=1e-3, rtol=0)
        assert float((out - every).abs().mean() / every.std()) < 1e-6


def test_per_image_layouts_take_each_items_own_hint(pack, fx, sd15, cnet):
    """An IMAGE batch with a layout per image: the engine runs each latent batch item on its own
    plan; every item's control must use that item's hint image."""
    control, rec = cnet
    flat = torch.full((1, H_PX, W_PX, 3), 0.5)
    busy = torch.rand((1, H_PX, W_PX, 3), generator=torch.Generator().manual_seed(0))
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=torch.cat([flat, busy]), content_threshold=10.0,
                             min_tile_size=32, min_denoise=1.0, max_denoise=1.0, line_thickness=0,
                             max_tile_size=1024)
    assert isinstance(layout, tuple) and len(layout) == 2
    img = gradient(2)
    pn = with_control(conds(fx), control, img)
    m = tiled(pack, fx, sd15, quadtree=layout, tile_overlap=0)
    engine = m.model_options["model_function_wrapper"]
    plans = [pack.tiled_diffusion.plan_for(engine.cfg, H=H_PX // 8, W=W_PX // 8, compression=8, align=1,
                                           device="cpu", dtype=torch.float32, item=i)
             for i in range(2)]
    assert len(plans[0].windows) != len(plans[1].windows)
    rec.calls.clear()
    out = fx.run_ksampler(m, *pn, latent(2), steps=1, cfg=5.0)
    assert torch.isfinite(out).all()
    hints = img.movedim(-1, 1)
    seen = [Counter(), Counter()]
    for _, h in rec.calls:
        for row in h[: max(1, h.shape[0] // 2)]:          # one cond chunk
            hits = [i for i in range(2) if window_of(row, hints[i], plans[i].windows) is not None]
            assert len(hits) == 1, "a hint tile that is no window of its own item's image"
            seen[hits[0]][window_of(row, hints[hits[0]], plans[hits[0]].windows)] += 1
    for i in range(2):
        assert seen[i] == Counter({(w.y0, w.y1, w.x0, w.x1): 1 for w in plans[i].windows})


# --------------------------------------------------------------------------- latent-input ControlNet

class LatentVAE:
    """Duck-typed VAE with 16 latent channels (what a latent-input ControlNet encodes its hint
    with): 8x8 average pool and a fixed 3 -> 16 map; records every encode."""

    def __init__(self):
        self.map = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
        self.calls = []

    def spacial_compression_encode(self):
        return 8

    def encode(self, pixels):
        self.calls.append(tuple(pixels.shape))
        px = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)
        return torch.einsum("lc,bchw->blhw", self.map, px)


def tiny_flux(fx):
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = fx.tiny_flux_config()
    config = sm.Flux(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = mb.Flux(config, device=torch.device("cpu"))
    fx.init_module_(model.diffusion_model, 0)
    return fx._patcher(model.eval()), cfg


def tiny_flux_instantx(fx, cfg, seed):
    """A real InstantX-style FLUX ControlNet (latent input, 16 channels), built like
    comfy.controlnet.load_controlnet_flux_instantx builds it."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.ops
    net = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, control_latent_channels=16,
                                                   operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                                   device=torch.device("cpu"), **cfg)
    fx.init_module_(net, seed)
    rec = Recorder(net.eval())
    control = comfy.controlnet.ControlNet(rec, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                          load_device=torch.device("cpu"), extra_conds=["y", "guidance"])
    return control, rec


def test_latent_input_controlnet_crops_the_encoded_hint(pack, fx):
    """A latent-input ControlNet (SD3/FLUX union/InstantX style): the hint is VAE-encoded once per
    run at the canvas size (as ComfyUI does untiled) and each tile gets its crop in latent units."""
    import comfy.latent_formats
    flux, cfg = tiny_flux(fx)
    control, rec = tiny_flux_instantx(fx, cfg, 31)
    vae = LatentVAE()
    img = gradient(1)
    pn = with_control(conds(fx), control, img, vae=vae)
    lat = torch.randn(1, 16, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(3))
    ref = fx.run_ksampler(flux, *pn, lat, steps=2, cfg=3.0, denoise=0.9)
    one = fx.run_ksampler(tiled(pack, fx, flux, tile_width=W_PX, tile_height=H_PX), *pn, lat, steps=2, cfg=3.0,
                          denoise=0.9)
    assert torch.equal(one, ref)
    m = tiled(pack, fx, flux)
    plan = plan_of(pack, m)
    vae.calls.clear()
    rec.calls.clear()
    out = fx.run_ksampler(m, *pn, lat, steps=2, cfg=3.0, denoise=0.9)
    assert torch.isfinite(out).all()
    assert vae.calls == [(1, H_PX, W_PX, 3)]          # encoded once, the whole canvas
    encoded = comfy.latent_formats.Flux().process_in(vae.encode(img))
    seen = seen_windows(rec.calls, encoded, plan.windows, n_chunks=2, batch=1, s=1)
    assert seen == Counter({(w.y0, w.y1, w.x0, w.x1): 2 for w in plan.windows})


# --------------------------------------------------------------------------- multi-GPU path
# ComfyUI's multi-GPU path (``MultiGPU CFG Split``, 0.23+) runs ``_calc_cond_batch_multigpu`` when
# ``model_options['multigpu_clones']`` maps devices to model patchers: it calls the unet function
# wrapper with each device's ``apply_model`` and asks each control for
# ``get_instance_for_device(device)``.  Two GPUs cannot be had here, so the same code path runs
# with one device (the CPU) and a ControlNet with a registered per-device clone.

def _has_multigpu_path():
    import comfy.samplers
    return hasattr(comfy.samplers, "_calc_cond_batch_multigpu")


def _has_per_device_controls():
    import comfy.controlnet
    return hasattr(comfy.controlnet.ControlBase, "deepclone_multigpu")


def test_proxy_without_a_per_device_instance_answers_with_itself(pack, cnet):
    """Where the control has no per-device instance (no clone registered, or no such method, as before
    ComfyUI 0.23), get_instance_for_device on our proxy gives a proxy of the control itself."""
    tc = pack.tile_control
    control, _ = cnet
    ctl = control.copy()
    assert tc.ControlProxy(ctl).get_instance_for_device(torch.device("cpu"))._control is ctl


@pytest.mark.skipif("not _has_per_device_controls()",
                    reason="this ComfyUI's controls have no per-device clones (deepclone_multigpu, added in 0.23)")
def test_proxy_answers_for_each_device_with_a_deferred_proxy(pack, cnet):
    """get_instance_for_device on our proxy gives a proxy (control stays deferred, per tile) of the
    control's instance for that device, one per device."""
    tc = pack.tile_control
    control, _ = cnet
    cpu = torch.device("cpu")
    ctl = control.copy()
    clone = ctl.deepclone_multigpu(cpu, autoregister=True)
    proxy = tc.ControlProxy(ctl)
    per_device = proxy.get_instance_for_device(cpu)
    assert isinstance(per_device, tc.ControlProxy) and per_device._control is clone
    assert proxy.get_instance_for_device(cpu) is per_device
    assert per_device.get_control(torch.zeros(2, 4, 8, 12), None, {}, 2, {}).control is clone


@pytest.mark.skipif("not _has_multigpu_path()", reason="this ComfyUI has no multi-GPU path (added in 0.23)")
def test_multigpu_path_samples_tiles_with_the_devices_control(pack, fx, sd15, cnet):
    """Through the multi-GPU code path: the same result as the ordinary tiled path, control computed
    by the device's clone, per tile, each tile with its own crop."""
    control, _ = cnet
    img = gradient(1)
    device_controls = []

    def with_device_clone(c):
        device_controls.append(c.deepclone_multigpu(torch.device("cpu"), autoregister=True))
        return c

    pos, neg = with_control(conds(fx), control, img, make=with_device_clone)
    m = tiled(pack, fx, sd15, tile_batch_size=2)
    plan = plan_of(pack, m)
    ref = fx.run_ksampler(m, pos, neg, latent(), steps=STEPS, cfg=5.0)
    (dev,) = device_controls
    rec = dev.control_model            # the device clone's own (deep-copied) recorder
    rec.calls.clear()
    mg = m.clone()
    mg.model_options["multigpu_clones"] = {mg.load_device: mg}
    out = fx.run_ksampler(mg, pos, neg, latent(), steps=STEPS, cfg=5.0)
    assert torch.equal(out, ref)
    assert rec.calls, "the device's control clone was never called"
    assert all(x[-2:] == (TILE // 8, TILE // 8) for x, _ in rec.calls)
    seen = seen_windows(rec.calls, img.movedim(-1, 1), plan.windows, n_chunks=2, batch=1)
    assert seen == Counter({(w.y0, w.y1, w.x0, w.x1): STEPS for w in plan.windows})
