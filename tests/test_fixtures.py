"""The test fixtures themselves: real ComfyUI classes, finite, deterministic, and the local
model really has the receptive field it claims."""
import os
import sys

import pytest
import torch

import qtd_fixtures as fx


def _apply(model, x, sigma, cond, c_concat=None):
    """One raw BaseModel.apply_model call (denoised prediction) with a CONDITIONING's tensor."""
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([float(sigma)] * x.shape[0]),
                                       c_concat=c_concat, c_crossattn=cond[0][0])


def test_runs_on_cpu_with_comfyui_modules():
    import comfy.model_management as mm
    import nodes as comfy_nodes

    assert mm.get_torch_device().type == "cpu"
    assert mm.cpu_state == mm.CPUState.CPU
    comfy_root = os.path.realpath(fx.default_comfy_path())
    assert os.path.realpath(comfy_nodes.__file__) == os.path.join(comfy_root, "nodes.py")
    assert not any(os.path.realpath(p or os.getcwd()) == os.path.realpath(fx.REPO_ROOT) for p in sys.path), \
        "the repo root must not be on sys.path (its nodes.py would shadow ComfyUI's)"


def test_tiny_sd15_is_a_real_comfy_model():
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = fx.tiny_sd15(0)
    assert isinstance(m, comfy.model_patcher.ModelPatcher)
    assert type(m.model) is comfy.model_base.BaseModel
    assert isinstance(m.model.model_config, comfy.supported_models.SD15)
    assert isinstance(m.model.diffusion_model, UNetModel)
    assert m.load_device.type == "cpu"
    for name, p in m.model.diffusion_model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_tiny_sd15_step_is_finite_deterministic():
    m = fx.tiny_sd15(0)
    cond = fx.tiny_conditioning("a photo of a cat")
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    out = _apply(m, x, 5.0, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.std() > 0
    assert torch.equal(out, _apply(m, x, 5.0, cond)), "same model, same input: same output"
    assert torch.equal(out, _apply(fx.tiny_sd15(0), x, 5.0, cond)), "same seed, same weights"
    assert not torch.equal(out, _apply(fx.tiny_sd15(1), x, 5.0, cond)), "seed changes the weights"


@pytest.mark.parametrize("factory", [fx.local_model, fx.tiny_sd15], ids=["local", "tiny_sd15"])
def test_cond_and_uncond_give_different_outputs(factory):
    m = factory(0)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    pos, neg = fx.tiny_conditioning("a red car"), fx.tiny_conditioning("")
    a, b = _apply(m, x, 3.0, pos), _apply(m, x, 3.0, neg)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().mean() > 1e-3


def test_local_model_reads_the_timestep():
    m = fx.local_model(0)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = fx.tiny_conditioning("x")
    with torch.no_grad():
        net = m.model.diffusion_model
        e1 = net(x, torch.tensor([10.0]), context=cond[0][0])
        e2 = net(x, torch.tensor([900.0]), context=cond[0][0])
    assert (e1 - e2).abs().mean() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_local_model_receptive_field_is_exact(seed):
    m = fx.local_model(seed)
    net = m.model.diffusion_model
    r = net.receptive_radius
    assert r == 3 and m.receptive_radius == r
    assert net.dtype == torch.float32
    h = w = 24
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))
    ctx = fx.tiny_conditioning("field")[0][0]
    py, px = 11, 13
    x2 = x.clone()
    x2[:, :, py, px] += 5.0
    with torch.no_grad():
        d = (net(x2, torch.tensor([500.0]), context=ctx) - net(x, torch.tensor([500.0]), context=ctx)).abs().amax(dim=1)[0]
    changed = (d > 1e-6).nonzero().tolist()
    assert changed, "perturbation had no effect"
    for yy, xx in changed:
        assert max(abs(yy - py), abs(xx - px)) <= r, (yy, xx)
    # ... and the whole (2r+1)^2 window is reached (the radius is not overstated)
    assert d[py - r, px - r] > 1e-6 and d[py + r, px + r] > 1e-6


def test_local_model_is_translation_equivariant():
    m = fx.local_model(0)
    net = m.model.diffusion_model
    r = net.receptive_radius
    x = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(4))
    ctx = fx.tiny_conditioning("shift")[0][0]
    t = torch.tensor([250.0])
    with torch.no_grad():
        full = net(x, t, context=ctx)
        crop = net(x[:, :, 8:32, 4:36], t, context=ctx)
    # away from the crop border (r pixels) the crop's output equals the full output
    torch.testing.assert_close(crop[:, :, r:-r, r:-r], full[:, :, 8 + r:32 - r, 4 + r:36 - r], rtol=1e-5, atol=1e-5)


