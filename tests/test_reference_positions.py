"""Edit models' reference images per tile: every tile meets the reference where the canvas does (issue 20).

Edit models (FLUX Kontext, Flux.2, Qwen-Image-Edit) match each canvas token to the reference token
with the same (h, w) RoPE position id.  These tests record, through ComfyUI's real KSampler, every
token the diffusion model embeds and the position ids it embeds them with (torch forward pre-hooks on
the model's own ``img_in`` and ``pe_embedder``), with coordinate-coded latents: the canvas latent
and each reference carry (patch row + 1, patch column + 1, tag) in channels 0-2 and 1 in channel 3,
so every token says where it comes from.  The sampler adds no noise (KSamplerAdvanced), so the
model input is (1 - sigma) times the coded canvas: ratios to channel 3 decode it.

The property, for every row of every tiled model call: for every token (the tile's and each
reference token the tile is given), its (h, w) id minus the id the *untiled* call gives the same
token (same canvas place, or same reference patch) is one constant.  RoPE attention depends only on
id differences, so the tile relates to every reference token exactly as the canvas does; and a tile
token's id equals the id of the reference token holding its canvas place, where the untiled call
has them equal.  "One tile == untiled" cannot see a break here (the ids coincide); this can.
"""
import node_helpers
import nodes as comfy_nodes
import pytest
import torch

import qtd_families as fam

pytestmark = pytest.mark.usefixtures("single_thread")

H, W = 16, 24            # canvas, latent px (FLUX/Qwen: 8x12 tokens; Flux.2: 16x24 tokens)
CANVAS_TAG = 1


def coded(fmt, C, h, w, p, tag, five=False):
    """A latent whose processed form (what the model sees) holds (patch row + 1, patch col + 1, tag, 1)
    in channels 0..3, constant over each p x p patch."""
    ys = torch.arange(h).div(p, rounding_mode="floor").float()[:, None].expand(h, w)
    xs = torch.arange(w).div(p, rounding_mode="floor").float()[None, :].expand(h, w)
    z = torch.zeros(1, C, h, w)
    z[0, 0], z[0, 1], z[0, 2], z[0, 3] = ys + 1, xs + 1, tag, 1
    if five:
        z = z[:, :, None]
    return fmt.process_out(z)


# The diffusion model's layers that take the image tokens (canvas and references, patchified: channel-major
# (c ph pw)) and the position ids (text then image): family -> (token embedder, id embedder).
EMBEDDERS = {"Flux": ("img_in", "pe_embedder"), "Flux2": ("img_in", "pe_embedder"),
             "QwenImage": ("img_in", "pe_embedder"), "Krea2": ("first", "pe_embedder")}


class Tokens:
    """Every (token content, position ids) the diffusion model embeds, one entry per forward."""

    def __init__(self, dm, name="Flux"):
        tok, ids = EMBEDDERS[name]
        self.content, self.ids = [], []
        self.hooks = [getattr(dm, tok).register_forward_pre_hook(lambda m, a: self.content.append(a[0].detach().clone())),
                      getattr(dm, ids).register_forward_pre_hook(lambda m, a: self.ids.append(a[0].detach().clone()))]

    def close(self):
        for h in self.hooks:
            h.remove()

    def rows(self, p):
        """Per model-input row: (keys [L] of (tag, row, col), (h, w) ids [L, 2]) of its image tokens."""
        assert len(self.content) == len(self.ids) > 0
        for tok, ids in zip(self.content, self.ids):
            L = tok.shape[1]
            img_ids = ids[:, -L:, 1:3]
            pp = p * p
            for b in range(tok.shape[0]):
                t = tok[b]
                one = t[:, 3 * pp]
                code = torch.stack([t[:, 2 * pp] / one, t[:, 0] / one - 1, t[:, pp] / one - 1], -1).round().long()
                yield [tuple(k) for k in code.tolist()], img_ids[b]


