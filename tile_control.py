"""Per-tile ControlNet / T2I-Adapter control for the tile engine.

ComfyUI's ``comfy.samplers._calc_cond_batch`` computes ``c['control'] = control.get_control(
input_x, ...)`` on the whole latent before it calls the unet function wrapper (our engine).
That canvas-sized control pass would cost time and memory for nothing and could only be
cropped afterwards (wrong at tile borders).  Instead, without replacing any ComfyUI function:

1. a keyed ``CALC_COND_BATCH`` wrapper (:meth:`TileControl.calc_cond_batch`) copies the conds
   and replaces each cond's ``'control'`` by a :class:`ControlProxy`.  One proxy per distinct
   control object, so ``can_concat_cond`` (which compares controls with ``is``) batches
   exactly the conds it would have batched without tiling;
2. ``_calc_cond_batch`` then calls ``proxy.get_control(...)``, which runs nothing and returns
   a :class:`DeferredControl` marker; the marker reaches the engine as ``c['control']``;
3. the engine (``TiledDiffusion._evaluate``) calls ``marker.tile_control(xt, tt, ct, tile_batch)``
   once per tile batch.  That builds, for the control and every ``previous_controlnet`` in its
   chain, a shallow copy whose hint is the batch of the tiles' own crops of the hint, and calls
   the copy's own ``get_control`` on the tile batch.  The result is what ComfyUI would compute
   for one call on each tile if the hint were that tile's crop: strength, strength type,
   ``timestep_range`` (start/end percent), chains, extra conds (``y``), T2I-Adapters all run
   through ComfyUI's own code.  The copies are dropped after the call, so nothing computed for
   one tile is reused for another.

The hint is cropped in its own resolution and never resized per tile: it is first prepared
once per run for the canvas exactly as ComfyUI prepares it for a canvas-sized call
(``common_upscale`` to canvas x ``compression_ratio`` with the control's upscale method and
``"center"`` crop, ``preprocess_image``, then for latent-input ControlNets (SD3/FLUX
union/InstantX: ``vae``/``latent_format`` set) VAE-encoded at the canvas size and
``latent_format.process_in``, ``extra_concat`` appended).  That prepared hint is stored where
ComfyUI itself caches it, ``control.cond_hint`` of the original control (cleared by ComfyUI's
``cleanup()`` at the end of sampling, recomputed when the canvas size changes), and each tile
takes its window of it: pixel units for classic ControlNets (``compression_ratio`` 8), latent
units for latent-input ones.  For SpotDiffusion the windows lie on the rolled canvas, so the
crop wraps around the hint by the same shift.

Controls that are not ``comfy.controlnet.ControlNet``/``T2IAdapter`` (other ``ControlBase``
subclasses from custom packs) get the crop as ``cond_hint_original`` at canvas x
``compression_ratio`` resolution and prepare it themselves (a resize to the same size).

If the model's unet function wrapper is not our engine (another node replaced it after
Quadtree Diffusion), the wrapper steps aside and ComfyUI computes control as usual.
"""
from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)

P = "[Quadtree Diffusion]"


# --------------------------------------------------------------------------- geometry

def _span(a0: int, a1: int, shift: int, length: int):
    """Indices (a0 - shift) mod length ... for a1 - a0 consecutive positions: a slice or an index."""
    n = a1 - a0
    start = (a0 - shift) % length
    if start + n <= length:
        return slice(start, start + n)
    return torch.cat([torch.arange(start, length), torch.arange(0, start + n - length)])


def crop_window(hint: torch.Tensor, win, H: int, W: int, shift=(0, 0)) -> torch.Tensor:
    """The part of ``hint`` (canvas-sized at some scale in its last two dims) under ``win``.

    ``win`` has ``y0, y1, x0, x1`` in latent units on the canvas ``H`` x ``W`` rolled by
    ``shift`` = (dy, dx) (SpotDiffusion): position p of the rolled canvas is position p - shift
    of the hint.  Edges are scaled by the hint's own ratio (8 for pixel hints, 1 for latent ones).
    """
    hh, hw = hint.shape[-2], hint.shape[-1]
    rh, rw = hh / H, hw / W
    y0, y1 = int(round(win.y0 * rh)), int(round(win.y1 * rh))
    x0, x1 = int(round(win.x0 * rw)), int(round(win.x1 * rw))
    dy, dx = int(round(shift[0] * rh)), int(round(shift[1] * rw))
    ys, xs = _span(y0, y1, dy, hh), _span(x0, x1, dx, hw)
    out = hint[..., ys, :] if isinstance(ys, slice) else hint.index_select(-2, ys.to(hint.device))
    out = out[..., xs] if isinstance(xs, slice) else out.index_select(-1, xs.to(hint.device))
    return out