def test_local_model_through_base_model_matches_its_radius():
    """BaseModel's input scaling / denoised formula are per-pixel: the radius survives."""
    m = fx.local_model(0)
    r = m.receptive_radius
    x = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(5)) * 4
    x2 = x.clone()
    x2[:, :, 10, 10] -= 3.0
    cond = fx.tiny_conditioning("p")
    d = (_apply(m, x2, 4.0, cond) - _apply(m, x, 4.0, cond)).abs().amax(dim=1)[0]
    ys, xs = (d > 1e-6).nonzero(as_tuple=True)
    assert ys.numel() > 0
    assert (ys - 10).abs().max() <= r and (xs - 10).abs().max() <= r


def test_local_inpaint_model_receives_c_concat():
    m = fx.local_inpaint_model(0)
    net = m.model.diffusion_model
    assert net.in_channels == 9
    assert m.model.concat_keys == ("mask", "masked_image")
    net.record = True
    try:
        x = torch.randn(1, 4, 16, 16)
        c_concat = torch.cat([torch.ones(1, 1, 16, 16), torch.full((1, 4, 16, 16), 0.25)], dim=1)
        out = _apply(m, x, 2.0, fx.tiny_conditioning("inpaint"), c_concat=c_concat)
    finally:
        net.record = False
    assert out.shape == x.shape and torch.isfinite(out).all()
    seen = net.calls[-1]["x"]
    assert seen.shape == (1, 9, 16, 16)
    torch.testing.assert_close(seen[:, 4:], c_concat)
    net.calls.clear()


def test_tiny_conditioning_format_and_determinism():
    c = fx.tiny_conditioning("hello", dim=64)
    assert isinstance(c, list) and len(c) == 1 and len(c[0]) == 2
    cond, extra = c[0]
    assert cond.shape == (1, 77, 64) and extra["pooled_output"].shape == (1, 64)
    assert torch.equal(cond, fx.tiny_conditioning("hello")[0][0])
    assert not torch.equal(cond, fx.tiny_conditioning("hellp")[0][0])
    assert not torch.equal(cond, fx.tiny_conditioning("hello", seed=1)[0][0])
    assert fx.tiny_conditioning("x", dim=32, pooled_dim=16)[0][1]["pooled_output"].shape == (1, 16)


def test_fixture_clip_works_with_comfy_clip_text_encode():
    import nodes as comfy_nodes

    (cond,) = comfy_nodes.CLIPTextEncode().encode(fx.FixtureCLIP(), "a lighthouse")
    ref = fx.tiny_conditioning("a lighthouse")
    assert torch.equal(cond[0][0], ref[0][0])
    assert torch.equal(cond[0][1]["pooled_output"], ref[0][1]["pooled_output"])


def test_fixture_vae_with_comfy_vae_nodes():
    import nodes as comfy_nodes

    vae = fx.FixtureVAE()
    # blocky image -> exact round trip
    blocks = torch.rand(1, 6, 5, 3, generator=torch.Generator().manual_seed(6))
    img = blocks.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 48 x 40
    (lat,) = comfy_nodes.VAEEncode().encode(vae, img)
    assert lat["samples"].shape == (1, 4, 6, 5)
    (dec,) = comfy_nodes.VAEDecode().decode(vae, lat)
    assert dec.shape == img.shape
    torch.testing.assert_close(dec, img, atol=1e-5, rtol=0)
    (lat_t,) = comfy_nodes.VAEEncodeTiled().encode(vae, img, 512, 64)
    torch.testing.assert_close(lat_t["samples"], lat["samples"])
    (dec_t,) = comfy_nodes.VAEDecodeTiled().decode(vae, lat, 512, 64)
    torch.testing.assert_close(dec_t, dec)
    # non-multiple-of-8 sizes are center-cropped like ComfyUI's VAE
    (lat2,) = comfy_nodes.VAEEncode().encode(vae, torch.rand(1, 50, 43, 3))
    assert lat2["samples"].shape == (1, 4, 6, 5)
    # decoded output is clamped to the image range
    (dec2,) = comfy_nodes.VAEDecode().decode(vae, {"samples": torch.randn(1, 4, 4, 4) * 20})
    assert dec2.min() >= 0 and dec2.max() <= 1 and dec2.shape == (1, 32, 32, 3)


