"""Every model family of the running ComfyUI, tiled (issue 12).

The families are enumerated from ``comfy.supported_models.models`` of the ComfyUI the suite runs
against (65 on 0.3.75, 96 on 0.28.0), so a family that ComfyUI adds and the pack has no tiny model
of fails here by name the day it appears.  For each, ``tests/families.py`` builds a tiny model
from ComfyUI's own classes (its supported_models config shrunk, its model_base class, seeded
weights) and it is sampled through ComfyUI's KSampler:

* one tile covering the canvas equals untiled sampling (batch 2, img2img at denoise 0.8);
* a grid (batch 2) and a quadtree with per-tile variable denoise (batch 1): finite, the latent's
  shape, and every model input a tile the model takes without padding: a multiple of its latent
  patch on both sides, at least its minimum tile size, with channels and frames untouched.

Every input a family relates to the canvas by place (``families.POSITIONAL``: masks, concat latents,
control / pose / camera / motion frames, per-token and per-frame timesteps, inputs the model resamples)
is coordinate-coded, and every row of every tiled call must receive it where the canvas call has it at
the row's canvas place (:func:`test_positional_inputs_meet_each_tile_where_the_canvas_does`).

Families that cannot be image/video-tiled at all are excluded in ``families.EXCLUDED`` with the
reason; each exclusion's premise is checked here.  The named families of the issue (Qwen-Image,
Flux.2, Z-Image, HiDream, Chroma, Anima/Cosmos Predict2, HunyuanImage 2.1, LTXV, Wan 2.2) also run
the other batch size in each mode (:func:`test_named_family_both_batches`).
"""
import comfy.supported_models
import pytest
import torch

import qtd_families as fam

pytestmark = pytest.mark.usefixtures("single_thread")     # tiny models: see conftest

FAMILIES = [m.__name__ for m in comfy.supported_models.models]

# The families the issue names; "Anima" is its own class on newer ComfyUI, Cosmos Predict2 on 0.3.x.
NAMED = ["QwenImage", "Flux2", "ZImage", "HiDream", "Chroma", "Anima", "CosmosT2IPredict2", "HunyuanImage21", "LTXV",
         "WAN22_T2V"]

STEPS, CFG = 2, 3.0


def _exclusion_holds(cls, reason: str) -> bool:
    """The premise of an exclusion, read from ComfyUI's own class."""
    fmt = cls.latent_format
    if reason.startswith("audio"):
        return "audio_model" in cls.unet_config
    if reason.startswith("3-D"):
        return getattr(fmt, "latent_dimensions", 2) == 1 or "3d" in str(cls.unet_config.get("image_model", "")) \
            or "splat" in str(cls.unet_config.get("image_model", ""))
    import comfy.latent_formats
    return fmt is comfy.latent_formats.LatentFormat      # no latent space: the model is never sampled


_BUILT: dict = {}


def tiny(name):
    """A family's tiny model, built once per session (the checks below share it)."""
    if name not in _BUILT:
        _BUILT[name] = fam.tiny(name)
    return _BUILT[name]


def batch(t, n):
    lat = t.latent
    if "frames_batch" in t.extra:          # SVD-style video: the frames are the batch
        return lat.repeat(t.extra["frames_batch"] * n, *[1] * (lat.ndim - 1))
    return lat.repeat(n, *[1] * (lat.ndim - 1))


def node_model(pack, fx, model, **kw):
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=model, method="Mixture of Diffusers", tile_batch_size=4)
    args.update(kw)
    return fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0]


def quadtree(pack, fx, t):
    """A content quadtree built on an image at 8 px per latent px (scaled to the latent by the engine)."""
    H, W = t.latent.shape[-2:]
    img = fx.synthetic_photo(W * 8, H * 8, seed=1)
    p = max(t.patch)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=20.0,
                             min_tile_size=8 * max(t.tile // 2, 2 * p), min_denoise=0.6, max_denoise=1.0,
                             line_thickness=0, max_tile_size=max(64, 8 * t.tile))
    return layout


def same_shape(out, lat) -> bool:
    """``out`` has the latent's shape (ComfyUI adds the frame axis to a 4-D latent of a video-format
    family such as Qwen-Image, whose latent format is 3-D: [B, C, H, W] comes back [B, C, 1, H, W])."""
    if out.ndim == lat.ndim + 1 and out.shape[2] == 1:
        out = out.squeeze(2)
    return out.shape == lat.shape


