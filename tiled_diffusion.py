"""The tile engine: splits each model call into batched tiles and blends the x0 predictions.

Registered on a model clone through ComfyUI's own extension points (nothing is patched):

* ``set_model_unet_function_wrapper``: every model call (``apply_model``, which returns the
  denoised x0) is split into the plan's tile windows (tile_plan.py), same-size windows are
  batched up to the tile batch size (tile_inputs.py) and evaluated at the sampler's shared
  timestep, and the predictions are blended back in x0 space (MultiDiffusion: mean; Mixture of
  Diffusers: per-axis Gaussian weights; SpotDiffusion: a partition of the canvas shifted every
  step, no wrap-around, spot_diffusion.py); calls of regional prompts: regional.py;
* keyed ``SAMPLER_SAMPLE`` and ``PREPARE_SAMPLING`` wrappers: the run's state, memory planning
  for one tile batch, the run's log lines (sampling_run.py);
* keyed ``CALC_COND_BATCH`` wrappers: per-tile ControlNet (tile_control.py), tile prompts
  (tile_conditioning.py), regional prompts' areas and masks (regional.py), and with ComfyUI's
  MultiGPU clones each step's tile batches spread over the devices (tile_devices.py).

Per-tile denoise (variable_denoise.py) is applied per pixel through the layout's weights:
x0' = src + A (x - src) + beta (M - x).
"""
from __future__ import annotations

import logging
import threading

import torch

from . import model_families as mf
from . import noise_inversion as ni
from . import reference_latents as refs
from . import regional
from . import self_check
from . import spot_diffusion as sd
from . import tile_conditioning as tcond
from . import tile_devices as tdev
from . import variable_denoise as vd
from .chunk_parts import ChunkParts
from .tile_calls import TileCalls
from .sampling_run import RunState, SamplingRun
from .spot_diffusion import spot_margin
from .tile_control import TileControl
from .tile_inputs import TileBatch, broadcast_source, item_rows, source_fits, tile_cond, tile_value
from .tile_patches import tile_transformer_options
from .tile_blend import Evaluation, blend, gather
from .tile_windows import batch_of, positions
from .tile_plan import Plan, TileConfig, plan_for, plan_has_levels
from .utils import RUN_KEY, P, PV, WRAPPER_KEY, latent_compression, latent_patch_size

STEPS_KEY = WRAPPER_KEY + ".steps"     # the keyed wrapper that marks each model evaluation's step

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model calls

class ModelCall:
    """One model call of ComfyUI as the engine sees it: ``model(x, t, c, cond_or_uncond)`` -> x0.

    ``apply_model`` is the (per-device) ``BaseModel.apply_model`` ComfyUI handed the unet wrapper;
    ``inner`` a ``model_function_wrapper`` that was on the model before ours (called per tile
    batch); ``more`` the keys of ComfyUI's ``args`` beyond the four the engine tiles (a newer
    ComfyUI may add some, e.g. ``cond_scale``), and ``extra``/``kwargs`` whatever else it passed our
    wrapper: all forwarded unchanged to ``inner``.
    """

    __slots__ = ("apply_model", "inner", "extra", "kwargs", "more")
    TILED = ("input", "timestep", "c", "cond_or_uncond")

    def __init__(self, apply_model, inner=None, extra=(), kwargs=None, args=None):
        self.apply_model, self.inner, self.extra, self.kwargs = apply_model, inner, tuple(extra), kwargs or {}
        self.more = {k: v for k, v in (args or {}).items() if k not in self.TILED}

    @property
    def base(self):
        """The ``BaseModel`` behind ``apply_model`` (None if it is not a bound method)."""
        return getattr(self.apply_model, "__self__", None)

    def __call__(self, x, t, c, cond_or_uncond):
        if self.inner is not None:
            return self.inner(self.apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond,
                                                 **self.more}, *self.extra, **self.kwargs)
        return self.apply_model(x, t, **c)


# --------------------------------------------------------------------------- engine