def test_fixture_vae_encode_for_inpaint():
    import nodes as comfy_nodes

    vae = fx.FixtureVAE()
    img = fx.synthetic_photo(64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (lat,) = comfy_nodes.VAEEncodeForInpaint().encode(vae, img, mask, 6)
    assert lat["samples"].shape == (1, 4, 8, 8)
    assert lat["noise_mask"].shape[-2:] == (64, 64)


@pytest.mark.parametrize("kind", ["tiny_sd15", "local", "local_inpaint"])
def test_run_ksampler_euler_4_steps(kind):
    model = fx.make_model(kind, 0)
    pos, neg = fx.tiny_conditioning("a castle"), fx.tiny_conditioning("")
    latent = fx.empty_latent(256, 256)
    out = fx.run_ksampler(model, pos, neg, latent, seed=7, steps=4, cfg=7.0,
                          sampler_name="euler", scheduler="normal", denoise=1.0)
    assert out.shape == (1, 4, 32, 32)
    assert torch.isfinite(out).all() and out.std() > 0
    again = fx.run_ksampler(model, pos, neg, latent["samples"], seed=7, steps=4)
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other = fx.run_ksampler(model, pos, neg, latent, seed=8, steps=4)
    assert not torch.equal(out, other)


def test_run_ksampler_partial_denoise_keeps_structure():
    model = fx.local_model(0)
    vae = fx.FixtureVAE()
    img = fx.synthetic_photo(128, 128)
    lat = vae.encode(img)
    pos, neg = fx.tiny_conditioning("a landscape"), fx.tiny_conditioning("")
    lo = fx.run_ksampler(model, pos, neg, lat, seed=1, steps=4, denoise=0.2)
    hi = fx.run_ksampler(model, pos, neg, lat, seed=1, steps=4, denoise=1.0)
    assert (lo - lat).abs().mean() < (hi - lat).abs().mean()


def test_local_model_sampling_is_bounded_and_decodes_to_a_varied_image():
    model = fx.local_model(0)
    out = fx.run_ksampler(model, fx.tiny_conditioning("p"), fx.tiny_conditioning(""),
                          fx.empty_latent(512, 384), seed=0, steps=4, cfg=7.0)
    assert out.abs().max() < 100
    img = fx.FixtureVAE().decode(out)
    assert img.shape == (1, 384, 512, 3)
    assert img.std() > 0.01


def test_synthetic_photo_has_flat_and_detailed_regions():
    img = fx.synthetic_photo(512, 512)
    assert img.shape == (1, 512, 512, 3) and img.min() >= 0 and img.max() <= 1
    sky = img[0, :128, :128].std(dim=(0, 1)).max()  # per-channel spatial spread
    texture = img[0, -128:, -128:].std(dim=(0, 1)).min()
    assert sky < 0.1 < texture
    assert torch.equal(img, fx.synthetic_photo(512, 512))


def test_call_node_and_defaults_with_a_comfy_node():
    import nodes as comfy_nodes

    defaults = fx.node_input_defaults(comfy_nodes.EmptyLatentImage)
    assert defaults == {"width": 512, "height": 512, "batch_size": 1}
    (lat,) = fx.call_node(comfy_nodes.EmptyLatentImage, width=64, height=32, batch_size=1)
    assert lat["samples"].shape == (1, 4, 4, 8)


def test_fixture_nodes_package_in_process(tmp_path):
    """tests/fixture_nodes loads (via a symlink, like in a server) and its nodes return fixtures."""
    import importlib.util

    import comfy.model_patcher

    link = tmp_path / "qtd_test_fixture_nodes"
    link.symlink_to(os.path.join(fx.TESTS_DIR, "fixture_nodes"), target_is_directory=True)
    # the way ComfyUI's nodes.load_custom_node imports a custom node folder
    name = str(link).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, str(link / "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    loader = mod.NODE_CLASS_MAPPINGS["QTDTestCheckpointLoader"]
    assert loader.INPUT_TYPES()["required"]["kind"][0] == ["tiny_sd15", "local", "local_inpaint", "tiny_wan"]
    model, clip, vae = fx.call_node(loader, kind="local", seed=3)
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert model.receptive_radius == 3
    (cond,) = fx.call_node(mod.NODE_CLASS_MAPPINGS["QTDTestConditioning"], text="abc")
    assert torch.equal(cond[0][0], fx.tiny_conditioning("abc")[0][0])
