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
``latent_format.process_in``, ``extra_concat`` appended).  That prepared hint is kept in the
run's own state (``RunState.hints``, gone when the run ends; per model call when the model is
called outside a sampler run), never in the control, and each tile takes its window of it:
pixel units for classic ControlNets (``compression_ratio`` 8), latent units for latent-input
ones.  SpotDiffusion shifts its tiles, never the latent, so its windows are cropped alike.

The tile copy does not rely on where a ComfyUI version caches prepared hints (``cond_hint``
in 0.3.x, size-keyed ``cond_hints`` / ``control_inputs`` dicts in later ones): it gets private
containers (a cache of the original is never shared, and starts empty: the containers
``ControlBase.cleanup()`` empties, found at load by self_check.py, and any tuple-keyed dict), no
prepared hint, and as ``cond_hint_original`` the crop with a preparation that is the identity (no VAE,
no latent format, no preprocessing, no extra concat, nearest resize to its own size, the
crop's own ratio to the latent).  Whatever cache the control uses, its own preparation then
produces exactly the crop for that tile batch.

Controls that are not ``comfy.controlnet.ControlNet``/``T2IAdapter`` (other ``ControlBase``
subclasses from custom packs) get the crop as ``cond_hint_original`` at canvas x
``compression_ratio`` resolution and prepare it themselves (a resize to the same size).

ComfyUI's multi-GPU path (``MultiGPU CFG Split``) asks each control for
``get_instance_for_device(device)``: the proxy answers with a proxy of that device's instance,
so control stays deferred, per tile, on the device that samples the tiles.  Where the pack spreads
a call's tiles over the devices itself (tile_devices.py), each device's tile batches get the marker
for its instance (:meth:`DeferredControl.for_device`), whose canvas hint is prepared beforehand on
the sampler's thread (:meth:`DeferredControl.prepare_hints`).

If the model's unet function wrapper is not our engine (another node replaced it after
Quadtree Diffusion), or this ComfyUI's control classes are not what this module knows (the
startup self-check logged it), the wrapper steps aside and ComfyUI computes control as usual, on
the canvas (in the second case the engine then gives each tile its crop of that control).
"""
from __future__ import annotations

import copy
import logging

import torch

from . import self_check
from .utils import RUN_KEY

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- geometry

def crop_window(hint: torch.Tensor, win, H: int, W: int) -> torch.Tensor:
    """The part of ``hint`` (canvas-sized at some scale in its last two dims) under ``win``.

    ``win`` has ``y0, y1, x0, x1`` in latent units on the canvas ``H`` x ``W``; edges are scaled
    by the hint's own ratio r (8 for pixel hints, 1 for latent ones): rows round(r y0)..round(r y1).
    """
    rh, rw = hint.shape[-2] / H, hint.shape[-1] / W
    y0, y1 = int(round(win.y0 * rh)), int(round(win.y1 * rh))
    x0, x1 = int(round(win.x0 * rw)), int(round(win.x1 * rw))
    return hint[..., y0:y1, x0:x1]


def tile_hint_batch(hint: torch.Tensor, windows, H: int, W: int, per_tile: int) -> torch.Tensor:
    """The hint for one tile batch, rows ``[tile][batch item]`` (one chunk of ``xt``).

    Each tile's crop is broadcast to the ``per_tile`` batch items the way ComfyUI's
    ``broadcast_image_to`` broadcasts a hint over one cond chunk; ``get_control`` repeats the
    result over the cond chunks itself.  A single tile with a single-image hint keeps batch 1
    (ComfyUI passes such a hint unbroadcast too).
    """
    from comfy.controlnet import broadcast_image_to
    crops = [crop_window(hint, w, H, W) for w in windows]
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


def canvas_hint(control, H: int, W: int, device, cache: dict) -> torch.Tensor:
    """The control's hint prepared once for the H x W canvas on ``device``, kept in ``cache``.

    ``cache`` is the run's (``RunState.hints``): it lives as long as the sampling run, so a
    changed hint image or canvas is prepared anew in the next run, whatever the control's own
    caching does.  The control is kept in the entry so its id cannot be reused meanwhile.
    Other control types (whose preparation is unknown) get the resized hint recomputed per tile
    batch, never cached.
    """
    kind = _kind(control)
    if kind == "other":
        return _prepare_other_hint(control, H, W)
    key = (id(control), H, W, str(device))
    hit = cache.get(key)
    if hit is not None and hit[0] is control:
        return hit[1]
    # T2I rounds its hint up to the adapter's unshuffle size and keeps it on its own device
    hint = _prepare_t2i_hint(control, H, W) if kind == "t2i" else _prepare_controlnet_hint(control, H, W, device)
    cache[key] = (control, hint)
    return hint


# --------------------------------------------------------------------------- per-tile copies

def _is_size_keyed_cache(v) -> bool:
    """A dict keyed by tuples (sizes, shapes): how ComfyUI versions cache prepared hints/inputs."""
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(k, tuple) for k in v)


def private_copy(control):
    """A shallow copy of ``control`` that shares no mutable container and holds no prepared hint.

    ``copy.copy`` keeps everything ``pre_run`` set on the original (the control model,
    ``timestep_range``, ``model_sampling_current``, dtype), which ``control.copy()`` would drop;
    its dicts, lists and sets are copied so that nothing the copy caches reaches the original or
    another tile, and caches start empty: the containers ComfyUI's ``ControlBase.cleanup()`` empties
    (found at load by ``self_check.control_caches``, whatever their keys) and any other dict keyed by
    tuples (a control class's own size-keyed cache).
    """
    caches = self_check.hint_caches()
    c = copy.copy(control)
    for name, v in list(vars(c).items()):
        if isinstance(v, (dict, list, set)):
            v = copy.copy(v)
            if name in caches or _is_size_keyed_cache(v):
                v.clear()
            setattr(c, name, v)
    c.cond_hint = None
    if hasattr(c, "control_input"):
        c.control_input = None
    return c


def _identity(image):
    return image


def give_prepared_hint(c, crops: torch.Tensor, H_tile: int, W_tile: int) -> None:
    """Make ``crops`` (already prepared for a ``H_tile`` x ``W_tile`` latent) the hint that
    ``ControlNet.get_control``'s own preparation produces: resize to its own size with nearest
    (the identity), no preprocessing, no VAE, no latent format, no extra concat."""
    ratio = crops.shape[-2] // H_tile
    if ratio < 1 or crops.shape[-2] != H_tile * ratio or crops.shape[-1] != W_tile * ratio:
        raise ValueError(f"ControlNet hint crop {list(crops.shape[-2:])} is not a whole multiple of the tile "
                         f"{H_tile}x{W_tile} latent px; please report this with the ControlNet you use")
    c.cond_hint_original = crops
    c.compression_ratio = ratio
    c.upscale_algorithm = "nearest-exact"
    c.preprocess_image = _identity
    c.vae = None
    c.latent_format = None
    c.extra_concat_orig = []


def tiled_copy(control, t, tb, per_tile: int, device, hints: dict, items=None):
    """A private copy of ``control`` (and of its chain) whose hint is the tile batch's crops.

    ``items``: the canvas batch items the tile rows belong to (None: all, in order).
    Inactive controls (outside their timestep range) get no hint: get_control skips them first.
    """
    c = private_copy(control)
    prev = getattr(control, "previous_controlnet", None)
    c.previous_controlnet = tiled_copy(prev, t, tb, per_tile, device, hints, items) if prev is not None else None
    if not _active(control, t) or getattr(control, "cond_hint_original", None) is None:
        return c
    full = canvas_hint(control, tb.H, tb.W, device, hints)
    if items is not None and full.shape[0] > 1:
        # the hint images these batch items get in a full-batch call (broadcast_image_to cycles them)
        full = full[[b % full.shape[0] for b in items]]
    crops = tile_hint_batch(full, tb.windows, tb.H, tb.W, per_tile)
    if _kind(control) == "controlnet":
        h, w = tb.windows[0].size
        give_prepared_hint(c, crops, h, w)
    else:
        # T2I-Adapters (and other controls) prepare the crop themselves: a resize to the tile's
        # own size (T2I: rounded up to its unshuffle size), as for a tile-sized call
        c.cond_hint_original = crops
    return c


class DeferredControl:
    """What ``get_control`` returns while tiling: control is computed per tile batch by the engine."""

    __slots__ = ("control", "batched_number", "transformer_options", "items", "hints", "extra")

    def __init__(self, control, batched_number, transformer_options, items=None, hints=None, extra=((), {})):
        self.control = control
        self.batched_number = batched_number
        self.transformer_options = transformer_options
        self.items = items          # batch items of the canvas call these rows are (None: all)
        if hints is None:           # the run's prepared hints; per call outside a sampler run
            run = (transformer_options or {}).get(RUN_KEY)
            hints = run.hints if run is not None else {}
        self.hints = hints
        self.extra = extra          # (args, kwargs) ComfyUI passed get_control beyond those we know: passed on

    def select_rows(self, rows, N: int):
        """The marker for a subset of the call's rows (the engine runs batch items one by one when
        each has its own layout): remembers which batch items, so each keeps its own hint image."""
        n = max(1, self.batched_number)
        B = max(1, N // n)
        r = list(range(N))[rows] if isinstance(rows, slice) else [int(i) for i in rows]
        items = [i % B for i in r[:max(1, len(r) // n)]]
        if self.items is not None:
            items = [self.items[i] for i in items]
        return DeferredControl(self.control, self.batched_number, self.transformer_options, tuple(items),
                               self.hints, self.extra)

    def for_device(self, device):
        """The marker for ``device`` (ComfyUI's multi-GPU per-device control, ``get_instance_for_device``):
        the same rows, hints and arguments with that device's control instance (itself where none)."""
        per_device = getattr(self.control, "get_instance_for_device", None)
        control = self.control if per_device is None else per_device(device)
        if control is self.control:
            return self
        return DeferredControl(control, self.batched_number, self.transformer_options, self.items, self.hints,
                               self.extra)

    def prepare_hints(self, t, H: int, W: int, device) -> None:
        """Prepare now, on the calling thread, the canvas hint of every active control of the chain for
        ``device`` (kept in the run's hints, as the tile batches would prepare it): several devices'
        workers then only crop, and a latent-input ControlNet's VAE encode (ComfyUI's model loading)
        never runs on two threads at once."""
        control = self.control
        while control is not None:
            if (_kind(control) != "other" and _active(control, t)
                    and getattr(control, "cond_hint_original", None) is not None):
                canvas_hint(control, H, W, device, self.hints)
            control = getattr(control, "previous_controlnet", None)

    def tile_control(self, xt, tt, ct, tb):
        """Control for the tile batch ``xt`` (rows ``[chunk][tile][batch item]``).

        Equals ``control.get_control(xt, tt, ct, n_chunks, transformer_options)`` with each
        control of the chain holding, as its hint, each tile's own crop of the hint.
        """
        n_chunks = tb.n_chunks
        k = len(tb.windows)
        per_tile = max(1, xt.shape[0] // (n_chunks * k))
        c = tiled_copy(self.control, tt, tb, per_tile, xt.device, self.hints, self.items)
        to = ct.get("transformer_options", self.transformer_options) if isinstance(ct, dict) else self.transformer_options
        args, kwargs = self.extra
        return c.get_control(xt, tt, ct, n_chunks, to, *args, **kwargs)

    def __repr__(self):
        return f"DeferredControl({type(self.control).__name__})"


class ControlProxy:
    """Stands for a control inside ``_calc_cond_batch``: ``get_control`` defers, all else delegates."""

    def __init__(self, control):
        self._control = control
        self._per_device: dict = {}

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options, *args, **kwargs):
        return DeferredControl(self._control, batched_number, transformer_options, extra=(args, kwargs))

    def get_instance_for_device(self, device, *args, **kwargs):
        """The multi-GPU path's per-device control, still deferred (one proxy per device)."""
        proxy = self._per_device.get(device)
        if proxy is None:
            per_device = getattr(self._control, "get_instance_for_device", None)
            instance = self._control if per_device is None else per_device(device, *args, **kwargs)
            proxy = self if instance is self._control else ControlProxy(instance)
            self._per_device[device] = proxy
        return proxy

    def __getattr__(self, name):
        if name in ("_control", "_per_device"):
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

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        """CALC_COND_BATCH: hand ComfyUI proxies for the controls (arguments it adds are passed on).  Without
        ComfyUI's control classes as the pack knows them (self_check.py, logged at load) it steps aside:
        ComfyUI computes control on the canvas and each tile takes its crop of it."""
        if model_options.get("model_function_wrapper") is not self.engine or not self_check.available("controlnet"):
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
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
        return executor(model, out if changed else conds, x_in, timestep, model_options, *args, **kwargs)
