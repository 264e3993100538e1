"""Reference images of edit models, per tile: every tile meets the reference where the canvas does.

Edit models (FLUX Kontext, Flux.2 / Klein, Qwen-Image-Edit, Krea 2, Omnigen2, ...) take reference
latents (``ref_latents``, from ComfyUI's ReferenceLatent node) and match each canvas token with the
reference token of the same RoPE position id; a tile evaluated alone would meet the reference's corner
(FLUX) or centre (Qwen-Image).  reference_positions.py has the maths; this file applies it to a tile
batch's model kwargs (``reference mode`` of Quadtree Diffusion):

* **crop to tile** (default): a reference that covers the canvas in the untiled relation (every canvas
  token has its partner: a reference of the canvas's size, the usual edit-model upscale) is cropped to
  each tile's box, so a tile's reference tokens shrink with the tile (memory bounded by the tile) and the
  tile and its crop restart their ids together (no id moved).  A tile loses the reference outside its
  window.  A reference that does not cover the canvas (smaller, or placed beside / after the canvas by
  the "offset" / "uxo" methods) is given whole.
* **whole image**: every reference whole in every tile: the canvas call restricted to the tile's tokens.

A whole reference's ids are moved per model-input row by a ``post_input`` patch (ComfyUI calls it with
the assembled ids before the position embedding; nothing is patched).  A family without that patch point
(or a ComfyUI whose model does not call it) cannot have ids moved: what would need it is refused with a
clear error.  A window that is the whole canvas gets every reference whole (one tile == untiled, bit for
bit).  Wan's ``reference_latent`` and HunyuanVideo's ``ref_latent`` are checked here too
(:func:`check_canvas_grid`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from . import reference_positions as rp
from .reference_positions import tokens

KEY = "ref_latents"
METHOD_KEY = "ref_latents_method"
CROP, WHOLE = "crop to tile", "whole image"
MODES = (CROP, WHOLE)


def scheme_of(base_model) -> rp.Scheme | None:
    dm = getattr(base_model, "diffusion_model", None)
    for cls in type(dm).__mro__:
        s = rp.SCHEMES.get(cls.__name__)
        if s is not None:
            return s
    return None


def reads_references(base_model) -> bool:
    """Whether the diffusion model's ``forward`` (or the ``_forward`` it wraps) takes ``ref_latents``; else
    they go to ``**kwargs``, unread."""
    cls = type(getattr(base_model, "diffusion_model", None))
    for name in ("forward", "_forward"):
        fn = getattr(cls, name, None)
        try:
            if fn is not None and "ref_latents" in inspect.signature(fn).parameters:
                return True
        except (TypeError, ValueError):
            return True
    return False


# --------------------------------------------------------------------------- per model call

@dataclass(frozen=True)
class RefSet:
    """The references of one model call: each one's latent (h, w), its untiled partner offset (o_y, o_x)
    and whether tiles get a crop of it; the RoPE id step of the canvas."""
    scheme: rp.Scheme
    method: str | None
    p: int
    canvas: tuple
    shapes: tuple
    offsets: tuple
    crop: tuple
    step: tuple

    def given(self, win) -> tuple:
        """Per reference, what window ``win`` is given: (crop origin (y0, x0) in latent px, or None for
        whole; (h, w))."""
        whole_canvas = (win.y0, win.x0, win.y1, win.x1) == (0, 0, *self.canvas)
        out = []
        for k, shape in enumerate(self.shapes):
            if self.crop[k] and not whole_canvas:
                y0, y1, x0, x1 = rp.crop_box(win, self.offsets[k], shape, self.p)
                out.append(((y0, x0), (y1 - y0, x1 - x0)))
            else:
                out.append((None, shape))
        return tuple(out)


def rope_step(scheme: rp.Scheme, to) -> tuple[float, float]:
    ro = (to or {}).get("rope_options") if scheme.rope else None
    if not isinstance(ro, dict):
        return 1.0, 1.0
    return float(ro.get("scale_y", 1.0)), float(ro.get("scale_x", 1.0))


def ref_set(base_model, c: dict, H: int, W: int, p: int, mode: str) -> RefSet | None:
    """The call's references, or None without any (or where the model ignores them).  Refuses (clear
    error) a family that reads references whose positions the pack does not know."""
    refs = c.get(KEY)
    if not isinstance(refs, (list, tuple)) or not refs:
        return None
    scheme = scheme_of(base_model)
    if scheme is None:
        if not reads_references(base_model):
            return None         # e.g. Chroma: ComfyUI builds ref_latents for it, its forward ignores them
        name = type(getattr(base_model, "diffusion_model", None)).__name__
        raise ValueError(f"reference latents: Quadtree Diffusion does not know how {name} places reference images "
                         f"relative to the canvas, so a tile would meet the wrong part of the reference; remove the "
                         f"ReferenceLatent conditioning or Quadtree Diffusion for this model")
    method = c.get(METHOD_KEY)
    method = method if isinstance(method, str) else scheme.default_method(base_model.diffusion_model)
    if scheme.needs_method and method is None:
        return None             # the model ignores its references (Krea 2 without a method)
    shapes = tuple((int(r.shape[-2]), int(r.shape[-1])) for r in refs)
    Ht, Wt = tokens(H, p), tokens(W, p)
    offsets, crop = [], []
    for (rh, rw), (ph, pw) in zip(shapes, rp.placements(scheme, method, (H, W), shapes, p)):
        oy = rp.partner_offset(scheme, Ht, tokens(rh, p), ph)
        ox = rp.partner_offset(scheme, Wt, tokens(rw, p), pw)
        offsets.append((oy, ox))
        crop.append(mode == CROP and rp.covers(oy, Ht, tokens(rh, p)) and rp.covers(ox, Wt, tokens(rw, p)))
    return RefSet(scheme, method, p, (H, W), shapes, tuple(offsets), tuple(crop),
                  rope_step(scheme, c.get("transformer_options")))


# --------------------------------------------------------------------------- per tile batch

@dataclass
class BatchGeometry:
    """What does not change between steps for one batch of windows (kept for the run): per window what
    it is given, and per model-input row the shifts, the expected first ids and the crop origins."""
    given: list                 # per window: RefSet.given
    shifts: torch.Tensor        # [rows, n_refs, 2]
    natural: torch.Tensor       # [rows, n_refs, 2]: expected first-token (h, w) id of each given reference
    tile_origin: torch.Tensor   # [rows, 2]: expected first canvas token's (h, w) id
    origins: torch.Tensor       # [rows, n_refs, 2]: o_k, the crop's first token in the reference (0 if whole)
    grids: list                 # (t, h, w) tokens of each given reference

    @property
    def needed(self) -> bool:
        return bool((self.shifts != 0).any())


def batch_geometry(rs: RefSet, wins, n_chunks: int, B: int, frames) -> BatchGeometry:
    """The :class:`BatchGeometry` of windows ``wins`` (rows chunk-major, then window, then batch item);
    a reference whose crops differ in size within the batch is given whole to all of it."""
    given = [list(rs.given(w)) for w in wins]
    for k, shape in enumerate(rs.shapes):
        if len({g[k][1] for g in given}) > 1:
            for g in given:
                g[k] = (None, shape)
    sc, p, m = rs.scheme, rs.p, rs.method
    per_row = lambda values: _rows(values, n_chunks, B)      # noqa: E731
    return BatchGeometry(
        given=given,
        shifts=per_row([rp.shifts(sc, m, p, rs.canvas, rs.shapes, g, w, rs.step) for g, w in zip(given, wins)]),
        natural=per_row([rp.natural_origins(sc, m, p, w, g) for g, w in zip(given, wins)]),
        tile_origin=per_row([rp.tile_origin(sc, p, w) for w in wins]),
        origins=per_row([[(0.0, 0.0) if o is None else (o[0] / p, o[1] / p) for o, _ in g] for g in given]),
        grids=[(f, tokens(h, p), tokens(w, p)) for f, (_, (h, w)) in zip(frames, given[0])])


def _rows(values, n_chunks: int, B: int) -> torch.Tensor:
    """Values per window [k, ...] -> per model-input row [n_chunks * k * B, ...] (chunk-major, window, item)."""
    v = torch.tensor(values, dtype=torch.float64)
    return v[None, :, None].expand(n_chunks, v.shape[0], B, *v.shape[1:]).reshape(-1, *v.shape[1:])


class ReferencePositions:
    """A ``post_input`` patch of one tile batch: adds each model-input row's shift to the (h, w) ids of
    its reference tokens.  ComfyUI appends the references after the canvas tokens, last, so reference k's
    tokens end ``sum(tokens of k+1..)`` before the end (this patch runs first, before any patch that may
    append tokens of its own).  Once per run and set of references it also checks that ComfyUI placed each
    reference where reference_positions.placements says, so a ComfyUI that places references differently
    fails with a clear error instead of sampling a wrong image."""

    def __init__(self, geo: BatchGeometry, step, checked: set | None = None, key=None):
        self.geo = geo
        self.counts = [t * h * w for t, h, w in geo.grids]
        self.step = torch.tensor(step, dtype=torch.float64)
        self.calls = 0
        self.checked, self.key = (checked if checked is not None else set()), key

    def __call__(self, args, *extra, **kwargs):
        ids, geo = args["img_ids"], self.geo
        rows, L = ids.shape[0], ids.shape[1]
        if rows != geo.shifts.shape[0] or L < sum(self.counts) or ids.dim() != 3 or ids.shape[-1] < 3:
            raise RuntimeError(f"reference latents: the model's position ids {list(ids.shape)} do not hold "
                               f"{geo.shifts.shape[0]} rows with {sum(self.counts)} reference tokens after the "
                               f"canvas's; this ComfyUI builds reference positions in a way Quadtree Diffusion "
                               f"does not know: please report it")
        if self.key not in self.checked:       # once per run and reference set: it costs a host sync
            self._check_placement(ids)
            self.checked.add(self.key)
        new = ids.clone()
        step = self.step.to(ids.device, torch.float32)
        end = L
        for k in range(len(self.counts) - 1, -1, -1):
            start = end - self.counts[k]
            # ComfyUI 0.3.x does not apply RoPE options to references: their ids step by 1, not by the
            # canvas's scale, so the o_k * s term of the shift takes the step the reference really has
            _, gh, gw = geo.grids[k]
            s_ref = step.clone()
            if gh > 1:
                s_ref[0] = ids[0, start + gw, 1] - ids[0, start, 1]
            if gw > 1:
                s_ref[1] = ids[0, start + 1, 2] - ids[0, start, 2]
            shift = geo.shifts[:, k].to(ids.device, torch.float32) \
                + geo.origins[:, k].to(ids.device, torch.float32) * (s_ref - step)
            new[:, start:end, 1:3] += shift[:, None, :].to(new.dtype)
            end = start
        self.calls += 1
        out = dict(args)
        out["img_ids"] = new
        return out

    def _check_placement(self, ids) -> None:
        """RoPE shifts (rope_options; LongCat's own) move the canvas, and on newer ComfyUI the references
        too: each reference starts where expected, or where expected plus the canvas's own move."""
        geo = self.geo
        moved = ids[:, 0, 1:3].double().cpu() - geo.tile_origin
        end = ids.shape[1]
        for k in range(len(self.counts) - 1, -1, -1):
            start = end - self.counts[k]
            off = ids[:, start, 1:3].double().cpu() - geo.natural[:, k]
            if not (torch.allclose(off, torch.zeros_like(off), atol=1e-3) or torch.allclose(off, moved, atol=1e-3)):
                raise RuntimeError(f"reference latents: ComfyUI placed reference {k} at (h, w) ids "
                                   f"{ids[0, start, 1:3].tolist()}, where Quadtree Diffusion expected "
                                   f"{geo.natural[0, k].tolist()}; this ComfyUI places references in a way the pack "
                                   f"does not know, so tiles could meet the wrong part of the reference: please "
                                   f"report it")
            end = start

    def check(self, base_model) -> None:
        """After the model call (or before it, for a family known to have no hook): a shift that was
        needed must have been applied."""
        if self.calls == 0 and self.geo.needed:
            name = type(getattr(base_model, "diffusion_model", None)).__name__
            raise RuntimeError(f"reference latents: {name} (this ComfyUI) has no 'post_input' patch point to move "
                               f"position ids, so Quadtree Diffusion cannot place a reference image that is smaller "
                               f"than the canvas, placed beside it, or given whole to a tile; give references at "
                               f"least the canvas's size with reference_mode '{CROP}', or use one tile (a newer "
                               f"ComfyUI may add the patch point)")


def tile_references(ct: dict, c: dict, rs: RefSet, wins, n_chunks: int, N: int, base_model=None, cache=None):
    """The tile batch's model kwargs with each reference cropped where :class:`RefSet` says, and a
    :class:`ReferencePositions` patch first in ``transformer_options['patches']['post_input']``
    (geometry kept in ``cache`` for the run).  Returns (kwargs, patch or None)."""
    B = N // n_chunks
    full = list(c[KEY])
    key = ("refs", rs, tuple((w.y0, w.y1, w.x0, w.x1) for w in wins), n_chunks, B)
    geo = cache.get(key) if cache is not None else None
    if geo is None:
        frames = [int(r.shape[-3]) if r.dim() == 5 else 1 for r in full]
        geo = batch_geometry(rs, wins, n_chunks, B, frames)
        if cache is not None:
            cache[key] = geo
    refs = list(ct[KEY])
    for i, v in enumerate(full):
        if geo.given[0][i][0] is None or not torch.is_tensor(v) or v.shape[0] != N:
            continue
        vv = v.reshape(n_chunks, B, *v.shape[1:])
        crops = [vv[..., y0:y0 + gh, x0:x0 + gw] for (y0, x0), (gh, gw) in (g[i] for g in geo.given)]
        refs[i] = torch.stack(crops, dim=1).reshape(-1, *v.shape[1:-2], *crops[0].shape[-2:])
    ct = dict(ct)
    ct[KEY] = refs
    checked = cache.setdefault(("refs", "placement checked"), set()) if cache is not None else None
    patch = ReferencePositions(geo, rs.step, checked, rs)
    if not rs.scheme.hook:
        patch.check(base_model)         # no patch point: refuse before the model call
        return ct, None
    to = dict(ct.get("transformer_options") or {})
    patches = dict(to.get("patches") or {})
    patches["post_input"] = [patch] + list(patches.get("post_input") or [])
    to["patches"] = patches
    ct["transformer_options"] = to
    return ct, patch


# --------------------------------------------------------------------------- references on the canvas's grid

# Model inputs that a family reads as an image on the canvas's own token grid (ids from 0, like the
# canvas's), so each tile takes its crop: (diffusion-model class name, key).  A size other than the
# canvas's would meet the canvas index by index (top-left), which a crop cannot keep and no patch point
# can move.
GRID_INPUTS = {("WanModel", "reference_latent"): "a Wan reference image (Fun / Animate ref_conv, S2V, HuMo, SCAIL)",
               ("WanModel", "context_latents"): "a Wan Bernini context video or image"}

# Model inputs placed beside the canvas at an offset of the canvas's width: (ComfyUI model class name, i.e.
# the model_base class that builds the input, key) -> what it is.
BESIDE_CANVAS = {("HunyuanVideo", "ref_latent"): "HunyuanVideo's image-to-video reference (custom guidance)",
                 ("HiDream", "image_cond"): "HiDream-E1's source image (concat_latent_image)"}


def _class_names(obj) -> set:
    return {cls.__name__ for cls in type(obj).__mro__}


def check_canvas_grid(c: dict, base_model, H: int, W: int, windows) -> None:
    """Refuse, with a clear error, reference inputs no tile can meet where the canvas does:
    :data:`GRID_INPUTS` of another size than the canvas, and :data:`BESIDE_CANVAS` inputs when a
    window is narrower than the canvas (their ids start at the canvas's width: a tile's differ)."""
    names = _class_names(getattr(base_model, "diffusion_model", None))
    for (cls, key), what in GRID_INPUTS.items():
        if cls not in names or key not in c:
            continue
        v = c[key]
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if torch.is_tensor(t) and t.dim() >= 4 and tuple(t.shape[-2:]) != (H, W):
                raise ValueError(f"{key}: {what} of {t.shape[-1]}x{t.shape[-2]} latent px, on a canvas of {W}x{H}: "
                                 f"the model lays it on the canvas's own grid, so each tile needs its crop, and a "
                                 f"reference of another size cannot be placed per tile; encode the reference at the "
                                 f"canvas's size, or remove Quadtree Diffusion")
    bases = _class_names(base_model)
    for (cls, key), what in BESIDE_CANVAS.items():
        if cls in bases and torch.is_tensor(c.get(key)) and any(w.x1 - w.x0 < W for w in windows):
            raise ValueError(f"{key}: {what} is placed beside the canvas at the canvas's width, which a narrower "
                             f"tile cannot keep; set tile_width to at least the image's width (tiles then split "
                             f"its height only), or remove Quadtree Diffusion")


def describe(base_model) -> str:
    """How this model's reference images are tiled, in a few words (the README's family table)."""
    names = _class_names(getattr(base_model, "diffusion_model", None))
    found = [f"`{key}` cropped (canvas-sized; other sizes refused)" for (cls, key) in GRID_INPUTS
             if cls in names and key == "reference_latent"]
    found += [f"`{key}`: tiles of the full width only" for (cls, key) in BESIDE_CANVAS if cls in _class_names(base_model)]
    scheme = scheme_of(base_model)
    if scheme is not None and reads_references(base_model):
        found.append("cropped to the tile, or whole with ids moved per tile" if scheme.hook else
                     "cropped to the tile (references at least the canvas's size; others refused)")
    return "; ".join(found) or "-"
