"""Model inputs that relate to the canvas by position and need more than a crop per tile (issue 20).

tile_inputs.py crops every canvas-sized model input to each tile window (model_families.py first resamples
the inputs that come at another scale).  A crop is the canvas call restricted to the tile for inputs that
are pictures of the canvas.  These are the inputs it gets wrong, by the model class that reads them:

* **per-frame timesteps from a denoise mask** (:data:`FRAME_MEAN`: Wan 2.2 5B, Cosmos Predict2 I2V).  ComfyUI
  gives frame f the timestep ``t_f = t * mean_{C,H,W} mask[:, :, f]`` (``process_timestep``), a mean over the
  whole frame; a crop would give each tile its crop's mean.  Each tile gets the canvas's per-frame means
  broadcast to its size, so the model computes the canvas's timesteps (:class:`FrameMean`).
* **token masks** (:data:`TOKEN_MASKS`: FLUX's ``attention_mask``, from StyleModelApply's ``attn_bias``
  strength).  A ``[B, L, L]`` attention bias over the text tokens, then the canvas's ``Hc x Wc`` image tokens
  row-major (``Hc = ceil(H / p)``).  Each tile gets the rows and columns of the text and of its own canvas
  tokens, in the tile's token order: the canvas's mask restricted to the tile (:class:`TokenMask`).
* **refused** (:data:`CANVAS_ONLY`: LTXV guide frames).  ``keyframe_idxs`` lists the position of every guide
  token of the canvas, and ``guide_attention_entries`` counts them per guide; a tile holds other tokens, and
  the model would fail deep inside (or mix the guides up).  A tiled run stops with a clear error before the
  model is called.

Every wrapped value has ``for_windows(wins, n_chunks, N, H, W)``, which :func:`tile_inputs.tile_cond` calls
for each batch of tile windows (chunk-major rows).  A window that is the whole canvas gets the value as it
is, so one tile == untiled, bit for bit.
"""
from __future__ import annotations

import torch

# Model-base classes whose timestep is per frame, the mean of a denoise mask over the frame: class -> input.
FRAME_MEAN = {"WAN22": "denoise_mask", "CosmosPredict2": "denoise_mask"}

# Model-base classes with an attention mask over [text tokens, canvas tokens row-major]: class -> input.
TOKEN_MASKS = {"Flux": "attention_mask"}

# Inputs that list the canvas's tokens in a way no tile can be given: input -> why, and what to change.
CANVAS_ONLY = {
    "keyframe_idxs": "LTXV guide frames (LTXVAddGuide and the nodes built on it) list the position of every guide "
                     "token of the whole canvas (keyframe_idxs, with per-guide token counts in "
                     "guide_attention_entries), and a tile holds other tokens; for a first-frame image use "
                     "LTXVImgToVideo (its noise mask tiles exactly), or remove Quadtree Diffusion for runs with "
                     "guides",
}


def _whole(wins, H: int, W: int) -> bool:
    return len(wins) == 1 and (wins[0].y0, wins[0].y1, wins[0].x0, wins[0].x1) == (0, H, 0, W)


def _rows(v: torch.Tensor, N: int) -> torch.Tensor:
    return v.expand(N, *v.shape[1:]) if v.shape[0] == 1 and N > 1 else v


