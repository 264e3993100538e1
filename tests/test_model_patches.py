"""ComfyUI's model-patch controls per tile (issue 12): the patches of ``comfy_extras/nodes_model_patch.py``
live in the model's ``transformer_options['patches']``, not in the cond's ``control``.

* Qwen-Image DiffSynth ControlNet (``QwenImageDiffsynthControlnet``): each tile's patch encodes its own
  crop of the control image.  A recording subclass of ComfyUI's own patch logs, at every model call,
  the control image it holds next to the model input; each input row's window is recovered from a
  position-coded latent, and the patch's image row must be the control image's crop under it, at
  tile batch 1 and 4.  One tile equals untiled.
* USO style projector (``USOStyleReference``): its style tokens are prepended per model-input row,
  so a tile batch needs them once per row (untiled it works for one row only).
* Z-Image Fun ControlNet (``ZImageFunControlnet``, where this ComfyUI has it): the same per-tile crop
  as DiffSynth through its own (different) patch class.
* What ComfyUI added after 0.28 (issue 22), tested against faithful fixtures written from ComfyUI's
  public source (tests/upstream.py; no ComfyUI here has these classes), and against the real classes
  where the running ComfyUI has them: the Wan Uni3C camera control (``WanUni3CCnetPatch``: each tile's
  control input holds the patch's own encoding of its crop of the render, every frame handed over), and
  a DiffSynth patch with ComfyUI's own per-tile copy (``spatial_crop_inputs``: used, and its crops are
  exactly the tile's).  Both at tile batch 1 and 4, positions read back from coordinate-coded inputs.
* A patch the tiler does not know is passed on unchanged and named once per run.
"""
import logging
import types

import pytest
import torch

import qtd_families as fam
import qtd_upstream as up

pytestmark = pytest.mark.usefixtures("single_thread")     # tiny models: see conftest

LAT = 16            # latent side; 8 px per latent px
TILE = 8


class LatentVAE16:
    """A 16-channel, 8x stand-in VAE (Qwen/Wan-shaped: encode returns [B, 16, 1, h, w]); a fixed
    linear map of the 8x8 block means, so a crop's encoding is the crop of the encoding."""

    def __init__(self, channels=16, video=True):
        g = torch.Generator().manual_seed(3)
        self.map = torch.randn(channels, 3, generator=g)
        self.video = video
        self.encoded = []

    def spacial_compression_encode(self):
        return 8

    def encode(self, image):
        self.encoded.append(tuple(image.shape))
        px = image[..., :3].movedim(-1, 1).float()
        lat = torch.einsum("lc,bchw->blhw", self.map, torch.nn.functional.avg_pool2d(px, 8) * 2 - 1)
        return lat.unsqueeze(2) if self.video else lat


def position_image(h, w):
    """IMAGE [1, h, w, 3]: R = row / h, G = column / w, B = 0.5 (every crop knows where it came from)."""
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / h
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / w
    return torch.stack([ys, xs, torch.full((h, w), 0.5)], dim=-1)[None]



def recording(patch, log):
    """Turn ComfyUI's ``patch`` into an instance of a subclass that logs (its image, the model input) per call."""
    base = type(patch)

    class Recording(base):
        def __call__(self, kwargs, *a, **kw):
            if kwargs.get("block_index", 0) == 0:      # (image, model input, encoded when called)
                log.append((getattr(self, "image", None), kwargs["x"].detach().clone(),
                            getattr(self, "encoded_image", None) is not None))
            return base.__call__(self, kwargs, *a, **kw)

    patch.__class__ = Recording
    return patch


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(method="Mixture of Diffusers", tile_width=TILE * 8, tile_height=TILE * 8, tile_overlap=32,
               tile_batch_size=1),
        **kw})


# --------------------------------------------------------------------------- Qwen-Image DiffSynth

