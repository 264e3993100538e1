"""Model inputs a plain crop gets wrong, per family (issue 20; positional_inputs.py, model_families.py).

The family matrix checks every input that a crop serves (test_family_matrix.py,
test_positional_inputs_meet_each_tile_where_the_canvas_does), including the per-frame timesteps of Wan 2.2
5B / Cosmos Predict2 and the token-aligned windows of SCAIL and Wan S2V.  Here, the inputs that need a
family's own treatment, each through ComfyUI's real KSampler:

* FLUX's ``attention_mask`` (StyleModelApply's ``attn_bias`` with Redux): a [B, L, L] bias over the text
  tokens then the canvas's tokens; each tile gets the rows and columns of the text and of its own tokens,
  coordinate-coded so every entry says which (query, key) pair of the canvas it is;
* HiDream-E1's source image (``image_cond``, beside the latent: ids offset by the canvas's width) takes
  full-width tiles, and narrower ones are refused with a clear error before the model runs;
* LTXV guide frames (``keyframe_idxs``) are refused with a clear error before the model runs, and a window
  that is the whole canvas still samples them (one tile == untiled);
* inputs that are never a picture (``audio_embed``) are never cropped, even with the canvas's proportions;
* a per-frame timestep mask still gives one tile == untiled bit for bit.
"""
import node_helpers
import nodes as comfy_nodes
import pytest
import torch

import qtd_families as fam

pytestmark = pytest.mark.usefixtures("single_thread")


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(method="Mixture of Diffusers", tile_batch_size=4), **kw})


def step(model, pos, neg, latent, add_noise=True):
    """One sampler step (of 4, from step 2) with CFG 2 and fixed noise; the output latent."""
    lat = latent if isinstance(latent, dict) else {"samples": latent}
    return comfy_nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", 1, 4, 2.0, "euler",
                                                 "simple", pos, neg, lat, 2, 3, "enable")[0]["samples"]


class Inputs:
    """Every (x, keyword inputs) the diffusion model receives (a forward pre-hook)."""

    def __init__(self, dm):
        self.calls = []
        self.hook = dm.register_forward_pre_hook(
            lambda m, a, k: self.calls.append((a[0].detach().clone(), {n: v for n, v in k.items()
                                                                        if torch.is_tensor(v)})), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def place(x, canvas_x):
    """(row, col) where the canvas's input latent (noise: unique per place) holds the tile's."""
    h, w = x.shape[-2:]
    found = [(Y, X) for Y in range(canvas_x.shape[-2] - h + 1) for X in range(canvas_x.shape[-1] - w + 1)
             if torch.equal(canvas_x[..., Y:Y + h, X:X + w], x)]
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- FLUX Redux attention mask

def coded_token_mask(n_text, hc, wc):
    """[1, L, L] attention bias, L = text + hc * wc: entry (q, k) = (q * L + k) / L^2 (unique per pair, small)."""
    L = n_text + hc * wc
    q = torch.arange(L, dtype=torch.float32)
    return ((q[:, None] * L + q[None, :]) / (L * L))[None]


@pytest.mark.parametrize("layout", ["grid", "quadtree"])
def test_flux_attention_mask_rows_and_columns_of_each_tile(pack, fx, layout):
    """Each tile row gets the canvas mask restricted to the text tokens and its own canvas tokens, in its
    token order: entry (i, j) of the tile's mask is the canvas's (q(i), q(j)), q(i) the canvas index of the
    tile's token i (found from where the tile's latent lies on the canvas).  Before, every tile was given the
    canvas's whole mask (a crash: its length is not the tile's sequence)."""
    t = fam.tiny("Flux")
    n_text = t.positive[0][0].shape[1]
    H, W = t.latent.shape[-2:]
    p = 2
    hc, wc = H // p, W // p
    extra = {"attention_mask": coded_token_mask(n_text, hc, wc), "attention_mask_img_shape": (hc, wc)}
    pos = node_helpers.conditioning_set_values(t.positive, extra)
    neg = node_helpers.conditioning_set_values(t.negative, extra)
    dm = t.model.model.diffusion_model
    with Inputs(dm) as canvas:
        ref = step(t.model, pos, neg, t.latent)
    (cx, ck), = canvas.calls
    cmask = ck["attention_mask"]
    assert cmask.shape[-1] == n_text + hc * wc
    kw = dict(tile_width=64, tile_height=64, tile_overlap=32)
    if layout == "quadtree":
        img = fx.synthetic_photo(W * 8, H * 8, seed=1)
        _, lay = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=10.0, min_tile_size=32,
                              min_denoise=1.0, max_denoise=1.0, line_thickness=0, max_tile_size=64)
        kw = dict(quadtree=lay, tile_overlap=16, tile_batch_size=2)
    with Inputs(dm) as rec:
        out = step(tiled(pack, fx, t.model, **kw), pos, neg, t.latent)
    assert torch.isfinite(out).all()
    seen = set()
    for x, k in rec.calls:
        m = k["attention_mask"]
        k = x.shape[0] // cx.shape[0]      # tiles per call; rows chunk-major, latent batch 1
        for r in range(x.shape[0]):
            cr = r // k
            y0, x0 = place(x[r], cx[cr])
            h, w = x.shape[-2:]
            ys = y0 // p + torch.arange(h // p)
            xs = x0 // p + torch.arange(w // p)
            idx = torch.cat([torch.arange(n_text), n_text + (ys[:, None] * wc + xs[None, :]).reshape(-1)])
            assert torch.equal(m[r], cmask[cr][idx][:, idx]), f"the tile at {(y0, x0)} has another part of the mask"
            seen.add((y0, x0))
    assert len(seen) > 2
    # one window over the canvas: the mask as it is, bit for bit
    one = step(tiled(pack, fx, t.model, tile_width=W * 8, tile_height=H * 8, tile_overlap=0), pos, neg, t.latent)
    assert torch.equal(one, ref)