class FrameMean:
    """A ``[N, C, T, H, W]`` denoise mask the model reduces to one mean per frame: every tile gets the
    canvas's means, ``m_f = mean_{C,H,W} mask[:, :, f]``, broadcast to its size."""

    def __init__(self, mask: torch.Tensor):
        self.value = mask
        self.means = mask.mean(dim=(1, 3, 4), keepdim=True)

    def for_windows(self, wins, n_chunks: int, N: int, H: int, W: int):
        if _whole(wins, H, W):
            return self.value
        m = _rows(self.means, N)
        mv = m.reshape(n_chunks, 1, N // n_chunks, 1, m.shape[2], 1, 1)
        h, w = wins[0].size         # at the mask's scale (Cosmos: pixels), the size a crop would have
        h, w = round(h * self.value.shape[-2] / H), round(w * self.value.shape[-1] / W)
        out = mv.expand(n_chunks, len(wins), N // n_chunks, self.value.shape[1], m.shape[2], h, w)
        return out.reshape(-1, *out.shape[3:])


class TokenMask:
    """A ``[N, L, L]`` attention bias over ``text`` tokens then the canvas's ``grid`` of image tokens
    (row-major, ``patch`` latent px per token side): each tile gets the rows and columns of the text tokens and
    of its own canvas tokens, ``mask[idx][:, idx]`` with ``idx = [0..text) + text + (Y * Wc + X)`` over the
    tile's tokens (Y, X)."""

    def __init__(self, mask: torch.Tensor, text: int, grid: tuple, patch: int):
        self.value, self.text, self.grid, self.patch = mask, text, grid, patch

    @classmethod
    def of(cls, mask, H: int, W: int, patch: int):
        """The wrapped mask, or None when it is not over [text, the canvas's tokens]."""
        hc, wc = -(-H // patch), -(-W // patch)
        text = mask.shape[-1] - hc * wc
        if mask.ndim != 3 or mask.shape[-2] != mask.shape[-1] or text < 0:
            return None
        return cls(mask, text, (hc, wc), patch)

    def index(self, win) -> torch.Tensor:
        p, (hc, wc) = self.patch, self.grid
        h, w = win.size
        ys = (win.y0 // p + torch.arange(-(-h // p))).clamp(max=hc - 1)
        xs = (win.x0 // p + torch.arange(-(-w // p))).clamp(max=wc - 1)
        img = self.text + (ys[:, None] * wc + xs[None, :]).reshape(-1)
        return torch.cat([torch.arange(self.text), img]).to(self.value.device)

    def for_windows(self, wins, n_chunks: int, N: int, H: int, W: int):
        if _whole(wins, H, W):
            return self.value
        m = _rows(self.value, N)
        mv = m.reshape(n_chunks, N // n_chunks, *m.shape[1:])
        tiles = []
        for win in wins:
            i = self.index(win)
            tiles.append(mv.index_select(2, i).index_select(3, i))
        out = torch.stack(tiles, dim=1)
        return out.reshape(-1, *out.shape[3:])


class CanvasOnly:
    """An input no tile can be given: refused (``ValueError`` naming it) unless the window is the canvas."""

    def __init__(self, key: str, value, why: str):
        self.key, self.value, self.why = key, value, why

    def for_windows(self, wins, n_chunks: int, N: int, H: int, W: int):
        if _whole(wins, H, W):
            return self.value
        raise ValueError(f"{self.key}: Quadtree Diffusion cannot tile this run: {self.why}")


def canvas_inputs(c: dict, classes, H: int, W: int, patch: int) -> dict:
    """The model kwargs with every input of this module's tables wrapped for :func:`tile_inputs.tile_cond`;
    ``classes``: the class names of the model (model base and diffusion model, with their bases)."""
    out = None

    def put(key, value):
        nonlocal out
        if out is None:
            out = dict(c)
        out[key] = value

    for key, why in CANVAS_ONLY.items():
        v = c.get(key)
        if torch.is_tensor(v) and v.numel():
            put(key, CanvasOnly(key, v, why))
    for cls, key in FRAME_MEAN.items():
        v = c.get(key)
        if cls in classes and torch.is_tensor(v) and v.ndim == 5:
            put(key, FrameMean(v))
    for cls, key in TOKEN_MASKS.items():
        v = c.get(key)
        if cls in classes and torch.is_tensor(v):
            wrapped = TokenMask.of(v, H, W, patch)
            if wrapped is not None:
                put(key, wrapped)
    return c if out is None else out