def sample(fx, model, t, lat, denoise=0.8):
    return fx.run_ksampler(model, t.positive, t.negative, lat, steps=STEPS, cfg=CFG, denoise=denoise)


def check_inputs(pack, t, shapes, canvas):
    """Every model input of a tiled run: a tile (not the canvas), channels/frames untouched, each side a
    multiple of the family's patch and at least its minimum tile."""
    base = t.model.model
    ph, pw = t.patch
    mt = pack.model_families.min_tile(base)
    assert shapes, "the model was never called"
    for s in shapes:
        assert s[1:-2] == canvas[1:-2], (s, canvas)
        h, w = s[-2:]
        assert (h, w) != tuple(canvas[-2:]), f"the model got the whole canvas {canvas}"
        assert h % ph == 0 and w % pw == 0, f"tile {h}x{w} is not a multiple of the {ph}x{pw} patch"
        assert min(h, w) >= min(mt, *canvas[-2:]), f"tile {h}x{w} under the model's minimum {mt}"


def tiled_run(pack, fx, t, mode, n, **kw):
    """(output, latent, model input shapes) of a grid or quadtree run at batch ``n``."""
    c = pack.utils.latent_compression(t.model.model)
    m, log = fx.logged(t.model)
    lat = batch(t, n)
    if mode == "grid":
        tm = node_model(pack, fx, m, tile_width=t.tile * c, tile_height=t.tile * c, tile_overlap=t.tile * c // 2, **kw)
    else:
        kw.setdefault("variable_denoise", "schedule")
        tm = node_model(pack, fx, m, quadtree=quadtree(pack, fx, t), tile_overlap=t.tile * c // 4, **kw)
    out = sample(fx, tm, t, lat)
    return out, lat, log.shapes


@pytest.mark.parametrize("name", FAMILIES)
def test_family(pack, fx, name):
    """One tile equals untiled; grid and quadtree sample finite latents through tiles the model takes."""
    cls = next(m for m in comfy.supported_models.models if m.__name__ == name)
    if name in fam.EXCLUDED:
        reason = fam.EXCLUDED[name]
        assert _exclusion_holds(cls, reason), f"{name} is excluded as '{reason}', which no longer holds"
        pytest.skip(f"{name}: {reason}")
    if name in fam.XFAIL:
        pytest.xfail(f"{name}: {fam.XFAIL[name]}")
    if name not in fam.BUILDERS:
        pytest.fail(f"{name}: no tiny model of this family: add a builder to tests/families.py "
                    f"(or, if it cannot be image/video-tiled at all, an entry with the reason to EXCLUDED)",
                    pytrace=False)
    t = tiny(name)
    base = t.model.model
    align = pack.utils.latent_patch_size(base)       # a multiple of the patch: Lens / Ideogram 4 declare a 2x2
    assert align % t.patch[0] == 0 and align % t.patch[1] == 0, \
        f"the engine aligns {name} tiles to {align}, the model's patch is {t.patch}"

    # one tile == untiled (the canvas shape the model sees is recorded for the checks below)
    lat = batch(t, 2)
    c = pack.utils.latent_compression(base)
    H, W = lat.shape[-2:]
    ref = sample(fx, t.model, t, lat)
    m, log = fx.logged(t.model)
    one = sample(fx, node_model(pack, fx, m, tile_width=W * c, tile_height=H * c, tile_overlap=0), t, lat)
    assert log.shapes and all(s[-2:] == (H, W) for s in log.shapes)
    canvas = log.shapes[0]
    if t.max_abs_diff:
        assert (one - ref).abs().max().item() <= t.max_abs_diff
    else:
        assert torch.equal(one, ref), f"one tile differs from untiled by {(one - ref).abs().max().item():.3g}"

    for mode, n in (("grid", 2), ("quadtree", 1)):
        out, lat, shapes = tiled_run(pack, fx, t, mode, n)
        assert same_shape(out, lat) and torch.isfinite(out).all(), (mode, n)
        check_inputs(pack, t, shapes, (shapes[0][0],) + tuple(canvas[1:]))


@pytest.mark.parametrize("name", [n for n in NAMED if n in FAMILIES])
def test_named_family_both_batches(pack, fx, name):
    """The issue's named families also at the other batch size of each mode (grid batch 1, quadtree with
    variable denoise at batch 2), and the quadtree run is really variable: it differs from a uniform one."""
    t = tiny(name)
    outs = {}
    for mode, n in (("grid", 1), ("quadtree", 2)):
        out, lat, shapes = tiled_run(pack, fx, t, mode, n)
        assert same_shape(out, lat) and torch.isfinite(out).all(), (mode, n)
        for s in shapes:
            h, w = s[-2:]
            assert h % t.patch[0] == 0 and w % t.patch[1] == 0 and (h, w) != tuple(lat.shape[-2:])
            if t.frames is not None:
                assert s[2] == t.frames
        outs[mode] = out
    uniform, _, _ = tiled_run(pack, fx, t, "quadtree", 2, variable_denoise="off")
    assert not torch.equal(outs["quadtree"], uniform), "variable denoise changed nothing"


# --------------------------------------------------------------------------- positions (issue 20)

class Received:
    """What the diffusion model receives in each call (forward pre-hook: x, t and its keyword inputs), and
    what the submodules named "in:<path>" receive / "out:<path>" make, one entry per call."""

    def __init__(self, dm, names):
        self.calls, self.mods = [], {n: [] for n in names if ":" in n}
        self.hooks = [dm.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for n in self.mods:
            kind, path = n.split(":", 1)
            mod, rec = dm.get_submodule(path), self.mods[n].append
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, rec=rec: rec(a[0].detach().clone()))
                              if kind == "in" else
                              mod.register_forward_hook(lambda m, a, o, rec=rec: rec(o.detach().clone())))

    def _pre(self, module, args, kwargs):
        d = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}
        d["x"], d["t"] = args[0].detach().clone(), args[1].detach().clone()
        self.calls.append(d)

    def close(self):
        for h in self.hooks:
            h.remove()

    def value(self, i, name, latent_channels):
        if name == "c_concat":
            return self.calls[i]["x"][:, latent_channels:]
        return self.mods[name][i] if ":" in name else self.calls[i][name]