def family_setup(name):
    import comfy.supported_models as sm
    if name not in {m.__name__ for m in sm.models}:
        pytest.skip(f"this ComfyUI has no {name}")
    t = fam.tiny(name)
    fmt = t.model.model.latent_format
    five = name in ("QwenImage", "Krea2")
    return t, fmt, fmt.latent_channels, t.patch[0], five


def conditioning(t, refs, method=None, name=None):
    extra = {"reference_latents": refs}
    if method or name == "Krea2":       # Krea 2 reads references only with a method
        extra["reference_latents_method"] = method or "index"
    return (node_helpers.conditioning_set_values(t.positive, extra),
            node_helpers.conditioning_set_values(t.negative, extra))


def record(model, dm, pos, neg, lat, cfg=2.0, name="Flux"):
    rec = Tokens(dm, name)
    try:
        comfy_nodes.KSamplerAdvanced().sample(model, "disable", 0, 4, cfg, "euler", "simple", pos, neg,
                                              {"samples": lat}, 2, 3, "enable")
    finally:
        rec.close()
    return rec


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(method="Mixture of Diffusers", tile_overlap=16), **kw})


def layout_kwargs(pack, fx, layout, compression, p):
    if layout == "grid":
        return dict(tile_width=8 * compression * p, tile_height=8 * compression * p)
    if layout == "spot":
        return dict(method="SpotDiffusion", tile_width=6 * compression * p, tile_height=6 * compression * p)
    img = fx.synthetic_photo(W * compression, H * compression, seed=1)
    _, lay = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=10.0,
                          min_tile_size=2 * p * compression, min_denoise=1.0, max_denoise=1.0,
                          line_thickness=0, max_tile_size=8 * p * compression)
    return dict(quadtree=lay)


def untiled_ids(rec, p):
    """(key -> untiled (h, w) id) from the untiled run."""
    table = {}
    for keys, ids in rec.rows(p):
        for k, v in zip(keys, ids.tolist()):
            table[k] = tuple(v)
    return table


def partners(table, tag):
    """canvas key -> the key of reference ``tag``'s token that shares its (h, w) id untiled, for every canvas
    token; None unless every canvas token has one (the reference covers the canvas)."""
    by_id = {v: k for k, v in table.items() if k[0] == tag}
    out = {k: by_id.get(v) for k, v in table.items() if k[0] == CANVAS_TAG}
    return out if all(out.values()) else None


def check_relation(rec, p, table, partner_tags=(), canvas_tokens=None):
    """Every row: id - untiled id is one constant over all its tokens; the tile is not the canvas; each
    canvas token meets (shares its id with) its untiled partner token of each ``partner_tags`` reference.
    Returns the number of rows checked."""
    n_rows = 0
    pairs = {tag: partners(table, tag) for tag in partner_tags}
    for keys, ids in rec.rows(p):
        n_rows += 1
        canvas = [i for i, k in enumerate(keys) if k[0] == CANVAS_TAG]
        assert canvas, "a row without canvas tokens"
        if canvas_tokens is not None:
            assert len(canvas) < canvas_tokens, "the model saw the whole canvas: not tiled"
        u = torch.tensor([table[k] for k in keys], dtype=ids.dtype)
        off = ids - u
        assert torch.allclose(off, off[canvas[0]].expand_as(off), atol=1e-4), \
            "a token's id moved against the others': the tile meets the reference elsewhere than the canvas does"
        where = {k: i for i, k in enumerate(keys)}
        for tag, pair in pairs.items():
            for i in canvas:
                q = pair[keys[i]]
                assert q in where, f"tile token at {keys[i][1:]} was not given reference {tag}'s token {q[1:]}"
                assert torch.equal(ids[i], ids[where[q]]), "a tile token does not share its id with its partner"
    return n_rows