def qwen_with_diffsynth(fx, log=None):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy_extras.nodes_model_patch as nmp
    t = fam.tiny("QwenImage")
    net = nmp.QwenImageBlockWiseControlNet(num_layers=1, in_dim=64, additional_in_dim=0, dim=64,
                                           operations=comfy.ops.manual_cast)
    fx.init_module_(net, seed=11)
    mp = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    image = position_image(LAT * 8, LAT * 8)
    with torch.no_grad():       # as ComfyUI runs nodes
        (model,) = nmp.QwenImageDiffsynthControlnet().diffsynth_controlnet(model=t.model, model_patch=mp,
                                                                           vae=LatentVAE16(), image=image, strength=1.0)
    if log is not None:
        for p in model.model_options["transformer_options"]["patches"]["double_block"]:
            recording(p, log)
    return t, model, image


def assert_rows_are_crops(log, image, canvas, tile_batch, windows=None):
    """Every logged call's image holds, row by row, the control image's crop under that row's window of the
    canvas (read back from the position-coded model input); every window of the 3 x 3 grid is seen."""
    seen = set()
    assert log
    for img, x, *_ in log:
        rows = x.shape[0]
        h, w = x.shape[-2:]
        assert (h, w) == (TILE, TILE)
        assert img.shape[0] in (1, rows) and tuple(img.shape[1:3]) == (h * 8, w * 8), \
            f"the patch holds a {tuple(img.shape)} image for {rows} rows of {h}x{w} latent px"
        for r in range(rows):
            y0, x0 = fx_window(x[r], canvas)
            seen.add((y0, x0))
            expected = image[0, y0 * 8:(y0 + h) * 8, x0 * 8:(x0 + w) * 8]
            got = img[r if img.shape[0] == rows else 0]
            assert torch.equal(got, expected), f"row {r} of a {rows}-row call: not the crop at {(y0, x0)}"
        if tile_batch == 4 and rows > 2:
            assert img.shape[0] == rows
    assert seen == (windows or {(y, x) for y in (0, 4, 8) for x in (0, 4, 8)}), seen


def fx_window(row, canvas):
    import qtd_fixtures as fx
    return fx.window_of(row[:, 0] if row.ndim == 4 else row, canvas)


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_diffsynth_patch_sees_its_tile(pack, fx, tile_batch):
    log = []
    t, model, image = qwen_with_diffsynth(fx, log)
    lat = fx.position_latent(16, LAT, LAT).unsqueeze(2)          # [1, 16, 1, h, w], as ComfyUI gives Qwen-Image
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=tile_batch), t.positive, t.negative, lat,
                          steps=2, cfg=3.0, denoise=0.02)
    assert torch.isfinite(out).all()
    canvas = model.model.process_latent_in(lat)[0, :, 0]   # what the model is given (Wan21 latent format)
    assert_rows_are_crops(log, image, canvas, tile_batch)


def test_diffsynth_one_tile_equals_untiled(pack, fx):
    t, model, _ = qwen_with_diffsynth(fx)
    lat = fx.position_latent(16, LAT, LAT) / 50
    ref = fx.run_ksampler(model, t.positive, t.negative, lat, steps=2, cfg=3.0, denoise=0.8)
    one = fx.run_ksampler(tiled(pack, fx, model, tile_width=LAT * 8, tile_height=LAT * 8, tile_overlap=0),
                          t.positive, t.negative, lat, steps=2, cfg=3.0, denoise=0.8)
    assert torch.equal(one, ref)


def test_diffsynth_patch_left_unchanged(pack, fx):
    """The per-tile copies never write to the model's own patch (its encoding stays the canvas one)."""
    t, model, image = qwen_with_diffsynth(fx)
    (p,) = model.model_options["transformer_options"]["patches"]["double_block"]
    before = (p.image, p.encoded_image, p.encoded_image_size)
    lat = fx.position_latent(16, LAT, LAT) / 50
    fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=4), t.positive, t.negative, lat,
                    steps=2, cfg=3.0, denoise=0.5)
    assert p.image is before[0] and p.encoded_image is before[1] and p.encoded_image_size == before[2]


# --------------------------------------------------------------------------- USO style projector

