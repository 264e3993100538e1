"""Controls from other packs that subclass ComfyUI's ``ControlBase`` (Advanced-ControlNet style), per tile
(issue 12).

:class:`KeyframedControl` is such a control: its own ``get_control`` and ``copy``, its own hint preparation
cached in ``cond_hint`` (re-prepared when the latent's size changes), and per-step state in the style of
Advanced-ControlNet's timestep keyframes: an index into a keyframe schedule that advances as the timestep
falls, giving the step's strength, plus a history of the timesteps it was called at.  Its control is a
projection of its hint added to the tiny SD1.5 UNet's middle block.

Through ComfyUI's KSampler at tile batch 1 and 4: every call's prepared hint is, row by row, the hint's
crop under the window that row of the model input came from; its keyframe state is the one for that
call's timestep (so every tile of a step gets the step's strength); the control object the user attached
is never written to; one tile equals untiled; and the control changes the result.
"""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")     # tiny models: see conftest

W_PX = H_PX = 128           # 16 x 16 latent
TILE = 64                   # 8 x 8 latent tiles, 9 of them with a 32-px overlap
LOG: list = []


def make_control_class():
    import comfy.controlnet
    import comfy.utils

    class KeyframedControl(comfy.controlnet.ControlBase):
        """An Advanced-ControlNet-style control of another pack (see the module docstring)."""

        KEYFRAMES = ((1000.0, 1.0), (500.0, 0.6), (100.0, 0.3))       # (from timestep, strength)

        def __init__(self, proj):
            super().__init__()
            self.proj = proj
            self.kf_index = 0          # per-step state: advances as t falls
            self.history = []          # per-call state

        def copy(self):
            c = KeyframedControl(self.proj)
            self.copy_to(c)
            return c

        def keyframe(self, t: float) -> int:
            i = self.kf_index
            while i + 1 < len(self.KEYFRAMES) and t <= self.KEYFRAMES[i + 1][0]:
                i += 1
            return i

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options, *args, **kwargs):
            prev = None
            if self.previous_controlnet is not None:
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            t0 = float(t.reshape(-1)[0])
            self.kf_index = self.keyframe(t0)
            self.history.append(t0)
            size = (x_noisy.shape[-2] * self.compression_ratio, x_noisy.shape[-1] * self.compression_ratio)
            if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != size:
                self.cond_hint = comfy.utils.common_upscale(self.cond_hint_original, size[1], size[0],
                                                            self.upscale_algorithm, "center")
            hint = comfy.controlnet.broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
            strength = self.KEYFRAMES[self.kf_index][1]
            LOG.append({"x": x_noisy.detach().clone(), "hint": hint.detach().clone(), "t": t0,
                        "strength": strength, "self": self})
            feat = torch.nn.functional.avg_pool2d(hint.to(x_noisy.dtype), 2 * self.compression_ratio)
            out = {"middle": [self.proj(feat) * strength]}
            return self.control_merge(out, prev, x_noisy.dtype)

    return KeyframedControl



def gradient():
    """IMAGE-as-hint [1, 3, H, W]: every pixel distinct."""
    yy, xx = torch.meshgrid(torch.arange(H_PX, dtype=torch.float32), torch.arange(W_PX, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([yy / H_PX, xx / W_PX, torch.sin(yy * 0.37 + xx * 0.11)])[None]


def attach(pos_neg, control):
    out = []
    for conds in pos_neg:
        out.append([[c, dict(o, control=control, control_apply_to_uncond=False)] for c, o in conds])
    return tuple(out)


@pytest.fixture(scope="module")
def setup(fx):
    proj = torch.nn.Conv2d(3, 64, 1)
    fx.init_module_(proj, 21)
    Keyframed = make_control_class()
    control = Keyframed(proj)
    control.set_cond_hint(gradient(), 1.0, (0.0, 1.0))
    pos, neg = attach((fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")), control)
    return fx.tiny_sd15(0), control, pos, neg


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(tile_width=TILE, tile_height=TILE, tile_overlap=32, tile_batch_size=1, method="Mixture of Diffusers"),
        **kw})


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_subclass_control_gets_its_tile(pack, fx, setup, tile_batch):
    model, control, pos, neg = setup
    LOG.clear()
    lat = fx.position_latent(4, H_PX // 8, W_PX // 8)
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=tile_batch), pos, neg, lat, steps=3, cfg=3.0,
                          denoise=0.03, scheduler="simple")
    assert torch.isfinite(out).all()
    hint = gradient()[0]
    canvas = model.model.process_latent_in(lat)[0]      # the sampler's x is in the model's latent space
    seen = set()
    assert LOG
    steps = {}
    for call in LOG:
        x, h = call["x"], call["hint"]
        rows, (th, tw) = x.shape[0], x.shape[-2:]
        assert (th, tw) == (TILE // 8, TILE // 8)
        assert h.shape[0] in (1, rows) and tuple(h.shape[-2:]) == (th * 8, tw * 8)
        for r in range(rows):
            y0, x0 = fx.window_of(x[r], canvas)
            seen.add((y0, x0))
            assert torch.equal(h[r if h.shape[0] == rows else 0], hint[:, y0 * 8:(y0 + th) * 8, x0 * 8:(x0 + tw) * 8])
        # per-step state: the keyframe of this call's own timestep
        assert call["self"] is not control
        assert call["strength"] == control.KEYFRAMES[control.keyframe(call["t"])][1]
        steps.setdefault(call["t"], set()).add(call["strength"])
    assert seen == {(y, x) for y in (0, 4, 8) for x in (0, 4, 8)}
    assert all(len(s) == 1 for s in steps.values()), "tiles of one step got different keyframe strengths"
    assert control.history == [] and control.kf_index == 0 and control.cond_hint is None, \
        "a tile copy wrote to the control the user attached"


def test_subclass_control_one_tile_equals_untiled_and_acts(pack, fx, setup):
    model, control, pos, neg = setup
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, 4, H_PX // 8, W_PX // 8, generator=g)
    ref = fx.run_ksampler(model, pos, neg, lat, steps=3, cfg=3.0, denoise=0.8)
    one = fx.run_ksampler(tiled(pack, fx, model, tile_width=W_PX, tile_height=H_PX, tile_overlap=0), pos, neg, lat,
                          steps=3, cfg=3.0, denoise=0.8)
    assert torch.equal(one, ref)
    plain = fx.run_ksampler(tiled(pack, fx, model), fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry"),
                            lat, steps=3, cfg=3.0, denoise=0.8)
    grid = fx.run_ksampler(tiled(pack, fx, model), pos, neg, lat, steps=3, cfg=3.0, denoise=0.8)
    assert (grid - plain).abs().max() > 1e-3, "the control changed nothing"