def received(pack, fx, t, names, **tiling):
    """(Received, CallLog) of one sampler step (CFG 2, fixed noise: every latent place has values of its own)
    from the family's latent; tiled by Quadtree Diffusion with ``tiling`` when it is given."""
    import nodes as comfy_nodes
    m, log = fx.logged(t.model)
    if tiling:
        m = node_model(pack, fx, m, variable_denoise="off", **tiling)
    rec = Received(t.model.model.diffusion_model, names)
    lat = {"samples": batch(t, 1)}
    if "noise_mask" in t.extra:
        lat["noise_mask"] = t.extra["noise_mask"]
    try:
        comfy_nodes.KSamplerAdvanced().sample(m, "enable", 1, 4, 2.0, "euler", "simple", t.positive, t.negative,
                                              lat, 2, 3, "enable")
    finally:
        rec.close()
    assert len(rec.calls) == len(log.calls) and all(len(v) == len(rec.calls) for v in rec.mods.values())
    return rec, log


def places(tile, canvas, tol: float) -> list[tuple[int, int]]:
    """Every (Y, X) at which ``tile`` [..., h, w] is ``canvas`` [..., Y:Y+h, X:X+w] (same leading dims)."""
    h, w = tile.shape[-2:]
    H, W = canvas.shape[-2:]
    if tile.shape[:-2] != canvas.shape[:-2] or h > H or w > W:
        return []
    first = (canvas[..., :H - h + 1, :W - w + 1] - tile[..., :1, :1]).abs()
    hits = first.reshape(-1, H - h + 1, W - w + 1).amax(0) <= tol
    return [(Y, X) for Y, X in hits.nonzero().tolist() if (canvas[..., Y:Y + h, X:X + w] - tile).abs().max() <= tol]


def latent_place(x, canvas_x) -> tuple[int, int]:
    """(row, col) on the canvas of a model-input row's latent ``x`` [C, (T,) h, w]: where the canvas call's
    latent (noise: unique per place) holds it."""
    found = places(x, canvas_x, 1e-6)
    assert len(found) == 1, f"the tile's latent is at {found} of the canvas's, not at one place"
    return found[0]