def tile_hint_batch(hint: torch.Tensor, windows, H: int, W: int, per_tile: int, shift=(0, 0)) -> torch.Tensor:
    """The hint for one tile batch, rows ``[tile][batch item]`` (one chunk of ``xt``).

    Each tile's crop is broadcast to the ``per_tile`` batch items the way ComfyUI's
    ``broadcast_image_to`` broadcasts a hint over one cond chunk; ``get_control`` repeats the
    result over the cond chunks itself.  A single tile with a single-image hint keeps batch 1
    (ComfyUI passes such a hint unbroadcast too).
    """
    from comfy.controlnet import broadcast_image_to
    crops = [crop_window(hint, w, H, W, shift) for w in windows]
    if len(crops) == 1 and hint.shape[0] == 1:
        return crops[0]
    rows = []
    for c in crops:
        if c.shape[0] == 1:
            c = c.expand(per_tile, *c.shape[1:])
        elif c.shape[0] != per_tile:
            c = broadcast_image_to(c, per_tile, 1)
        rows.append(c)
    return torch.cat(rows, dim=0)


# --------------------------------------------------------------------------- hint preparation

def _kind(control) -> str:
    import comfy.controlnet as cn
    if isinstance(control, cn.ControlNet):
        return "controlnet"
    if isinstance(control, cn.T2IAdapter):
        return "t2i"
    return "other"


def _active(control, t: torch.Tensor) -> bool:
    """ComfyUI's own test in get_control: outside ``timestep_range`` the control is skipped."""
    tr = getattr(control, "timestep_range", None)
    if tr is None:
        return True
    t0 = t.reshape(-1)[0] if torch.is_tensor(t) else t
    return not (t0 > tr[0] or t0 < tr[1])


def _controlnet_dtype(control):
    if getattr(control, "manual_cast_dtype", None) is not None:
        return control.manual_cast_dtype
    return getattr(control.control_model, "dtype", None)


def _prepare_controlnet_hint(control, H: int, W: int, device) -> torch.Tensor:
    """``ControlNet.get_control``'s hint for a canvas-sized call (before batch broadcast)."""
    import comfy.model_management as mm
    import comfy.utils
    ratio = control.compression_ratio
    if control.vae is not None:
        ratio *= control.vae.spacial_compression_encode()
    elif control.latent_format is not None:
        raise ValueError("This Controlnet needs a VAE but none was provided, please use a ControlNetApply node "
                         "with a VAE input and connect it.")
    hint = comfy.utils.common_upscale(control.cond_hint_original, W * ratio, H * ratio,
                                      control.upscale_algorithm, "center")
    hint = control.preprocess_image(hint)
    if control.vae is not None:
        loaded_models = mm.loaded_models(only_currently_used=True)
        hint = control.vae.encode(hint.movedim(1, -1))
        mm.load_models_gpu(loaded_models)
    if control.latent_format is not None:
        hint = control.latent_format.process_in(hint)
    if len(control.extra_concat_orig) > 0:
        to_concat = []
        for c in control.extra_concat_orig:
            c = c.to(hint.device)
            c = comfy.utils.common_upscale(c, hint.shape[-1], hint.shape[-2], control.upscale_algorithm, "center")
            if c.ndim < hint.ndim:
                c = c.unsqueeze(2)
                c = comfy.utils.repeat_to_batch_size(c, hint.shape[2], dim=2)
            to_concat.append(comfy.utils.repeat_to_batch_size(c, hint.shape[0]))
        hint = torch.cat([hint] + to_concat, dim=1)
    return hint.to(device=device, dtype=_controlnet_dtype(control))


def _prepare_t2i_hint(control, H: int, W: int) -> torch.Tensor:
    """``T2IAdapter.get_control``'s hint for a canvas-sized call (before batch broadcast)."""
    import comfy.utils
    width, height = control.scale_image_to(W * control.compression_ratio, H * control.compression_ratio)
    hint = comfy.utils.common_upscale(control.cond_hint_original, width, height, control.upscale_algorithm,
                                      "center").float().to(control.device)
    if control.channels_in == 1 and hint.shape[1] > 1:
        hint = torch.mean(hint, 1, keepdim=True)
    return hint


def _prepare_other_hint(control, H: int, W: int) -> torch.Tensor:
    import comfy.utils
    r = control.compression_ratio
    return comfy.utils.common_upscale(control.cond_hint_original, W * r, H * r, control.upscale_algorithm, "center")


def canvas_hint(control, H: int, W: int, device) -> torch.Tensor:
    """The control's hint prepared once for the H x W canvas, cached where ComfyUI caches it.

    ComfyUI keeps the prepared hint in ``control.cond_hint`` while its spatial size matches
    ``canvas * compression_ratio`` and clears it in ``cleanup()`` at the end of sampling; we use
    the same slot and the same validity test on the original control, whose own
    ``get_control`` never runs while tiling.  Other control types (whose use of ``cond_hint``
    is unknown) get the resized hint recomputed per tile batch, never cached.
    """
    kind = _kind(control)
    if kind == "other":
        return _prepare_other_hint(control, H, W)
    hint = control.cond_hint
    r = control.compression_ratio
    if kind == "t2i":       # T2I rounds its hint up to the adapter's unshuffle size; lives on its device
        width, height = control.scale_image_to(W * r, H * r)
        if hint is not None and hint.shape[-2] == height and hint.shape[-1] == width:
            return hint
        hint = _prepare_t2i_hint(control, H, W)
    else:
        if hint is not None and hint.shape[-2] == H * r and hint.shape[-1] == W * r and hint.device == device:
            return hint
        hint = _prepare_controlnet_hint(control, H, W, device)
    control.cond_hint = hint
    return hint