def flux_with_uso(fx):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy_extras.nodes_model_patch as nmp
    t = fam.tiny("Flux")
    proj = nmp.SigLIPMultiFeatProjModel(siglip_token_nums=6, style_token_nums=3, siglip_token_dims=16,
                                        hidden_size=64, operations=comfy.ops.manual_cast)
    fx.init_module_(proj, seed=12)
    mp = comfy.model_patcher.ModelPatcher(proj, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    hidden = torch.randn(1, 24, 6, 16, generator=torch.Generator().manual_seed(4))
    cv = types.SimpleNamespace(all_hidden_states=hidden, penultimate_hidden_states=hidden[:, -2])
    with torch.no_grad():
        (model,) = nmp.USOStyleReference().apply_patch(model=t.model, model_patch=mp, clip_vision_output=cv)
    return t, model


class TextTokens:
    """A ``post_input`` patch set after USO's: records the text tokens the model's blocks get."""

    def __init__(self):
        self.txt = []

    def __deepcopy__(self, memo):      # the tiled model's clone keeps this one recorder
        return self

    def __call__(self, kwargs):
        self.txt.append(kwargs["txt"].detach().clone())
        return kwargs

    def to(self, device_or_dtype):
        return self

    def models(self):
        return []


def test_uso_style_tokens_per_tile_row(pack, fx):
    """cfg 1 (one row untiled, as USO needs): tiled at tile batch 4 every row of every call gets the style
    tokens in front of its text, as the untiled call has them, and one tile equals untiled."""
    t, model = flux_with_uso(fx)
    seen = TextTokens()
    model.set_model_post_input_patch(seen)
    lat = torch.randn(1, 16, LAT, LAT, generator=torch.Generator().manual_seed(2))
    ref = fx.run_ksampler(model, t.positive, t.negative, lat, steps=2, cfg=1.0, denoise=0.8)
    untiled = seen.txt[0]
    assert untiled.shape[0] == 1 and untiled.shape[1] > 3
    one = fx.run_ksampler(tiled(pack, fx, model, tile_width=LAT * 8, tile_height=LAT * 8, tile_overlap=0),
                          t.positive, t.negative, lat, steps=2, cfg=1.0, denoise=0.8)
    assert torch.equal(one, ref)
    seen.txt.clear()
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=4), t.positive, t.negative, lat, steps=2, cfg=1.0,
                          denoise=0.8)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    assert seen.txt and max(txt.shape[0] for txt in seen.txt) == 4      # calls of four tile rows
    for txt in seen.txt:
        assert txt.shape[1:] == untiled.shape[1:]
        assert torch.allclose(txt, untiled.expand_as(txt), atol=1e-6)   # style tokens + text, every row


# --------------------------------------------------------------------------- Z-Image Fun ControlNet

def zimage_with_fun_controlnet(fx, log=None):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy_extras.nodes_model_patch as nmp
    if not hasattr(nmp, "ZImageFunControlnet"):
        pytest.skip("this ComfyUI has no Z-Image Fun ControlNet patch")
    import comfy.ldm.lumina.controlnet as zc
    t = fam.tiny("ZImage")
    dm = t.model.model.diffusion_model
    net = zc.ZImage_Control(dim=dm.dim, n_heads=dm.n_heads, n_kv_heads=dm.n_heads, multiple_of=16,
                            ffn_dim_multiplier=1.0, n_control_layers=1, control_in_dim=16,
                            operations=comfy.ops.manual_cast)
    fx.init_module_(net, seed=13)
    mp = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    image = position_image(LAT * 8, LAT * 8)
    with torch.no_grad():
        (model,) = nmp.ZImageFunControlnet().diffsynth_controlnet(model=t.model, model_patch=mp,
                                                                  vae=LatentVAE16(video=False), image=image,
                                                                  strength=1.0)
    if log is not None:
        seen = set()
        for lst in model.model_options["transformer_options"]["patches"].values():
            for p in lst:
                if id(p) not in seen:
                    seen.add(id(p))
                    recording(p, log)
    return t, model, image


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_zimage_fun_controlnet_sees_its_tile(pack, fx, tile_batch):
    log = []
    t, model, image = zimage_with_fun_controlnet(fx, log)
    lat = fx.position_latent(16, LAT, LAT)
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=tile_batch), t.positive, t.negative, lat,
                          steps=2, cfg=3.0, denoise=0.02)
    assert torch.isfinite(out).all()
    assert_rows_are_crops(log, image, model.model.process_latent_in(lat)[0], tile_batch)


# --------------------------------------------------------------------------- Wan Uni3C (after 0.28)