def as_picture(v, x):
    """A timestep row per token of the latent row ``x`` [C, T, h, w] as [T, h, w]; anything else as is."""
    n = x[0].numel()
    return v.reshape(x.shape[1:]) if x.ndim == 4 and v.numel() == n else v


def check_places(rec, log, canvas_rec, canvas_log, names, C, H, W) -> set:
    """Every row of every tiled call: each named input is, exactly and only, the canvas call's at the place of
    the row's latent (at the input's scale); a timestep per frame (or per row) is the canvas call's.  Returns
    the latent places seen."""
    (cl,) = canvas_log.calls
    n_chunks = len(cl.cou)
    Nc = cl.x.shape[0]
    B = Nc // n_chunks
    seen = set()
    for i, call in enumerate(log.calls):
        assert call.cou == cl.cou
        k = call.x.shape[0] // Nc
        for r in range(call.x.shape[0]):
            cr = r // (k * B) * B + r % B
            y0, x0 = latent_place(rec.calls[i]["x"][r, :C], canvas_rec.calls[0]["x"][cr, :C])
            seen.add((y0, x0))
            for name in names:
                xr = rec.calls[i]["x"][r, :C]
                v = as_picture(rec.value(i, name, C)[r], xr)
                cv = as_picture(canvas_rec.value(0, name, C)[cr], canvas_rec.calls[0]["x"][cr, :C])
                tol = 1e-5 * (1 + cv.abs().max().item())
                if v.ndim < 2 or v.shape[-2:] == cv.shape[-2:] and v.ndim < 3:     # per frame / per row
                    assert (v - cv).abs().max() <= tol, f"{name}: tile at {(y0, x0)} differs from the canvas's"
                    continue
                sy, sx = cv.shape[-2] / H, cv.shape[-1] / W
                Y, X = y0 * sy, x0 * sx
                assert Y == int(Y) and X == int(X), \
                    f"{name}: the tile at latent {(y0, x0)} does not start on its grid ({1 / sy:g} latent px)"
                found = places(v, cv, tol)
                assert found == [(int(Y), int(X))], \
                    f"{name}: the tile at latent {(y0, x0)} meets it at {found}, the canvas at {(int(Y), int(X))}"
    return seen


@pytest.mark.parametrize("name", sorted(fam.POSITIONAL))
def test_positional_inputs_meet_each_tile_where_the_canvas_does(pack, fx, name):
    """Every model input of the family that relates to the canvas by place (families.POSITIONAL: masks, concat
    latents, control / pose / camera / motion frames, per-token and per-frame timesteps, inputs the model
    resamples itself), as the diffusion model receives it in each tiled call: for every row, it is the canvas
    call's input at the canvas place of the row's latent, and nowhere else (the latent and the inputs are
    coordinate-coded).  Grid at tile batch 4 and quadtree at tile batch 2, CFG 2, through the real KSampler."""
    if name not in FAMILIES:
        pytest.skip(f"this ComfyUI has no {name} family")
    t = tiny(name)
    names = fam.POSITIONAL[name]
    c = pack.utils.latent_compression(t.model.model)
    canvas_rec, canvas_log = received(pack, fx, t, names)
    (cl,) = canvas_log.calls
    C, (H, W) = cl.x.shape[1], cl.x.shape[-2:]
    for name_ in names:        # coded: a picture input of the canvas call differs from place to place
        v = as_picture(canvas_rec.value(0, name_, C)[0], canvas_rec.calls[0]["x"][0, :C])
        assert v.ndim < 3 or not torch.equal(v, v.flatten()[0].expand_as(v)), f"{name_} is not coded"
    for tiling in (dict(tile_width=t.tile * c, tile_height=t.tile * c, tile_overlap=t.tile * c // 2, tile_batch_size=4),
                   dict(quadtree=quadtree(pack, fx, t), tile_overlap=t.tile * c // 4, tile_batch_size=2)):
        rec, log = received(pack, fx, t, names, **tiling)
        seen = check_places(rec, log, canvas_rec, canvas_log, names, C, H, W)
        assert len(seen) > 1 and (0, 0) in seen, seen