class TiledDiffusion(SamplingRun, regional.RegionalCalls, ChunkParts, TileCalls):
    """The unet function wrapper and its keyed sampler wrappers (one object per node output)."""

    def __init__(self, cfg: TileConfig, inner=None):
        self.cfg = cfg
        self.inner = inner          # a model_function_wrapper that was already on the model
        self._plans: dict = {}      # plans by canvas/device/dtype/item (bounded), reused by later runs
        self._largest: dict = {}    # largest window per canvas, for memory planning
        self._warned_no_run = False
        self.inversions = ni.Inversions()     # the last inversion's source and result (noise_inversion.py)
        # ComfyUI's multi-GPU path calls the wrapper from one thread per device: the shared plan
        # cache is updated under a lock (per-device plans themselves are used by one thread)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options up to ComfyUI 0.13 and shares objects
        # since 0.14: either way every clone gets this same engine (configuration plus derived
        # caches keyed by canvas, device and dtype; per-run state lives in the run's options).
        return self

    # ---- the unet wrapper
    def __call__(self, apply_model, args, *extra, **kwargs):
        """The unet function wrapper: ``args`` holds ComfyUI's model call on the whole canvas;
        anything else ComfyUI passes is forwarded to a wrapper that was on the model before ours."""
        x, t, c, cou = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        to = c.get("transformer_options", {})
        mf.check_transformer_options(to)
        run: RunState | None = to.get(RUN_KEY)
        model = ModelCall(apply_model, self.inner, extra, kwargs, args)
        base = model.base
        H, W = int(x.shape[-2]), int(x.shape[-1])
        n_chunks = len(cou) if cou and x.shape[0] % len(cou) == 0 else 1
        canvas = run.canvas if run is not None else (H, W)
        if (H, W) != tuple(canvas):
            return self._area_call(model, x, t, c, cou, n_chunks, base, run)
        src = run.source_frames(to, x) if run is not None else None
        if src is not None and not source_fits(src, x, n_chunks):
            src = None
        if run is not None:
            run.stats["calls"] += 1
        items = len(self.cfg.layouts)
        if items == 1:
            return self._call_item(model, x, t, c, cou, n_chunks, run, base, src, 0)
        B = x.shape[0] // n_chunks
        out = torch.empty_like(x)
        for b, rows, xb, tb, cb in item_rows(x, t, c, n_chunks, items):
            sb = None if src is None else src[b:b + 1] if src.shape[0] == B else src
            out[rows] = self._call_item(model, xb, tb, cb, cou, n_chunks, run, base, sb, b)
        return out

    def _call_item(self, model: ModelCall, x, t, c, cou, n_chunks, run, base, src, item):
        """One model call on the full canvas with one layout."""
        to = c.get("transformer_options", {})
        H, W = int(x.shape[-2]), int(x.shape[-1])
        plan = self._plan(run, H, W, base, x, item)
        step, n = self._step(run, t, to)
        coeffs = self._coefficients(plan, run, step, n, src, x)
        if self.cfg.variable_denoise == "scale" and run is not None and run.once("scale"):
            d = min(dd for dd, _ in plan.levels)
            p = vd.progress(ni.mirrored_step(step, n, run.sigmas), n)
            log.info("%s SMOOTH SCALING - tile_denoise=%.3f, progress=%.3f, start_scale=%.3f, scale=%.3f",
                     PV, d, p, vd.scale_start(d), vd.scale_alpha(d, p))
        active = {lvl for lvl, (a, _) in enumerate(coeffs) if a > 0}
        if plan.spot:       # this step's shifted partition; each core written back as it is
            oy, ox = self._spot_offsets(run, plan, step, n, to, item)
            ev, n_windows, skipped = plan.spot_evaluation(active, oy, ox, spot_margin(to, plan.compression, plan.align),
                                                          sd.spot_exact(to))
        else:
            ev = plan.evaluation(plan.windows_of(active))
            n_windows, skipped = len(plan.set), plan.n_skipped
        if run is not None:
            st = run.stats
            st["full"] += n_windows
            st["tiles"] += len(ev)
            st["skip_saved"] += skipped
            st["schedule_saved"] += n_windows - skipped - len(ev)
        if not len(ev):
            return broadcast_source(src, x, n_chunks)
        masks = regional.chunk_masks(run, to, n_chunks)
        if masks is None:
            mixed = self._evaluate(model, x, t, c, cou, n_chunks, plan, ev, run)
        else:
            mixed = self._evaluate_masked(model, x, t, c, cou, n_chunks, plan, ev, run, masks)
        if all(a == 1.0 and b == 1.0 for a, b in coeffs):
            return mixed
        A, beta = plan.activity_maps(coeffs)
        B = x.shape[0] // n_chunks
        xv = x.reshape(n_chunks, B, *x.shape[1:])
        mv = mixed.reshape(n_chunks, B, *x.shape[1:])
        sv = src.to(x).reshape(1, src.shape[0], *x.shape[1:])
        return vd.combine_x0(sv, xv, mv, A, beta).reshape(x.shape)

    # ---- helpers
    def _coefficients(self, plan: Plan, run, step: int, n: int, src, x) -> list:
        """Per level of the plan, this step's (a, b) of variable denoise; all (1, 1) without a source.
        Ascending sigmas (an inversion) read the steps backwards (noise_inversion.py)."""
        if run is not None:
            step = ni.mirrored_step(step, n, run.sigmas)
        coeffs = [vd.tile_coefficients(self.cfg.variable_denoise if plan_has_levels(self.cfg) else "off",
                                       d, sk, step, n) for d, sk in plan.levels]
        if src is None and any(a != 1.0 or b != 1.0 for a, b in coeffs):
            if run is None and not self._warned_no_run:
                self._warned_no_run = True       # once per engine: there is no run to attach it to
                log.warning("%s WARNING - No sigmas in store, variable denoise will NOT work "
                            "(the model was called outside a KSampler run); tiles run at full strength", PV)
            elif run is not None and run.once("nosrc"):
                log.warning("%s WARNING - the sampler's source latent %s does not match the model input %s: "
                            "variable denoise and skip will NOT work; tiles run at full strength", PV,
                            list(run.source.shape) if run.source is not None else None, list(x.shape))
            coeffs = [(1.0, 1.0)] * len(coeffs)
        return coeffs

    def _plan(self, run, H, W, base, x, item=0) -> Plan:
        run_key = (item, str(x.device))       # per device: ComfyUI's multi-GPU path runs one call per device
        if run is not None and run_key in run.plans:
            return run.plans[run_key]
        key = (H, W, str(x.device), x.dtype, item)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                import comfy.model_management as mm
                plan = plan_for(self.cfg, H, W, latent_compression(base), latent_patch_size(base), x.device,
                                x.dtype, item=item, min_tile=mf.min_tile(base),
                                check=mm.throw_exception_if_processing_interrupted)
                if len(self._plans) >= 4:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = plan
        if run is not None:
            if run.once(f"plan{item}"):
                self._log_plan(plan, run, item)
            run.plans[run_key] = plan
        return plan

    def _evaluate(self, model: ModelCall, x, t, c, cou, n_chunks, plan, ev: Evaluation, run):
        """M = sum over the evaluated windows of weight_t * x0_t (SpotDiffusion: each window's x0 on
        its core, the weights 1 there and 0 on its context), model calls batched by window size;
        spread over ComfyUI's multi-GPU devices when the call has them (tile_devices.py)."""
        devices = tdev.devices_of(c)
        if devices is not None:
            return devices.evaluate(self, model, x, t, c, cou, n_chunks, plan, ev, run)
        return self._evaluate_batches(model, x, t, c, cou, n_chunks, plan, ev, run)

    def _evaluate_batches(self, model: ModelCall, x, t, c, cou, n_chunks, plan, ev: Evaluation, run, batches=None,
                          check=None, place=None):
        """``_evaluate`` on x's device for ``batches`` ((group, slice) of ``ev``; default all, k per call).

        Per tile batch: ``check()`` (the interrupt), one indexed read of the k windows (``gather``), the
        model kwargs cut to them (``place``d on the device), one model call, one indexed write back
        (``blend``); ``plan.frame`` places the windows on the canvas (an area plan's start at its box)."""
        import comfy.model_management as mm
        check = check or mm.throw_exception_if_processing_interrupted
        if batches is None:
            batches = ev.batches(lambda size, n: self._batch_size(run, model, x, n_chunks, size, n))
        N = x.shape[0]
        H, W = ev.H, ev.W
        B = N // n_chunks
        x = x.contiguous()
        out = torch.zeros_like(x)
        c = mf.canvas_cond(c, model.base, H, W)
        whole = mf.whole_keys(model.base)
        rep: dict = {}      # repeated (non-spatial) conditioning per tile count, shared by this call's batches
        prompts = tcond.chunk_prompts(run, c.get("transformer_options", {}), n_chunks)
        refs.check_canvas_grid(c, model.base, H, W, batch_of(ev.windows, ev.ids))
        rs = refs.ref_set(model.base, c, H, W, mf.spatial_patch(model.base), self.cfg.reference_mode)
        for g, sl in batches:
            check()
            wins = ev.windows_of(g, sl)
            starts = g.starts[sl].to(x.device)
            pos = positions(starts, *g.size, W, x.device)
            xt = gather(x, n_chunks, starts, *g.size, pos)
            tt = tile_value(t, wins, n_chunks, N, H, W, False, rep) if t.ndim > 0 and t.shape[0] == N else t
            ct = tile_cond(c, wins, n_chunks, N, H, W, rep, whole)
            if prompts is not None:
                ct = tcond.apply(ct, wins, plan.frame, n_chunks, B, prompts)
            tb = TileBatch(wins, H, W, n_chunks)
            if "transformer_options" in ct:     # model patches (image controls) get their tile's crop
                ct["transformer_options"] = tile_transformer_options(ct["transformer_options"], tb, xt,
                                                                     run.hints if run is not None else rep,
                                                                     latent_compression(model.base))
            rpatch = None
            if rs is not None:      # reference images: each tile meets them where the canvas does
                ct, rpatch = refs.tile_references(ct, c, rs, wins, n_chunks, N, model.base,
                                                  run.hints if run is not None else rep)
            if place is not None:
                ct = place(ct)
            deferred = ct.get("control")
            if hasattr(deferred, "tile_control"):
                ct["control"] = deferred.tile_control(xt, tt, ct, tb)
            pred = model(xt, tt, ct, cou)
            if rpatch is not None:
                rpatch.check(model.base)
            if run is not None:
                run.count_call(xt)
            blend(out, pred, n_chunks, starts, ev.batch_weights(g, sl).to(x.device), g.cores_only, pos)
        return out