# --------------------------------------------------------------------------- HiDream-E1 source image

def test_hidream_e1_source_beside_the_canvas_needs_full_width_tiles(pack, fx):
    """HiDream-E1 concatenates its source latent (``image_cond``) to the right of the latent, so the source
    token at canvas (Y, X) has the id (Y, W + X): its offset is the canvas's width, and a narrower tile would
    give it its own width instead (ComfyUI's HiDream has no hook to move ids).  Tiles narrower than the canvas
    are refused with a clear error before the model runs; full-width tiles (splitting the height) get the
    source's rows at their place, where the offset is the canvas's; one window over the canvas: bit for bit."""
    t = fam.tiny("HiDream")
    H, W = t.latent.shape[-2:]
    src = {"concat_latent_image": fam.coded(1, 16, H, W)}
    pos, neg = (node_helpers.conditioning_set_values(c, src) for c in (t.positive, t.negative))
    dm = t.model.model.diffusion_model
    with Inputs(dm) as rec:
        with pytest.raises(ValueError, match=r"image_cond: HiDream-E1's source image .* tile_width"):
            step(tiled(pack, fx, t.model, tile_width=64, tile_height=64, tile_overlap=32), pos, neg, t.latent)
    assert not rec.calls, "the model ran before the refusal"
    with Inputs(dm) as canvas:
        ref = step(t.model, pos, neg, t.latent)
    (cx, ck), = canvas.calls
    with Inputs(dm) as rec:
        step(tiled(pack, fx, t.model, tile_width=W * 8, tile_height=64, tile_overlap=32), pos, neg, t.latent)
    seen = set()
    for x, k in rec.calls:
        n = x.shape[0] // cx.shape[0]
        for r in range(x.shape[0]):
            y0, x0 = place(x[r], cx[r // n])
            h = x.shape[-2]
            assert x.shape[-1] == W and torch.equal(k["image_cond"][r], ck["image_cond"][r // n][:, y0:y0 + h])
            seen.add(y0)
    assert len(seen) > 1
    one = step(tiled(pack, fx, t.model, tile_width=W * 8, tile_height=H * 8, tile_overlap=0), pos, neg, t.latent)
    assert torch.equal(one, ref)


# --------------------------------------------------------------------------- LTXV guide frames

def ltxv_with_guide(t):
    """LTXV conditioning and latent with one guide frame appended the way LTXVAddGuide appends it (its own
    classmethod, given an already-encoded guide latent), and the noise mask that comes with it."""
    from comfy_extras.nodes_lt import LTXVAddGuide
    lat = t.latent
    guide = torch.randn(1, lat.shape[1], 1, *lat.shape[-2:], generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 1, lat.shape[2], *lat.shape[-2:])
    # the guide's mask goes through the latent's noise mask (the tiny model's concat_mask would override it)
    pos, neg = ([[c, {k: v for k, v in d.items() if k != "concat_mask"}] for c, d in cond]
                for cond in (t.positive, t.negative))
    pos, neg, lat, mask = LTXVAddGuide.append_keyframe(pos, neg, 0, lat, mask, guide, 1.0, (8, 32, 32))
    return pos, neg, {"samples": lat, "noise_mask": mask}


def test_ltxv_guide_frames_refused_before_the_model_runs(pack, fx):
    t = fam.tiny("LTXV")
    pos, neg, lat = ltxv_with_guide(t)
    assert pos[0][1]["keyframe_idxs"].shape[2] > 0
    H, W = lat["samples"].shape[-2:]
    ref = step(t.model, pos, neg, lat)
    one = step(tiled(pack, fx, t.model, tile_width=W * 32, tile_height=H * 32, tile_overlap=0), pos, neg, lat)
    assert torch.equal(one, ref)        # a window that is the whole canvas: the guides as they are
    with Inputs(t.model.model.diffusion_model) as rec:
        with pytest.raises(ValueError, match=r"keyframe_idxs: Quadtree Diffusion cannot tile this run: LTXV guide "
                                             r"frames .* LTXVImgToVideo"):
            step(tiled(pack, fx, t.model, tile_width=256, tile_height=256, tile_overlap=128), pos, neg, lat)
    assert not rec.calls, "the model ran before the refusal"


# --------------------------------------------------------------------------- inputs that are never a picture

def test_audio_features_never_cropped_even_with_the_canvas_proportions(pack, fx):
    """Wan S2V's audio features [B, layers, dim, frames] on a canvas of the same proportions (dim = frames):
    the shape of a canvas at a scale, but every tile gets them whole."""
    t = fam.tiny("WAN22_S2V")
    H, W = t.latent.shape[-2:]
    layers = t.model.model.diffusion_model.casual_audio_encoder.weights.shape[1]
    audio = torch.randn(1, layers, 32, 32, generator=torch.Generator().manual_seed(4))
    assert 32 / H == 32 / W
    pos = node_helpers.conditioning_set_values(t.positive, {"audio_embed": audio})
    neg = node_helpers.conditioning_set_values(t.negative, {"audio_embed": audio * 0})
    with Inputs(t.model.model.diffusion_model) as rec:
        out = step(tiled(pack, fx, t.model, tile_width=128, tile_height=128, tile_overlap=64), pos, neg, t.latent)
    assert torch.isfinite(out).all() and rec.calls
    for x, k in rec.calls:
        assert x.shape[-2:] != (H, W) and k["audio_embed"].shape[1:] == audio.shape[1:]


# --------------------------------------------------------------------------- per-frame timesteps

def test_per_frame_timestep_mask_one_tile_equals_untiled(pack, fx):
    """Wan 2.2 5B with an inpainting noise mask (timestep per frame: the mask's mean): one window over the
    canvas gets the mask as it is, bit for bit (tiles get the canvas's per-frame means: the family matrix)."""
    t = fam.tiny("WAN22_T2V")
    lat = {"samples": t.latent, "noise_mask": t.extra["noise_mask"]}
    H, W = t.latent.shape[-2:]
    ref = step(t.model, t.positive, t.negative, lat)
    one = step(tiled(pack, fx, t.model, tile_width=W * 16, tile_height=H * 16, tile_overlap=0), t.positive,
               t.negative, lat)
    assert torch.equal(one, ref)