FAMILIES = ["Flux", "Flux2", "QwenImage", "Krea2"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("layout", ["grid", "quadtree", "spot"])
def test_every_tile_meets_the_reference_where_the_canvas_does(pack, fx, name, layout):
    """FLUX Kontext (FLUX with a reference), Flux.2, Qwen-Image-Edit and Krea 2 (where ComfyUI has it); a
    reference of the canvas's size; grid, quadtree and SpotDiffusion; tile batch 1 and 4; CFG 2 (two cond
    chunks per call)."""
    t, fmt, C, p, five = family_setup(name)
    comp = pack.utils.latent_compression(t.model.model)
    ref = coded(fmt, C, H, W, p, 10, five)
    pos, neg = conditioning(t, [ref], name=name)
    lat = coded(fmt, C, H, W, p, CANVAS_TAG, five)
    dm = t.model.model.diffusion_model
    table = untiled_ids(record(t.model, dm, pos, neg, lat, name=name), p)
    n_canvas = (H // p) * (W // p)
    for batch in (1, 4):
        m = tiled(pack, fx, t.model, tile_batch_size=batch, **layout_kwargs(pack, fx, layout, comp, p))
        rec = record(m, dm, pos, neg, lat, name=name)
        rows = check_relation(rec, p, table, partner_tags=(10,), canvas_tokens=n_canvas)
        assert rows >= 2 * 2            # at least two tiles, two chunks each
        if batch == 4:
            assert max(c.shape[0] for c in rec.content) > 2, "tile batch 4 never batched tiles"


def post_input_called(t, five) -> bool:
    """Whether this ComfyUI's model calls ``transformer_options`` patches 'post_input' (feature detection:
    a recording patch on an untiled one-step run)."""
    calls = []

    def probe(args, *a, **k):
        calls.append(1)
        return args
    m = t.model.clone()
    m.set_model_patch(probe, "post_input")
    fmt = t.model.model.latent_format
    lat = coded(fmt, fmt.latent_channels, H, W, t.patch[0], CANVAS_TAG, five)
    record(m, m.model.diffusion_model, t.positive, t.negative, lat)
    return bool(calls)


def ref_tokens(rec, p, tag):
    """Per row: the number of tokens of reference ``tag`` and of the canvas."""
    return [(sum(k[0] == tag for k in keys), sum(k[0] == CANVAS_TAG for k in keys)) for keys, _ in rec.rows(p)]


# (family, method or None for the default, reference sizes in latent px): several references placed by
# each of the families' methods, of the canvas's size, smaller (half) and larger (double)
CASES = [
    ("Flux", None, [(H, W), (6, 8)]),                 # "offset": the second beside the first
    ("Flux", "index", [(H, W), (8, 12)]),
    ("Flux", "uxo", [(H, W), (6, 8)]),                # after the canvas, diagonally
    ("Flux", None, [(H // 2, W // 2)]),               # the low-resolution source of a x2 upscale
    ("Flux", None, [(2 * H, 2 * W)]),
    ("Flux2", None, [(H, W), (8, 12)]),               # "index" (Flux.2's default), index scale 10
    ("QwenImage", None, [(H, W), (8, 12)]),           # "index", ids centred per image
    ("QwenImage", "offset", [(H, W), (6, 8)]),
    ("QwenImage", None, [(H // 2, W // 2)]),
    ("QwenImage", None, [(2 * H, 2 * W)]),
]


@pytest.mark.parametrize("mode", ["crop to tile", "whole image"])
@pytest.mark.parametrize("name,method,sizes", CASES, ids=[f"{n}-{m}-{len(s)}x{s[0][0]}" for n, m, s in CASES])
def test_several_references_and_other_sizes_keep_the_untiled_relation(pack, fx, name, method, sizes, mode):
    """Several references (FLUX's offset / index / uxo placements, Qwen-Image's index / offset) and
    references of another size than the canvas keep, in every tile, the relation the untiled call has.
    Where that needs the ids moved and the model has no 'post_input' hook (Qwen-Image on ComfyUI
    0.3.x), the run stops with a clear error instead of sampling a wrong image."""
    t, fmt, C, p, five = family_setup(name)
    refs = [coded(fmt, C, h, w, p, 10 * (k + 1), five) for k, (h, w) in enumerate(sizes)]
    pos, neg = conditioning(t, refs, method)
    lat = coded(fmt, C, H, W, p, CANVAS_TAG, five)
    dm = t.model.model.diffusion_model
    table = untiled_ids(record(t.model, dm, pos, neg, lat), p)
    m = tiled(pack, fx, t.model, tile_batch_size=4, reference_mode=mode, tile_width=64 * p, tile_height=64 * p)
    covering = [10 * (k + 1) for k in range(len(sizes)) if partners(table, 10 * (k + 1))]
    hook = post_input_called(t, five)
    try:
        rec = record(m, dm, pos, neg, lat)
    except RuntimeError as e:
        assert not hook and "post_input" in str(e) and "reference_mode" in str(e)
        # only where the ids had to move: a reference that does not cover the canvas, or whole references
        assert mode == "whole image" or len(covering) < len(sizes)
        return
    check_relation(rec, p, table, partner_tags=covering, canvas_tokens=(H // p) * (W // p))
    for k, (h, w) in enumerate(sizes):
        full = (h // p) * (w // p)
        for n_ref, n_canvas in ref_tokens(rec, p, 10 * (k + 1)):
            if mode == "crop to tile" and 10 * (k + 1) in covering:
                assert n_ref == n_canvas, "a covering reference is cropped to the tile's tokens"
            else:
                assert n_ref == full, "the reference is given whole"


def test_one_window_over_the_canvas_gets_every_reference_whole(pack, fx):
    """A window that is the whole canvas is the untiled call: references whole, ids untouched, the same
    result bit for bit (a crop of a larger reference would differ)."""
    t, fmt, C, p, five = family_setup("Flux")
    refs = [coded(fmt, C, 2 * H, 2 * W, p, 10)]
    pos, neg = conditioning(t, refs)
    lat = coded(fmt, C, H, W, p, CANVAS_TAG)
    comp = 8
    m = tiled(pack, fx, t.model, tile_width=W * comp, tile_height=H * comp)
    a = comfy_nodes.KSamplerAdvanced().sample(t.model, "enable", 3, 2, 2.0, "euler", "simple", pos, neg,
                                              {"samples": lat}, 0, 2, "disable")[0]["samples"]
    b = comfy_nodes.KSamplerAdvanced().sample(m, "enable", 3, 2, 2.0, "euler", "simple", pos, neg,
                                              {"samples": lat}, 0, 2, "disable")[0]["samples"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["crop to tile", "whole image"])
def test_rope_options_shift_and_scale(pack, fx, mode):
    """ComfyUI's RoPE options (the ScaleROPE node: ``set_model_rope_options``) scale and shift the canvas's
    ids (and, where ComfyUI applies them to references, the references'): the relation still holds."""
    t, fmt, C, p, five = family_setup("Flux")
    model = t.model.clone()
    if not hasattr(model, "set_model_rope_options"):
        pytest.skip("this ComfyUI has no RoPE options (ModelPatcher.set_model_rope_options)")
    model.set_model_rope_options(scale_x=1.5, shift_x=2.0, scale_y=2.0, shift_y=3.0, scale_t=1.0, shift_t=0.0)
    pos, neg = conditioning(t, [coded(fmt, C, H, W, p, 10), coded(fmt, C, 6, 8, p, 20)], "index")
    lat = coded(fmt, C, H, W, p, CANVAS_TAG)
    dm = t.model.model.diffusion_model
    table = untiled_ids(record(model, dm, pos, neg, lat), p)
    m = tiled(pack, fx, model, tile_batch_size=4, reference_mode=mode, tile_width=64 * p, tile_height=64 * p)
    # where ComfyUI does not move references with the RoPE options (0.3.x), no reference token shares a
    # canvas token's id untiled: the relation (constant id offsets) is all there is to keep
    covering = [tag for tag in (10, 20) if partners(table, tag)]
    check_relation(record(m, dm, pos, neg, lat), p, table, partner_tags=covering, canvas_tokens=(H // p) * (W // p))


# --------------------------------------------------------------------------- Wan / HunyuanVideo reference inputs

def decode_place(v, p, frame=None):
    """(row, col) grids [rows, h, w] of a coordinate-coded tensor [rows, C, (T,) h, w] (ratios to channel 3)."""
    if v.dim() == 5:
        v = v[:, :, 0 if frame is None else frame]
    return (v[:, 0] / v[:, 3] - 1).round().long(), (v[:, 1] / v[:, 3] - 1).round().long()


@pytest.mark.parametrize("variant", ["ref_conv", "s2v"])
def test_wan_reference_latent_is_the_tiles_crop(pack, fx, variant):
    """Wan lays its reference image on the canvas's own grid (ref_conv: Wan 2.2 Fun Control / Animate, frame 0
    before the canvas's; S2V / HuMo: frames after the canvas's): a tile gets the crop at its place.  Whole,
    a ref_conv reference does not even fit a tile (the model's frame count and token grid disagree)."""
    import comfy.supported_models as sm
    if variant == "ref_conv":
        cls = next(m for m in sm.models if m.__name__ == "WAN21_T2V")
        model = fam.build(cls, fam._wan_cfg(in_dim_ref_conv=16))
        p, T = 2, 3
    else:
        t = fam.tiny("WAN22_S2V")
        model, p, T = t.model, 2, 3
    fmt = model.model.latent_format
    ref = coded(fmt, 16, H, W, p, 10, five=True)
    pos, neg = (node_helpers.conditioning_set_values(c, {"reference_latents": [ref]})
                for c in fam.conds(64))
    lat = coded(fmt, 16, H, W, p, CANVAS_TAG, five=True).expand(1, 16, T, H, W).contiguous()
    m, log = fx.logged(model)
    tm = tiled(pack, fx, m, tile_batch_size=4, tile_width=64, tile_height=64)
    comfy_nodes.KSamplerAdvanced().sample(tm, "disable", 0, 4, 2.0, "euler", "simple", pos, neg,
                                          {"samples": lat}, 2, 3, "enable")
    assert len(log.calls) >= 2 and all(call.x.shape[-2:] != (H, W) for call in log.calls)
    for call in log.calls:
        r = call.c["reference_latent"]
        assert r.shape[0] == call.x.shape[0] and r.shape[-2:] == call.x.shape[-2:]
        ry, rx = decode_place(r, p)
        xy, xx = decode_place(call.x, p)
        assert torch.equal(ry, xy) and torch.equal(rx, xx), "a tile got the reference of another place"
    # a reference of another size than the canvas cannot be placed per tile: refused, naming the input
    small = coded(fmt, 16, H // 2, W // 2, p, 10, five=True)
    pos2, neg2 = (node_helpers.conditioning_set_values(c, {"reference_latents": [small]}) for c in fam.conds(64))
    with pytest.raises(ValueError, match="reference_latent: .*canvas's size"):
        fx.run_ksampler(tiled(pack, fx, model, tile_width=64, tile_height=64), pos2, neg2, lat, steps=1, cfg=2.0)


def test_hunyuan_video_reference_beside_the_canvas_needs_full_width_tiles(pack, fx):
    """HunyuanVideo's image-to-video reference (``ref_latent``, custom guidance) has ids offset by the canvas's
    width: tiles narrower than the canvas are refused with a clear error; tiles of the full width (splitting the
    height) keep it and sample.  (CFG 1 and tile batch 1: ComfyUI's HunyuanVideo writes into an expanded id
    tensor, which fails for any model call of more than one row, untiled too.)"""
    t = fam.tiny("HunyuanVideo")
    lat = t.latent
    ref = fam.rand(1, 16, 1, *lat.shape[-2:], seed=4)
    pos, neg = (node_helpers.conditioning_set_values(c, {"ref_latent": ref}) for c in (t.positive, t.negative))
    H_, W_ = lat.shape[-2:]
    with pytest.raises(ValueError, match="ref_latent: .*tile_width"):
        fx.run_ksampler(tiled(pack, fx, t.model, tile_width=W_ * 4, tile_height=H_ * 4), pos, neg, lat,
                        steps=1, cfg=2.0)
    out = fx.run_ksampler(tiled(pack, fx, t.model, tile_width=W_ * 8, tile_height=H_ * 4, tile_overlap=8,
                                tile_batch_size=1), pos, neg, lat, steps=1, cfg=1.0)
    assert out.shape == lat.shape and torch.isfinite(out).all()



# --------------------------------------------------------------------------- families without a post_input hook

NO_HOOK = ["Omnigen2", "Boogu", "JoyImage", "ZImage"]


@pytest.mark.parametrize("name", NO_HOOK)
def test_families_without_a_hook_take_crops_of_covering_references(pack, fx, name):
    """Omnigen2, Boogu, JoyImage and Z-Image (Omni) build (h, w) ids from 0 for the canvas and for every
    reference, inside their own embedders (no patch point: ComfyUI calls no post_input there).  A reference of
    the canvas's size is cropped to each tile, so the tile and its crop restart at 0 together: every tile token
    meets the reference token at its canvas place (checked on what the model receives: each row's reference
    crop holds the tile's own place).  A reference that does not cover the canvas cannot be placed per tile
    there: refused before the first model call, with the fix in the message."""
    t, fmt, C, p, _ = family_setup(name)
    five = t.latent.ndim == 5
    lat = coded(fmt, C, H, W, p, CANVAS_TAG, five)
    ref = coded(fmt, C, H, W, p, 10, five)
    pos, neg = conditioning(t, [ref])
    m, log = fx.logged(t.model)
    comfy_nodes.KSamplerAdvanced().sample(tiled(pack, fx, m, tile_batch_size=4, tile_width=64, tile_height=64),
                                          "disable", 0, 4, 2.0, "euler", "simple", pos, neg, {"samples": lat}, 2, 3,
                                          "enable")
    if "ref_latents" not in log.calls[0].c:
        pytest.skip(f"this ComfyUI's {name} takes no reference latents")
    assert len(log.calls) >= 2
    for call in log.calls:
        (r,) = call.c["ref_latents"]
        assert r.shape[0] == call.x.shape[0] and r.shape[-2:] == call.x.shape[-2:] != (H, W)
        assert all(torch.equal(a, b) for a, b in zip(decode_place(r, p), decode_place(call.x, p)))
    small = coded(fmt, C, H // 2, W // 2, p, 10, five)
    pos2, neg2 = conditioning(t, [small])
    log.calls.clear()
    with pytest.raises(RuntimeError, match="no 'post_input' patch point"):
        fx.run_ksampler(tiled(pack, fx, m, tile_width=64, tile_height=64), pos2, neg2, lat, steps=1, cfg=2.0)
    assert not log.calls, "refused only after calling the model"


def test_a_family_that_ignores_references_is_left_alone(pack, fx):
    """ComfyUI builds ``ref_latents`` for Chroma (its model class inherits FLUX's conditioning), but Chroma's
    forward never reads them: the engine neither crops nor refuses them, and the run samples."""
    t = fam.tiny("Chroma")
    ref = fam.rand(1, 16, 16, 16, seed=3)
    pos, neg = (node_helpers.conditioning_set_values(c, {"reference_latents": [ref]}) for c in (t.positive, t.negative))
    m, log = fx.logged(t.model)
    out = fx.run_ksampler(tiled(pack, fx, m, tile_width=64, tile_height=64, tile_batch_size=4), pos, neg, t.latent,
                          steps=1, cfg=2.0)
    assert torch.isfinite(out).all() and log.calls
    assert all(r.shape[-2:] == (16, 16) for call in log.calls for r in call.c["ref_latents"])   # untouched, whole