def tiled_model(model, cfg: TileConfig):
    """A clone of ``model`` that samples in tiles: the engine as its unet function wrapper plus
    keyed SAMPLER_SAMPLE (run state), PREPARE_SAMPLING (memory planning) and CALC_COND_BATCH
    (per-tile ControlNet; per-tile prompts) wrappers.  A wrapper already on the model is kept and called per tile
    batch; an earlier Quadtree Diffusion on the same model is replaced, not stacked."""
    m = model.clone()
    inner = m.model_options.get("model_function_wrapper")
    if isinstance(inner, TiledDiffusion):
        log.info("%s the model was already tiled: the new settings replace the old ones", P)
        inner = inner.inner
    engine = TiledDiffusion(cfg, inner)
    m.set_model_unet_function_wrapper(engine)
    kinds = self_check.wrapper_types()      # the wrapper types this ComfyUI offers (a missing one is logged at load)
    for kind, key, fn in (("SAMPLER_SAMPLE", WRAPPER_KEY, engine.sampler_sample),
                          ("PREPARE_SAMPLING", WRAPPER_KEY, engine.prepare_sampling),
                          ("CALC_COND_BATCH", WRAPPER_KEY, TileControl(engine).calc_cond_batch),
                          ("CALC_COND_BATCH", STEPS_KEY, engine.mark_evaluation),
                          ("CALC_COND_BATCH", tcond.KEY, tcond.TilePromptConds().calc_cond_batch),
                          ("CALC_COND_BATCH", regional.KEY, regional.RegionRecorder().calc_cond_batch),
                          ("CALC_COND_BATCH", tdev.KEY, tdev.TileDevices(engine).calc_cond_batch)):
        if kind in kinds:
            m.remove_wrappers_with_key(kinds[kind], key)
            m.add_wrapper_with_key(kinds[kind], key, fn)
    return m