FRAMES = 5


class VideoVAE16:
    """A Wan-shaped video VAE stand-in: frames [F, H, W, 3] -> [1, 16, (F - 1) // 4 + 1, H / 8, W / 8], every
    4th frame, a fixed linear map of the 8x8 block means (a crop's encoding is the crop of the encoding)."""

    def __init__(self):
        self.map = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))

    def spacial_compression_encode(self):
        return 8

    def temporal_compression_decode(self):
        return 4

    def encode(self, frames):
        px = frames[::4, ..., :3].movedim(-1, 1).float()               # [T, 3, H, W]
        lat = torch.einsum("lc,tchw->lthw", self.map, torch.nn.functional.avg_pool2d(px, 8) * 2 - 1)
        return lat[None]


class Uni3CNet(torch.nn.Module):
    """Stands in for ``comfy.ldm.wan.uni3c.WanUni3CControlnet``: records the control input the patch builds in
    its class's ``inputs`` (ComfyUI may deep-copy the patch with the model options); no layers, so the patch
    adds nothing to the model."""
    num_layers = 0
    inputs: list = []

    def process_input(self, controlnet_input):
        type(self).inputs.append(controlnet_input.detach().clone())
        return controlnet_input, None


def render_video(h, w, frames=FRAMES):
    """[F, h, w, 3]: R = row / h, G = column / w, B = frame / F (every crop and frame knows where it came from)."""
    img = position_image(h, w)[0]
    return torch.stack([torch.cat([img[..., :2], torch.full((h, w, 1), f / frames)], -1) for f in range(frames)])


def uni3c_classes():
    return [pytest.param(up.Uni3CPatch, id="fixture"),
            pytest.param(up.real_uni3c(), id="comfyui",
                         marks=pytest.mark.skipif(up.real_uni3c() is None, reason="this ComfyUI has no Uni3C patch"))]


def qwen_with_uni3c(fx, cls):
    """Tiny Qwen-Image (its blocks call ``double_block`` patches with the model input, as Wan does after 0.28)
    with a Uni3C patch of class ``cls`` on a coordinate-coded render; ``(tiny, model, patch, net, render)``."""
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.model_patcher
    t = fam.tiny("QwenImage")
    net = type("RecordingUni3CNet", (Uni3CNet,), {"inputs": []})()
    mp = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    render = render_video(LAT * 8, LAT * 8)

    class Recording(cls):
        encoded = []

        def __call__(self, kwargs):         # Qwen's blocks pass no ``vec`` (Wan's do): the patch reads it
            return cls.__call__(self, {**kwargs, "vec": torch.zeros(kwargs["x"].shape[0], 4)})

        def encode_render_video(self, shape):
            Recording.encoded.append((tuple(self.render_video.shape), tuple(shape)))
            return cls.encode_render_video(self, shape)

    patch = Recording(mp, render, VideoVAE16(), comfy.latent_formats.Wan21(), 1.0, float("inf"), 0.0)
    model = t.model.clone()
    model.set_model_double_block_patch(patch)
    return t, model, patch, net, render


@pytest.mark.parametrize("cls", uni3c_classes())
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_uni3c_patch_encodes_its_tiles_crop(pack, fx, cls, tile_batch):
    """Each row of the Uni3C control input (the first cond chunk's: [tile][item]) holds the patch's own encoding
    of its tile's crop of the render, every frame of the render handed to the patch (it keeps the frames the
    latent needs), at tile batch 1 and 4; the model's own patch is left untouched."""
    import comfy.latent_formats
    t, model, patch, net, render = qwen_with_uni3c(fx, cls)
    lat = fx.position_latent(16, LAT, LAT).unsqueeze(2)
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=tile_batch), t.positive, t.negative, lat,
                          steps=2, cfg=3.0, denoise=0.02)
    assert torch.isfinite(out).all()
    canvas = model.model.process_latent_in(lat)[0, :, 0]
    vae, fmt = VideoVAE16(), comfy.latent_formats.Wan21()
    seen = set()
    assert net.inputs
    for inp in net.inputs:
        rows, h, w = inp.shape[0], inp.shape[-2], inp.shape[-1]
        assert (h, w) == (TILE, TILE) and inp.shape[1] == 20 + 16
        for r in range(rows):
            y0, x0 = fx.window_of(inp[r, :2, 0], canvas[:2])
            seen.add((y0, x0))
            crop = render[:1, y0 * 8:(y0 + h) * 8, x0 * 8:(x0 + w) * 8]       # T = 1: the patch keeps frame 0
            assert torch.equal(inp[r, 20:], fmt.process_in(vae.encode(crop))[0]), f"row {r}: not the crop at {(y0, x0)}"
    assert seen == {(y, x) for y in (0, 4, 8) for x in (0, 4, 8)}, seen
    assert max(inp.shape[0] for inp in net.inputs) == tile_batch       # one row per tile of the batch
    assert {enc for enc in type(patch).encoded} == {((FRAMES, TILE * 8, TILE * 8, 3), (1, TILE, TILE))}
    assert patch.render_video is render and patch.prepared_render is None


