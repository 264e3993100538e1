"""Where edit models put reference tokens, and how far a tile must move them (pure maths, no ComfyUI).

Edit models (FLUX Kontext, Flux.2 / Klein, Qwen-Image-Edit, ...) put reference-image tokens into the
same sequence as the canvas's, each with a RoPE position id (index, h, w).  Untiled, the canvas token
at patch (Y, X) shares its (h, w) id with the reference token that holds the reference's patch (Y, X)
(FLUX: ids from 0; Qwen-Image: ids centred per image).  A tile evaluated alone builds its ids from its
own size.  RoPE attention depends only on id differences, so a tile keeps the relation when, for
reference k and token row r of what the tile is given (along h; the same along w):

    id_untiled = P_k + (o_k + r) * s - c(H_k)          (o_k: the given crop's first row in the reference)
    id_tile    = P'_k + r * s - c(h_k)                  (what ComfyUI builds for the tile call)
    delta      = c(H) - c(h) - Y0 * s                   (tile token 0 is canvas token Y0)
    shift_k    = id_untiled + delta - id_tile
               = (P_k - P'_k) + o_k * s - c(H_k) + c(h_k) + c(H) - c(h) - Y0 * s

P is the reference's placement by ComfyUI's loop over references (:func:`placements`, in tokens), c the
family's centring (Qwen-Image: n // 2 tokens; else 0), s the RoPE id step (``rope_options`` scale, 1 by
default), H / h the canvas's / tile's tokens and H_k / h_k the reference's / given tokens.  A crop of a
reference that covers the canvas (:func:`covers`) at the tile's partner tokens (:func:`crop_box`) has
shift 0 for every family here: the tile and its crop restart their ids together.
"""
from __future__ import annotations

from dataclasses import dataclass

ANY = None        # a family without reference methods: every reference placed on its own, at (h, w) offset 0


@dataclass(frozen=True)
class Scheme:
    """How a family places reference tokens, as its ``_forward`` does.

    ``independent``: methods that put every reference at (h, w) offset 0 (each its own index), or
    :data:`ANY` where the family has no methods and always does; ``after_canvas``: methods that put
    references after the canvas, diagonally (FLUX "uxo"); any other method places each reference
    beside the previous ones (ComfyUI's "offset" branch).  ``centred``: ids centred per image
    (id = i - n // 2).  ``rope``: the canvas ids follow ``transformer_options["rope_options"]``.
    ``needs_method``: references are ignored unless a method is set (Krea 2).  ``hook``: the model calls
    ``post_input`` patches with the ids (else only shift-free crops can be tiled)."""
    family: str
    centred: bool = False
    rope: bool = False
    independent: frozenset | None = ANY
    after_canvas: frozenset = frozenset()
    default_attr: tuple = ("",)          # where the model keeps its default method, then the fallback value
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
# No post_input hook: (h, w) ids from 0 for the canvas and every reference (Omnigen2 / Boogu also move the
# canvas's index axis by each reference's longer side: a crop moves it by the crop's, i.e. the tile is
# placed like an edit of the tile's size), so only a crop of a covering reference keeps the relation.
OMNIGEN2 = Scheme("OmniGen2 / Boogu", hook=False)
LUMINA = Scheme("Lumina 2 / Z-Image", rope=True, hook=False)
JOYIMAGE = Scheme("JoyImage", hook=False)

# Diffusion-model class name -> scheme (by class, never by ComfyUI version).
SCHEMES = {"Flux": FLUX, "QwenImageTransformer2DModel": QWEN, "SingleStreamDiT": KREA2,
           "OmniGen2Transformer2DModel": OMNIGEN2, "BooguTransformer2DModel": OMNIGEN2, "NextDiT": LUMINA,
           "JoyImageTransformer3DModel": JOYIMAGE}


def tokens(n: int, p: int) -> int:
    """Tokens of n latent px with patch p, as ComfyUI counts them (it pads): (n + p // 2) // p."""
    return (int(n) + p // 2) // p


def centre(scheme: Scheme, n_tokens: int) -> int:
    """c(n): n // 2 for families that centre ids per image, else 0."""
    return n_tokens // 2 if scheme.centred else 0


def placements(scheme: Scheme, method, canvas_hw, refs_hw, p: int) -> list[tuple[int, int]]:
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


def partner_offset(scheme: Scheme, canvas_tok: int, ref_tok: int, placement: int) -> int:
    """o: canvas token Y shares its id with reference token Y + o, untiled: o = c(H_k) - c(H) - P_k."""
    return centre(scheme, ref_tok) - centre(scheme, canvas_tok) - placement


def covers(o: int, canvas_tok: int, ref_tok: int) -> bool:
    """Every canvas token has a partner in the reference along this axis: 0 <= o and o + H <= H_k."""
    return 0 <= o and o + canvas_tok <= ref_tok


def crop_box(win, offset, shape, p: int) -> tuple[int, int, int, int]:
    """A reference's latent rows/cols for tile window ``win``: its partner tokens (o + Y0 ...), as many
    tokens as the tile has (a window of odd size flush with the canvas edge takes the reference's next px
    too where there is one, so each token holds what the untiled one holds)."""
    (oy, ox), (rh, rw) = offset, shape
    y0, x0 = win.y0 + oy * p, win.x0 + ox * p
    return (y0, min(rh, y0 + tokens(win.y1 - win.y0, p) * p),
            x0, min(rw, x0 + tokens(win.x1 - win.x0, p) * p))


def shifts(scheme: Scheme, method, p: int, canvas_hw, full, given, win, step) -> list[tuple[float, float]]:
    """shift_k (module docstring) of each reference for tile window ``win``: ``full`` the references'
    (h, w), ``given`` per reference (crop origin (y0, x0) in latent px or None for whole, given (h, w)),
    ``step`` the RoPE id step (s_y, s_x)."""
    size = (win.y1 - win.y0, win.x1 - win.x0)
    place_c = placements(scheme, method, canvas_hw, full, p)
    place_t = placements(scheme, method, size, [g[1] for g in given], p)
    origin = (win.y0, win.x0)
    out = []
    for k, (origin_k, given_k) in enumerate(given):
        row = []
        for a in (0, 1):
            o = origin_k[a] / p if origin_k is not None else 0.0
            row.append((place_c[k][a] - place_t[k][a]) + o * step[a]
                       - centre(scheme, tokens(full[k][a], p)) + centre(scheme, tokens(given_k[a], p))
                       + centre(scheme, tokens(canvas_hw[a], p)) - centre(scheme, tokens(size[a], p))
                       - origin[a] / p * step[a])
        out.append(tuple(row))
    return out


def natural_origins(scheme: Scheme, method, p: int, win, given) -> list[tuple[float, float]]:
    """The (h, w) id ComfyUI gives the first token of each given reference in the tile call, before any
    RoPE shift: P'_k - c(h_k)."""
    size = (win.y1 - win.y0, win.x1 - win.x0)
    sizes = [g[1] for g in given]
    return [(ph - centre(scheme, tokens(gh, p)), pw - centre(scheme, tokens(gw, p)))
            for (ph, pw), (gh, gw) in zip(placements(scheme, method, size, sizes, p), sizes)]


def tile_origin(scheme: Scheme, p: int, win) -> tuple[float, float]:
    """The (h, w) id of the tile's first token in its own call, before any RoPE shift: -c(h)."""
    return (-centre(scheme, tokens(win.y1 - win.y0, p)), -centre(scheme, tokens(win.x1 - win.x0, p)))