# --------------------------------------------------------------------------- per-tile copies

def tiled_copy(control, t, tb, per_tile: int, device, items=None):
    """A shallow copy of ``control`` (and of its chain) whose hint is the tile batch's crops.

    A shallow ``copy.copy`` keeps everything ``pre_run`` set on the original (the control model,
    ``timestep_range``, ``model_sampling_current``, dtype) which ``control.copy()`` would drop.
    ``items``: the canvas batch items the tile rows belong to (None: all, in order).
    Inactive controls (outside their timestep range) get no hint: get_control skips them first.
    """
    c = copy.copy(control)
    prev = getattr(control, "previous_controlnet", None)
    c.previous_controlnet = tiled_copy(prev, t, tb, per_tile, device, items) if prev is not None else None
    kind = _kind(control)
    if kind == "t2i":
        c.control_input = None
    if not _active(control, t) or getattr(control, "cond_hint_original", None) is None:
        return c
    full = canvas_hint(control, tb.H, tb.W, device)
    if items is not None and full.shape[0] > 1:
        # the hint images these batch items get in a full-batch call (broadcast_image_to cycles them)
        full = full[[b % full.shape[0] for b in items]]
    crops = tile_hint_batch(full, tb.windows, tb.H, tb.W, per_tile, tb.shift)
    if kind == "other":
        c.cond_hint_original = crops
        c.cond_hint = None
    else:
        # the crop is already what get_control would prepare for the tile: its size check passes
        # and it is used as is; cond_hint_original is the crop too, so that any re-preparation
        # (e.g. T2I rounding to its unshuffle size) starts from the tile's own crop.
        c.cond_hint = crops
        c.cond_hint_original = crops
    return c


class DeferredControl:
    """What ``get_control`` returns while tiling: control is computed per tile batch by the engine."""

    __slots__ = ("control", "batched_number", "transformer_options", "items")

    def __init__(self, control, batched_number, transformer_options, items=None):
        self.control = control
        self.batched_number = batched_number
        self.transformer_options = transformer_options
        self.items = items          # batch items of the canvas call these rows are (None: all)

    def select_rows(self, rows, N: int):
        """The marker for a subset of the call's rows (the engine runs batch items one by one when
        each has its own layout): remembers which batch items, so each keeps its own hint image."""
        n = max(1, self.batched_number)
        B = max(1, N // n)
        r = list(range(N))[rows] if isinstance(rows, slice) else [int(i) for i in rows]
        items = [i % B for i in r[:max(1, len(r) // n)]]
        if self.items is not None:
            items = [self.items[i] for i in items]
        return DeferredControl(self.control, self.batched_number, self.transformer_options, tuple(items))

    def tile_control(self, xt, tt, ct, tb):
        """Control for the tile batch ``xt`` (rows ``[chunk][tile][batch item]``).

        Equals ``control.get_control(xt, tt, ct, n_chunks, transformer_options)`` with each
        control of the chain holding, as its hint, each tile's own crop of the hint.
        """
        n_chunks = tb.n_chunks
        k = len(tb.windows)
        per_tile = max(1, xt.shape[0] // (n_chunks * k))
        c = tiled_copy(self.control, tt, tb, per_tile, xt.device, self.items)
        to = ct.get("transformer_options", self.transformer_options) if isinstance(ct, dict) else self.transformer_options
        return c.get_control(xt, tt, ct, n_chunks, to)

    def __repr__(self):
        return f"DeferredControl({type(self.control).__name__})"


class ControlProxy:
    """Stands for a control inside ``_calc_cond_batch``: ``get_control`` defers, all else delegates."""

    def __init__(self, control):
        self._control = control

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        return DeferredControl(self._control, batched_number, transformer_options)

    def __getattr__(self, name):
        if name == "_control":
            raise AttributeError(name)
        return getattr(self._control, name)

    def __repr__(self):
        return f"ControlProxy({type(self._control).__name__})"


class TileControl:
    """The keyed ``CALC_COND_BATCH`` wrapper of one QuadtreeDiffusion node output."""

    def __init__(self, engine):
        self.engine = engine

    def __deepcopy__(self, memo):
        return self      # like the engine: configuration only, shared by model clones

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        if model_options.get("model_function_wrapper") is not self.engine:
            return executor(model, conds, x_in, timestep, model_options)
        proxies: dict = {}
        out = []
        changed = False
        for cond in conds:
            if cond is None:
                out.append(None)
                continue
            lst = []
            for c in cond:
                ctl = c.get("control") if isinstance(c, dict) else None
                if ctl is not None and not isinstance(ctl, ControlProxy):
                    p = proxies.get(id(ctl))
                    if p is None:
                        p = proxies[id(ctl)] = ControlProxy(ctl)
                    c = dict(c)
                    c["control"] = p
                    changed = True
                lst.append(c)
            out.append(lst)
        return executor(model, out if changed else conds, x_in, timestep, model_options)