# --------------------------------------------------------------------------- spatial_crop_inputs (after 0.28)

def crop_classes():
    return [pytest.param("fixture", id="fixture"),
            pytest.param("comfyui", id="comfyui", marks=pytest.mark.skipif(
                up.real_crop_patch() is None, reason="this ComfyUI's DiffSynth patch has no spatial_crop_inputs"))]


@pytest.mark.parametrize("kind", crop_classes())
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_patch_that_crops_itself_is_asked_for_its_tiles(pack, fx, kind, tile_batch):
    """A DiffSynth patch with ComfyUI's own ``spatial_crop_inputs``: the tiler asks it for each tile batch's copy
    (pixel-space regions on the canvas, the tile's size as target) and every row's control image is exactly
    the tile's crop, at tile batch 1 and 4."""
    log = []
    t, model, image = qwen_with_diffsynth(fx)
    (p,) = model.model_options["transformer_options"]["patches"]["double_block"]
    if kind == "fixture":
        p.__class__ = type("CroppingDiffSynth", (up.SpatialCrop, type(p)), {"crop_calls": []})
    recording(p, log)
    lat = fx.position_latent(16, LAT, LAT).unsqueeze(2)
    out = fx.run_ksampler(tiled(pack, fx, model, tile_batch_size=tile_batch), t.positive, t.negative, lat,
                          steps=2, cfg=3.0, denoise=0.02)
    assert torch.isfinite(out).all()
    assert_rows_are_crops(log, image, model.model.process_latent_in(lat)[0, :, 0], tile_batch)
    assert all(encoded for _, _, encoded in log)         # copies made by the patch itself (encoded when made)
    if kind == "fixture":
        calls = type(p).crop_calls
        assert calls and all(c["source_width"] == LAT * 8 and c["source_height"] == LAT * 8 and
                             c["target_width"] == TILE * 8 and c["target_height"] == TILE * 8 for c in calls)
        assert max(len(c["regions"]) for c in calls) == (1 if tile_batch == 1 else 2 * 4)


def test_unknown_patch_passed_on_and_named_once_per_run(pack, fx, caplog):
    """A patch the tiler does not know reaches the model unchanged in every tile batch, named once per run."""
    class FuturePatch:
        calls = 0           # on the class: ComfyUI may deep-copy the patch with the model options

        def __call__(self, kwargs):
            type(self).calls += 1
            return kwargs

        def models(self):
            return []

        def to(self, device_or_dtype):
            return self

    t, model, _ = qwen_with_diffsynth(fx)
    future = FuturePatch()
    model.set_model_double_block_patch(future)
    lat = fx.position_latent(16, LAT, LAT).unsqueeze(2)
    m = tiled(pack, fx, model, tile_batch_size=4)
    with caplog.at_level(logging.INFO, logger="quadtree_diffusion"):
        for _ in range(2):
            fx.run_ksampler(m, t.positive, t.negative, lat, steps=2, cfg=3.0, denoise=0.02)
    named = [r for r in caplog.records if "FuturePatch" in r.getMessage()]
    assert len(named) == 2 and "passed on unchanged" in named[0].getMessage()
    assert FuturePatch.calls >= 2 * 2 * 3      # 2 runs x 2 steps x 3 batches of 9 tiles, at every block
