"""Reference images of edit models, per tile: every tile meets the reference where the canvas does.

Edit models (FLUX Kontext, Flux.2 / Klein, Qwen-Image-Edit) take reference latents (``ref_latents``,
from ComfyUI's ReferenceLatent node) and put their tokens into the same sequence as the canvas's,
each with a RoPE position id (index, h, w).  Untiled, the first reference's (h, w) ids cover the
canvas's grid: the canvas token at patch (Y, X) shares its (h, w) ids with the reference token that
holds the reference's patch (Y, X) (FLUX: ids from 0; Qwen-Image: ids centred per image, so a
reference of another size meets the canvas centre to centre).  A tile evaluated alone builds its
ids from its own size, so without care its token at canvas (Y, X) meets the reference's patch
(Y - y0, X - x0): every tile redraws the reference's corner (or centre).

The relation that matters is the difference of ids (RoPE attention depends only on it), so the
tile keeps the ids ComfyUI gives it and each reference token is moved by what the tile call does
differently from the canvas call.  For reference k, token row r of what the tile is given:

    id_untiled = P_k + (o_k + r) * s - c(H_k)          (o_k: the crop's first row in the reference)
    id_tile    = P'_k + r * s - c(h_k)                  (what ComfyUI builds for the tile call)
    delta      = c(H) - c(h) - Y0 * s                   (tile token 0 <- canvas token Y0)
    shift_k    = id_untiled + delta - id_tile
               = (P_k - P'_k) + o_k * s - c(H_k) + c(h_k) + c(H) - c(h) - Y0 * s

with P the reference's placement (ComfyUI's loop over references, :func:`placements`), c the
family's centring (Qwen-Image: n // 2 tokens, FLUX: 0), s the RoPE step (``rope_options`` scale, 1
by default), H/h the canvas/tile and H_k/h_k the reference's/given tokens; the same along w.  The
shift is added to the reference tokens' ids per model-input row by a ``post_input`` patch
(``transformer_options["patches"]["post_input"]``: ComfyUI calls it with the assembled ids before
the position embedding; nothing is patched).

What a tile is given (``reference mode`` of Quadtree Diffusion):

* **crop to tile** (default): a reference that covers the canvas in the untiled relation (every
  canvas token has its partner: e.g. a reference of the canvas's size, the usual img2img edit) is
  cropped to the tile's box, so a tile's reference tokens shrink with the tile (memory bounded by
  the tile); its shift is then 0 for FLUX and Qwen-Image (no hook needed).  A tile loses the
  reference outside its window.  A reference that does not cover the canvas (smaller, or placed
  beside / after the canvas by the "offset" / "uxo" methods) is given whole.
* **whole image**: every reference whole in every tile (the canvas call restricted to the tile's
  tokens: exact, but each tile carries all reference tokens).

A window that is the whole canvas gets every reference whole (one tile == untiled, bit for bit).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .utils import P

log = logging.getLogger(__name__)

KEY = "ref_latents"
METHOD_KEY = "ref_latents_method"
CROP, WHOLE = "crop to tile", "whole image"
MODES = (CROP, WHOLE)


ANY = None        # a family without reference methods: every reference placed on its own, at (h, w) offset 0


@dataclass(frozen=True)
class Scheme:
    """How a family places reference tokens, read from its ``_forward`` (see the module docstring).

    ``independent``: methods that put every reference at (h, w) offset 0 (each its own index), or
    :data:`ANY` where the family has no methods and always does; ``after_canvas``: methods that put
    references after the canvas, diagonally (FLUX "uxo"); any other method places each reference
    beside the previous ones (ComfyUI's "offset" branch).  ``centred``: ids centred per image
    (id = i - n // 2).  ``rope``: the canvas ids follow ``transformer_options["rope_options"]``
    (scale = id step).  ``needs_method``: references are ignored unless a method is set (Krea 2).
    ``hook``: ComfyUI calls ``post_input`` patches with the ids (else only shift-free crops work)."""
    family: str
    centred: bool = False
    rope: bool = False
    independent: frozenset | None = ANY
    after_canvas: frozenset = frozenset()
    default_attr: tuple = ("",)          # where the model keeps its default method, and the fallback value
    needs_method: bool = False
    hook: bool = True

    def default_method(self, dm) -> str | None:
        obj = dm
        for name in self.default_attr[:-1]:
            obj = getattr(obj, name, None)
        return obj if isinstance(obj, str) else self.default_attr[-1]

    def places_independently(self, method) -> bool:
        return self.independent is ANY or method in self.independent


FLUX = Scheme("FLUX", rope=True, independent=frozenset({"index", "index_timestep_zero"}),
              after_canvas=frozenset({"uxo"}), default_attr=("params", "default_ref_method", "offset"))
QWEN = Scheme("Qwen-Image", centred=True, independent=frozenset({"index", "index_timestep_zero", "negative_index"}),
              default_attr=("default_ref_method", "index"))
KREA2 = Scheme("Krea 2", default_attr=("default_ref_method", None), needs_method=True)
# No post_input hook: (h, w) ids from 0 for the canvas and for every reference (Omnigen2 / Boogu also move
# the canvas's index axis by each reference's longer side: a crop moves it by the crop's, i.e. the tile is
# placed like an edit of the tile's size), so only a crop of a covering reference keeps the relation.
OMNIGEN2 = Scheme("OmniGen2 / Boogu", hook=False)
LUMINA = Scheme("Lumina 2 / Z-Image", rope=True, hook=False)
JOYIMAGE = Scheme("JoyImage", hook=False)

# Diffusion-model class name -> scheme (by class, never by ComfyUI version).
SCHEMES = {"Flux": FLUX, "QwenImageTransformer2DModel": QWEN, "SingleStreamDiT": KREA2,
           "OmniGen2Transformer2DModel": OMNIGEN2, "BooguTransformer2DModel": OMNIGEN2, "NextDiT": LUMINA,
           "JoyImageTransformer3DModel": JOYIMAGE}


def scheme_of(base_model) -> Scheme | None:
    dm = getattr(base_model, "diffusion_model", None)
    for cls in type(dm).__mro__:
        s = SCHEMES.get(cls.__name__)
        if s is not None:
            return s
    return None


def reads_references(base_model) -> bool:
    """Whether the diffusion model's ``forward`` (or the ``_forward`` it wraps) takes ``ref_latents``; else
    they go to ``**kwargs``, unread."""
    import inspect
    cls = type(getattr(base_model, "diffusion_model", None))
    for name in ("forward", "_forward"):
        fn = getattr(cls, name, None)
        try:
            if fn is not None and "ref_latents" in inspect.signature(fn).parameters:
                return True
        except (TypeError, ValueError):
            return True
    return False


# --------------------------------------------------------------------------- the maths

def tokens(n: int, p: int) -> int:
    """Tokens of n latent px with patch p, as ComfyUI counts them (it pads): (n + p // 2) // p."""
    return (int(n) + p // 2) // p


def centre(scheme: Scheme, n_tokens: int) -> int:
    """c(n): n // 2 for families that centre ids per image, else 0."""
    return n_tokens // 2 if scheme.centred else 0


def placements(scheme: Scheme, method: str, canvas_hw, refs_hw, p: int) -> list[tuple[int, int]]:
    """P_k: the (h, w) token offset ComfyUI's ``_forward`` gives reference k before building its ids
    (``process_img(ref, h_offset, w_offset)``, offsets in latent px turned into tokens with rounding):

    * independent methods ("index", ...): (0, 0);
    * after the canvas ("uxo"): (H * p + sum of previous heights, W * p + sum of previous widths);
    * otherwise ("offset"): beside the previous references along the shorter running side.
    """
    H, W = tokens(canvas_hw[0], p), tokens(canvas_hw[1], p)
    out, h, w = [], 0, 0
    for rh, rw in refs_hw:
        if scheme.places_independently(method):
            ho = wo = 0
        elif method in scheme.after_canvas:
            ho, wo = H * p + h, W * p + w
            h, w = h + rh, w + rw
        else:
            ho = wo = 0
            if rh + h > rw + w:
                wo = w
            else:
                ho = h
            h, w = max(h, rh + ho), max(w, rw + wo)
        out.append((tokens(ho, p), tokens(wo, p)))
    return out


def partner_offset(scheme: Scheme, canvas_tok: int, ref_tok: int, placement: int):
    """o: the reference token that shares its id with canvas token 0 along one axis, untiled
    (canvas token Y meets reference token Y + o): o = c(H_k) - c(H) - P_k (in tokens)."""
    return centre(scheme, ref_tok) - centre(scheme, canvas_tok) - placement


def covers(o: int, canvas_tok: int, ref_tok: int) -> bool:
    """Every canvas token has a partner in the reference along this axis: 0 <= o and o + H <= H_k."""
    return 0 <= o and o + canvas_tok <= ref_tok


# --------------------------------------------------------------------------- per model call

@dataclass
class RefSet:
    """The references of one model call and, per reference, whether tiles get a crop of it.

    ``shapes``: each reference's latent (h, w); ``placement``: P_k untiled; ``offset``: (o_y, o_x) of
    the untiled partner relation; ``crop``: True where the reference covers the canvas and mode is crop."""
    scheme: Scheme
    method: str
    p: int
    canvas: tuple
    shapes: list
    placement: list
    offset: list
    crop: list
    step: tuple                     # (s_y, s_x): RoPE id step of the canvas

    @property
    def any_crop(self) -> bool:
        return any(self.crop)


def rope_step(scheme: Scheme, to: dict) -> tuple[float, float]:
    ro = (to or {}).get("rope_options") if scheme.rope else None
    if not isinstance(ro, dict):
        return 1.0, 1.0
    return float(ro.get("scale_y", 1.0)), float(ro.get("scale_x", 1.0))


def ref_set(base_model, c: dict, H: int, W: int, p: int, mode: str) -> RefSet | None:
    """The call's references, or None without any.  Refuses (clear error) a family whose reference
    positions the pack does not know."""
    refs = c.get(KEY)
    if not isinstance(refs, (list, tuple)) or not refs:
        return None
    scheme = scheme_of(base_model)
    if scheme is None and not reads_references(base_model):
        return None             # e.g. Chroma: ComfyUI builds ref_latents for it, its forward ignores them
    if scheme is None:
        name = type(getattr(base_model, "diffusion_model", None)).__name__
        raise ValueError(f"reference latents: Quadtree Diffusion does not know how {name} places reference images "
                         f"relative to the canvas, so a tile would meet the wrong part of the reference; remove the "
                         f"ReferenceLatent conditioning or Quadtree Diffusion for this model")
    dm = base_model.diffusion_model
    method = c.get(METHOD_KEY)
    method = method if isinstance(method, str) else scheme.default_method(dm)
    if scheme.needs_method and method is None:
        return None             # the model ignores its references (Krea 2 without a method)
    shapes = [(int(r.shape[-2]), int(r.shape[-1])) for r in refs]
    place = placements(scheme, method, (H, W), shapes, p)
    Ht, Wt = tokens(H, p), tokens(W, p)
    offset, crop = [], []
    for (rh, rw), (ph, pw) in zip(shapes, place):
        oy = partner_offset(scheme, Ht, tokens(rh, p), ph)
        ox = partner_offset(scheme, Wt, tokens(rw, p), pw)
        offset.append((oy, ox))
        crop.append(mode == CROP and covers(oy, Ht, tokens(rh, p)) and covers(ox, Wt, tokens(rw, p)))
    return RefSet(scheme, method, p, (H, W), shapes, place, offset, crop,
                  rope_step(scheme, c.get("transformer_options")))


def crop_box(rs: RefSet, k: int, win) -> tuple[int, int, int, int]:
    """Reference k's latent rows/cols for the tile window ``win``: its partner tokens (o + Y0 ...),
    as many tokens as the tile has (a window with an odd size flush with the canvas edge takes the
    reference's next px too where there is one, so each token holds what the untiled one holds)."""
    p = rs.p
    rh, rw = rs.shapes[k]
    oy, ox = rs.offset[k]
    y0, x0 = win.y0 + oy * p, win.x0 + ox * p
    y1 = min(rh, y0 + tokens(win.y1 - win.y0, p) * p)
    x1 = min(rw, x0 + tokens(win.x1 - win.x0, p) * p)
    return y0, y1, x0, x1


def tile_shifts(rs: RefSet, wins, given: list, Hc: int, Wc: int) -> torch.Tensor:
    """shift_k (module docstring) per tile window and reference: [k_tiles, n_refs, 2] (h, w), with
    ``given[k]`` = ([(y0, x0)] origin of the crop per window, or None for whole) and sizes."""
    p, sc = rs.p, rs.scheme
    n = len(rs.shapes)
    out = torch.zeros(len(wins), n, 2, dtype=torch.float64)
    Ht, Wt = tokens(Hc, p), tokens(Wc, p)
    for j, win in enumerate(wins):
        ht, wt = tokens(win.y1 - win.y0, p), tokens(win.x1 - win.x0, p)
        sizes = [g[1] for g in given[j]]
        place_t = placements(sc, rs.method, (win.y1 - win.y0, win.x1 - win.x0), sizes, p)
        for k in range(n):
            origin, (gh, gw) = given[j][k]
            oy, ox = (origin[0] / p, origin[1] / p) if origin is not None else (0.0, 0.0)
            rh, rw = rs.shapes[k]
            for a, (P0, Pt, o, Hk, hk, Hcan, htile, Y0, s) in enumerate((
                    (rs.placement[k][0], place_t[k][0], oy, tokens(rh, p), tokens(gh, p), Ht, ht, win.y0 / p,
                     rs.step[0]),
                    (rs.placement[k][1], place_t[k][1], ox, tokens(rw, p), tokens(gw, p), Wt, wt, win.x0 / p,
                     rs.step[1]))):
                out[j, k, a] = (P0 - Pt) + o * s - centre(sc, Hk) + centre(sc, hk) \
                    + centre(sc, Hcan) - centre(sc, htile) - Y0 * s
    return out


# --------------------------------------------------------------------------- per tile batch

class ReferencePositions:
    """A ``post_input`` patch of one tile batch: adds each model-input row's shift (module docstring)
    to the (h, w) ids of its reference tokens.  ComfyUI appends the references after the canvas
    tokens, last, so reference k's tokens end ``sum(tokens of k+1..)`` before the end (this patch
    runs first, before any patch that may append tokens of its own).  It also checks that ComfyUI
    placed each reference where :func:`placements` says (``natural``, per row, h and w), so a
    ComfyUI that places references differently fails with a clear error instead of a wrong image.
    """

    def __init__(self, grids: list, shifts: torch.Tensor, natural: torch.Tensor, tile_origin: torch.Tensor,
                 origins: torch.Tensor, step: tuple):
        self.grids = grids              # (t, h, w) tokens of each given reference
        self.counts = [t * h * w for t, h, w in grids]
        self.shifts = shifts            # [rows, n_refs, 2], for references whose ids step like the canvas's
        self.origins = origins          # [rows, n_refs, 2]: o_k, the given crop's first token in the reference
        self.step = torch.tensor(step, dtype=torch.float64)
        self.natural = natural          # [rows, n_refs, 2]: expected first-token (h, w) ids of each reference
        self.tile_origin = tile_origin  # [rows, 2]: expected first canvas token's (h, w) id, before any RoPE shift
        self.calls = 0

    def __call__(self, args, *extra, **kwargs):
        ids = args["img_ids"]
        rows, L = ids.shape[0], ids.shape[1]
        if rows != self.shifts.shape[0] or L < sum(self.counts) or ids.dim() != 3 or ids.shape[-1] < 3:
            raise RuntimeError(f"reference latents: the model's position ids {list(ids.shape)} do not hold "
                               f"{self.shifts.shape[0]} rows with {sum(self.counts)} reference tokens after the "
                               f"canvas's; this ComfyUI builds reference positions in a way Quadtree Diffusion "
                               f"does not know: please report it")
        # RoPE shifts (rope_options; LongCat's own) move the canvas, and on newer ComfyUI the references too:
        # a reference starts where expected, or where expected plus the canvas's shift
        moved = ids[:, 0, 1:3].double().cpu() - self.tile_origin
        new = ids.clone()
        end = L
        for k in range(len(self.counts) - 1, -1, -1):
            start = end - self.counts[k]
            off = ids[:, start, 1:3].double().cpu() - self.natural[:, k]
            if not (torch.allclose(off, torch.zeros_like(off), atol=1e-3) or torch.allclose(off, moved, atol=1e-3)):
                raise RuntimeError(f"reference latents: ComfyUI placed reference {k} at (h, w) ids "
                                   f"{ids[0, start, 1:3].tolist()}, where Quadtree Diffusion expected "
                                   f"{self.natural[0, k].tolist()}; this ComfyUI places references in a way the pack "
                                   f"does not know, so tiles could meet the wrong part of the reference: please "
                                   f"report it")
            # ComfyUI 0.3.x does not apply RoPE options to references: their ids step by 1, not by the
            # canvas's scale, so the o_k * s term of the shift takes the step the reference really has
            _, gh, gw = self.grids[k]
            s_ref = self.step.clone()
            if gh > 1:
                s_ref[0] = float(ids[0, start + gw, 1] - ids[0, start, 1])
            if gw > 1:
                s_ref[1] = float(ids[0, start + 1, 2] - ids[0, start, 2])
            shift = self.shifts[:, k] + self.origins[:, k] * (s_ref - self.step)
            new[:, start:end, 1:3] += shift[:, None, :].to(new.dtype).to(new.device)
            end = start
        self.calls += 1
        out = dict(args)
        out["img_ids"] = new
        return out

    def needed(self) -> bool:
        return bool((self.shifts != 0).any())

    def check(self, base_model) -> None:
        """After the model call (or before it, for a family known to have no hook): a shift that was
        needed must have been applied."""
        if self.calls == 0 and self.needed():
            name = type(getattr(base_model, "diffusion_model", None)).__name__
            raise RuntimeError(f"reference latents: {name} (this ComfyUI) has no 'post_input' patch point to move "
                               f"position ids, so Quadtree Diffusion cannot place a reference image that is smaller "
                               f"than the canvas, placed beside it, or given whole to a tile; give references at "
                               f"least the canvas's size with reference_mode '{CROP}', or use one tile (a newer "
                               f"ComfyUI may add the patch point)")


def _given(rs: RefSet, wins, Hc: int, Wc: int) -> list:
    """Per window, per reference: (crop origin (y0, x0) in latent px or None for whole, given (h, w))."""
    out = []
    for win in wins:
        whole_canvas = (win.y0, win.x0, win.y1, win.x1) == (0, 0, Hc, Wc)
        row = []
        for k, shape in enumerate(rs.shapes):
            if rs.crop[k] and not whole_canvas:
                y0, y1, x0, x1 = crop_box(rs, k, win)
                row.append(((y0, x0), (y1 - y0, x1 - x0)))
            else:
                row.append((None, shape))
        out.append(row)
    # a reference whose crops differ in size within the batch is given whole to all of it
    for k in range(len(rs.shapes)):
        if len({g[k][1] for g in out}) > 1:
            for g in out:
                g[k] = (None, rs.shapes[k])
    return out


def tile_references(ct: dict, c: dict, rs: RefSet, wins, n_chunks: int, N: int, Hc: int, Wc: int, base_model=None):
    """The tile batch's model kwargs with each reference cropped where :class:`RefSet` says, and a
    :class:`ReferencePositions` patch first in ``transformer_options['patches']['post_input']``.
    Returns (kwargs, patch)."""
    given = _given(rs, wins, Hc, Wc)
    k = len(wins)
    B = N // n_chunks
    refs = list(ct[KEY])
    for i, full in enumerate(c[KEY]):
        if given[0][i][0] is None or not torch.is_tensor(full) or full.shape[0] != N:
            continue
        v = full.reshape(n_chunks, B, *full.shape[1:])
        crops = [v[..., y0:y0 + gh, x0:x0 + gw] for (y0, x0), (gh, gw) in (g[i] for g in given)]
        refs[i] = torch.stack(crops, dim=1).reshape(-1, *full.shape[1:-2], *crops[0].shape[-2:])
    ct = dict(ct)
    ct[KEY] = type(ct[KEY])(refs) if isinstance(ct[KEY], tuple) else refs
    shifts = tile_shifts(rs, wins, given, Hc, Wc)                      # [k, n_refs, 2]
    natural = tile_natural(rs, wins, given)
    per_row = lambda v: v[None, :, None].expand(n_chunks, k, B, *v.shape[1:]).reshape(-1, *v.shape[1:])
    grids = [(int(r.shape[-3]) if r.dim() == 5 else 1, tokens(r.shape[-2], rs.p), tokens(r.shape[-1], rs.p))
             for r in refs]
    origins = torch.tensor([[[0.0, 0.0] if g[k][0] is None else [g[k][0][0] / rs.p, g[k][0][1] / rs.p]
                             for k in range(len(refs))] for g in given], dtype=torch.float64)
    origin = torch.tensor([[-centre(rs.scheme, tokens(w.y1 - w.y0, rs.p)), -centre(rs.scheme, tokens(w.x1 - w.x0, rs.p))]
                           for w in wins], dtype=torch.float64)
    patch = ReferencePositions(grids, per_row(shifts), per_row(natural), per_row(origin), per_row(origins), rs.step)
    if not rs.scheme.hook:
        patch.check(base_model)         # no patch point: refuse before the model call
        return ct, None
    to = dict(ct.get("transformer_options") or {})
    patches = dict(to.get("patches") or {})
    patches["post_input"] = [patch] + list(patches.get("post_input") or [])
    to["patches"] = patches
    ct["transformer_options"] = to
    return ct, patch


def tile_natural(rs: RefSet, wins, given) -> torch.Tensor:
    """The (h, w) id ComfyUI gives the first token of each given reference in the tile call, before
    any RoPE shift: P'_k - c(h_k) (per window, per reference: [k_tiles, n_refs, 2])."""
    p, sc = rs.p, rs.scheme
    out = torch.zeros(len(wins), len(rs.shapes), 2, dtype=torch.float64)
    for j, win in enumerate(wins):
        sizes = [g[1] for g in given[j]]
        place = placements(sc, rs.method, (win.y1 - win.y0, win.x1 - win.x0), sizes, p)
        for k, ((ph, pw), (gh, gw)) in enumerate(zip(place, sizes)):
            out[j, k, 0] = ph - centre(sc, tokens(gh, p))
            out[j, k, 1] = pw - centre(sc, tokens(gw, p))
    return out


# --------------------------------------------------------------------------- references on the canvas's grid

# Model inputs that a family reads as an image on the canvas's own token grid (ids from 0, like the
# canvas's), so each tile takes its crop: (class name, key).  A size other than the canvas's would meet
# the canvas index by index (top-left), which a crop cannot keep and no patch point can move.
GRID_INPUTS = {("WanModel", "reference_latent"): "a Wan reference image (Fun / Animate ref_conv, S2V, HuMo, SCAIL)",
               ("WanModel", "context_latents"): "a Wan Bernini context video or image"}

# Model inputs placed beside the canvas at an offset of the canvas's width: (ComfyUI model class name, i.e. the
# model_base class that builds the input, key) -> what it is.
BESIDE_CANVAS = {("HunyuanVideo", "ref_latent"): "HunyuanVideo's image-to-video reference (custom guidance)"}


def check_canvas_grid(c: dict, base_model, H: int, W: int, windows) -> None:
    """Refuse, with a clear error, reference inputs no tile can meet where the canvas does:
    :data:`GRID_INPUTS` of another size than the canvas, and :data:`BESIDE_CANVAS` inputs when a
    window is narrower than the canvas (their ids start at the canvas's width: a tile's differ)."""
    names = {cls.__name__ for cls in type(getattr(base_model, "diffusion_model", None)).__mro__}
    bases = {cls.__name__ for cls in type(base_model).__mro__}
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
    for (cls, key), what in BESIDE_CANVAS.items():
        if cls in bases and torch.is_tensor(c.get(key)) and any(w.x1 - w.x0 < W for w in windows):
            raise ValueError(f"{key}: {what} is placed beside the canvas at the canvas's width, which a narrower "
                             f"tile cannot keep; set tile_width to at least the image's width (tiles then split "
                             f"its height only), or remove Quadtree Diffusion")


def describe(base_model) -> str:
    """How this model's reference images are tiled, in a few words (the README's family table)."""
    names = {cls.__name__ for cls in type(getattr(base_model, "diffusion_model", None)).__mro__}
    bases = {cls.__name__ for cls in type(base_model).__mro__}
    found = [f"`{key}` cropped (canvas-sized; other sizes refused)" for (cls, key) in GRID_INPUTS
             if cls in names and key == "reference_latent"]
    found += [f"`{key}`: tiles of the full width only" for (cls, key) in BESIDE_CANVAS if cls in bases]
    scheme = scheme_of(base_model)
    if scheme is not None and reads_references(base_model):
        found.append("cropped to the tile, or whole with ids moved per tile" if scheme.hook else
                     "cropped to the tile (references at least the canvas's size; others refused)")
    return "; ".join(found) or "-"
