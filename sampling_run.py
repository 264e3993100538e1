"""One sampling run of a tiled model: its state, how it starts and ends, and what it logs.

* the keyed ``SAMPLER_SAMPLE`` wrapper starts a :class:`RunState` that lives in that run's
  ``transformer_options`` only (sigmas, source latent, canvas, per-run caches) and counts the
  sampler's steps through its callback (no host round trip per model call);
* the keyed ``PREPARE_SAMPLING`` wrapper refuses latents and models that cannot be tiled, with the
  fix, and lets ComfyUI's memory planning see one tile batch instead of the canvas;
* the run's log lines, once per run, never per step.

Mixed into ``tiled_diffusion.TiledDiffusion`` (its ``cfg`` and plan cache).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from . import model_families as mf
from . import variable_denoise as vd
from . import noise_inversion as ni
from .context_frames import window_frames
from .spot_diffusion import spot_margin
from .tile_plan import Plan, plan_for, plan_has_levels
from .utils import PS, PV, RUN_KEY, P, latent_compression, latent_patch_size

log = logging.getLogger(__name__)

MANY_TILES = 1000


@dataclass
class RunState:
    """What one sampling run knows: its sigmas, source latent and step counter."""
    sigmas: list
    source: torch.Tensor | None
    canvas: tuple
    step: int = 0
    second_evaluation: bool = False      # the sampler is one of SECOND_EVALUATION (see step_of_evaluation)
    evaluations: int = 0                 # model evaluations since the last callback (marked by CALC_COND_BATCH)
    timestep: object = None              # the evaluation under way's timestep tensor (its identity marks it)
    plans: dict = field(default_factory=dict)     # (batch item, device) -> Plan
    spot: dict = field(default_factory=dict)     # batch item -> (y shifts, x shifts) per step
    batch: dict = field(default_factory=dict)    # (device, window size) -> auto tile batch
    hints: dict = field(default_factory=dict)    # prepared canvas-sized control hints (tile_control.py)
    areas: dict = field(default_factory=dict)    # cond uuid -> its area's (y, x, h, w) box (regional.py)
    masks: dict = field(default_factory=dict)    # cond uuid -> summed-area table of its mask's support (regional.py)
    prompts: dict = field(default_factory=dict)  # cond uuid -> tile prompts encoded (tile_conditioning.py)
    stats: dict = field(default_factory=lambda: {"calls": 0, "tiles": 0, "full": 0, "skip_saved": 0,
                                                 "schedule_saved": 0, "mask_saved": 0, "mask_apart": 0,
                                                 "batches": 0, "rows": 0, "max_rows": 0})
    shapes: set = field(default_factory=set)     # distinct input shapes the model was called with
    logged: set = field(default_factory=set)
    context_handler: object = None               # ComfyUI's temporal context handler, if the model has one
    devices: object = None                       # the devices tiles are spread over (tile_devices.DeviceSet)
    lock: object = field(default_factory=threading.Lock)    # counting from several devices' threads

    def source_frames(self, to: dict, x: torch.Tensor) -> torch.Tensor | None:
        """The source latent at the frames of the model input ``x``: the whole source when its
        channels and frames are x's, else (inside a temporal context window) the window's frames of it
        (context_frames.py); the whole source again if neither fits (the caller then drops it)."""
        src = self.source
        if src is None or src.shape[1:-2] == x.shape[1:-2] or (to or {}).get("context_window") is None:
            return src
        framed = window_frames(to, src, self.context_handler)
        return framed if framed is not None and framed.shape[1:-2] == x.shape[1:-2] else src

    def count_call(self, x: torch.Tensor):
        """One call of the model itself (a tile batch): its rows and input shape."""
        with self.lock:
            self._count(x)

    def _count(self, x: torch.Tensor):
        st = self.stats
        st["batches"] += 1
        st["rows"] += int(x.shape[0])
        st["max_rows"] = max(st["max_rows"], int(x.shape[0]))
        self.shapes.add(tuple(x.shape))

    @property
    def n(self) -> int:
        return vd.steps_of(self.sigmas)

    def once(self, key: str) -> bool:
        if key in self.logged:
            return False
        self.logged.add(key)
        return True


def check_latent(base, shape) -> None:
    """Refuse latents the engine cannot tile, naming the input and the fix."""
    shape = list(shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"latent: Quadtree Diffusion tiles latents of shape [batch, channels, height, width] "
                         f"(or [batch, channels, frames, height, width]); this latent has shape {shape}: "
                         f"connect an image/video latent, or remove Quadtree Diffusion for this model")
    fmt = getattr(base, "latent_format", None)
    expected = getattr(fmt, "latent_channels", None)
    if isinstance(expected, int) and len(shape) == 2 + getattr(fmt, "latent_dimensions", 2) and shape[1] != expected:
        raise ValueError(f"latent: {shape[1]} channels but the model expects {expected}: encode the image with "
                         f"this model's VAE (or use an Empty Latent Image made for this model)")


def run_calls(run: RunState) -> str:
    """What the model itself was asked for in a run: calls, rows per call, distinct input shapes."""
    s = run.stats
    n = s["batches"]
    return (f"the model: {n} calls, {s['rows'] / max(1, n):.1f} rows per call (at most {s['max_rows']}), "
            f"{len(run.shapes)} distinct input shapes")


# k-diffusion samplers that evaluate the model once more in a step after that step's callback (heun's
# corrector at the next sigma, a midpoint for the others) unless the step ends at sigma 0.
SECOND_EVALUATION = ("sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_sde",
                     "sample_dpmpp_sde_gpu")


def evaluates_after_callback(sampler) -> bool:
    """Whether ComfyUI's ``sampler`` (a ``KSAMPLER``) runs one of SECOND_EVALUATION: detected by the
    function object it holds, so a sampler not listed keeps the callback's step."""
    fn = getattr(sampler, "sampler_function", None)
    try:
        import comfy.k_diffusion.sampling as kds
    except ImportError:
        return False
    return fn is not None and any(fn is getattr(kds, name, None) for name in SECOND_EVALUATION)


def step_of_evaluation(step: int, evaluations: int, second_evaluation: bool) -> int:
    """The step a model evaluation belongs to, given ``step`` = callbacks seen so far and ``evaluations``
    = evaluations since the last callback, this one included.

    The callback of step i comes after the step's first evaluation, so ``step`` is already i + 1 at its
    second one: for a SECOND_EVALUATION sampler the first evaluation after a callback is step - 1's.
    (Heun's corrector has the next step's sigma and the same input as Euler's next evaluation: only the
    sampler tells them apart.)
    """
    return step - 1 if second_evaluation and step > 0 and evaluations == 1 else step


class SamplingRun:
    """The sampler-facing side of the tile engine: keyed wrappers and the run's log lines."""

    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False, *args, **kwargs):
        """SAMPLER_SAMPLE: start a RunState for this run and count its steps.

        Arguments ComfyUI adds in later versions (``*args``, ``**kwargs``) are passed on unchanged.
        """
        mo = extra_args.setdefault("model_options", {})
        run = RunState(sigmas=[float(s) for s in sigmas.tolist()], source=latent_image,
                       canvas=tuple(noise.shape[-2:]), context_handler=mo.get("context_handler"))
        inverted_from = None if ni.ascending(run.sigmas) else self.inversions.source_of(latent_image, noise)
        if inverted_from is not None:       # resampling an inversion: per-tile denoise needs its clean source
            run.source = inverted_from
        to = dict(mo.get("transformer_options", {}))
        to[RUN_KEY] = run
        mo["transformer_options"] = to
        self._log_run_start(run, inverted_from is not None)

        run.second_evaluation = evaluates_after_callback(getattr(executor, "class_obj", None))

        def counting_callback(i, denoised, x, total, *cb_args, **cb_kwargs):
            run.step = i + 1
            run.evaluations = 0
            if callback is not None:
                return callback(i, denoised, x, total, *cb_args, **cb_kwargs)

        try:
            out = executor(guider, sigmas, extra_args, counting_callback, noise, latent_image,
                           denoise_mask, disable_pbar, *args, **kwargs)
            if ni.ascending(run.sigmas):
                self.inversions.record(latent_image, out)
            return out
        finally:
            self._log_run_end(run)

    def mark_evaluation(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        """CALC_COND_BATCH: a new model evaluation starts when ComfyUI passes another timestep tensor
        (every call and context window of one evaluation shares it); its step is step_of_evaluation's.
        Everything else is passed on unchanged."""
        run = (model_options or {}).get("transformer_options", {}).get(RUN_KEY)
        if run is not None and timestep is not run.timestep:
            run.timestep = timestep
            run.evaluations += 1
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    def _step(self, run, t, to) -> tuple[int, int]:
        """(this call's step, steps of the run): the evaluation's step (step_of_evaluation; the run's
        counter where ComfyUI marked no evaluation), else the nearest of ``sample_sigmas``."""
        if run is not None:
            return min(step_of_evaluation(run.step, run.evaluations, run.second_evaluation), run.n - 1), run.n
        sigmas = to.get("sample_sigmas")
        if sigmas is None or len(sigmas) < 2:
            return 0, 1
        sig = [float(s) for s in sigmas.tolist()]
        return vd.nearest_step(sig, float(t.reshape(-1)[0])), vd.steps_of(sig)

    def prepare_sampling(self, executor, model, noise_shape, conds, *args, **kwargs):
        """PREPARE_SAMPLING: let ComfyUI plan memory for one tile batch, not the whole canvas.

        Everything else ComfyUI passes (``model_options=``, and since 0.6 ``force_full_load=``,
        ``force_offload=``, ...) is passed on unchanged.
        """
        import comfy.model_management as mm
        check_latent(model.model, noise_shape)
        mf.check_tileable(model.model)
        try:
            base = model.model
            c, a = latent_compression(base), latent_patch_size(base)
            H, W = int(noise_shape[-2]), int(noise_shape[-1])
            mo = kwargs.get("model_options") or model.model_options
            margin = spot_margin(mo.get("transformer_options", {}), c, a)
            h, w, n = self._largest_tile(H, W, c, a, margin, mf.min_tile(base))
            k = min(self.cfg.tile_batch_size or 1, n)
            noise_shape = [noise_shape[0] * k, *noise_shape[1:-2], h, w]
        except (ValueError, mm.InterruptProcessingException):
            raise
        except Exception as e:  # never block sampling on an estimate
            log.warning("%s memory estimate fell back to the canvas shape: %s", P, e)
        return executor(model, noise_shape, conds, *args, **kwargs)

    def _largest_tile(self, H: int, W: int, compression: int, align: int, margin: int = 0,
                      min_tile: int = 1) -> tuple[int, int, int]:
        """(largest window height, width, most windows) over the layouts on an H x W latent; cached.
        SpotDiffusion: over every shift of its partition, each core grown by ``margin``."""
        key = (H, W, compression, align, margin, min_tile)
        hit = self._largest.get(key)
        if hit is None:
            import comfy.model_management as mm
            plans = [plan_for(self.cfg, H, W, compression, align, "cpu", torch.float32, item=i, min_tile=min_tile,
                              check=mm.throw_exception_if_processing_interrupted)
                     for i in range(len(self.cfg.layouts))]
            sizes = [plan.max_window(margin) for plan in plans]
            hit = (max(h for h, _ in sizes), max(w for _, w in sizes),
                   max(plan.partition.max_tiles() if plan.spot else len(plan.set) for plan in plans))
            if len(self._largest) >= 8:
                self._largest.clear()
            self._largest[key] = hit
        return hit

    def _log_run_start(self, run: RunState, resampling: bool = False):
        cfg = self.cfg
        levels = plan_has_levels(cfg) and cfg.variable_denoise != "off"
        if ni.ascending(run.sigmas):
            log.info("%s noise inversion (ascending sigmas)%s", P,
                     ": each tile is inverted up to its own denoise (active in its first round(d*n) steps)"
                     if levels else "")
        elif resampling:
            log.info("%s resampling this model's last inversion%s", P,
                     ": per-tile denoise takes the image that was inverted as its source" if levels else "")
        if cfg.layout is None and cfg.skip_below <= 0:
            return
        if cfg.variable_denoise != "off" and cfg.layout is not None:
            log.info("%s Loaded sigmas from store, length=%d", PV, len(run.sigmas))
            lo, hi = cfg.denoise_range
            log.info("%s Denoise range: %.3f to %.3f", PV, lo, hi)
            log.info("%s ENABLED - Tiles will be denoised adaptively (mode=%s)", PV, cfg.variable_denoise)
        empty = run.source is not None and not bool(torch.count_nonzero(run.source))   # once per run
        if empty and cfg.skip_below > 0:
            log.warning("%s skip_diffusion_below=%dpx with an empty (all-zero) latent: skipped tiles "
                        "stay at the empty latent and will come out flat; use skip for img2img only",
                        PS, cfg.skip_below)
        if empty and cfg.layout is not None and cfg.variable_denoise != "off" and cfg.denoise_range[0] < 1.0:
            log.warning("%s WARNING - variable denoise with an empty (all-zero) latent: tiles with denoise < 1 "
                        "start from a blank image and come out flat; for txt2img set variable_denoise to off "
                        "(or min_denoise = max_denoise = 1)", PV)

    def _log_run_end(self, run: RunState):
        s = run.stats
        if s["calls"] == 0:
            return
        stepwise = (self.cfg.variable_denoise != "off" and plan_has_levels(self.cfg)) or \
            self.cfg.method == "SpotDiffusion"
        if stepwise and run.step == 0 and run.n > 1:
            log.warning("%s WARNING - the sampler never reported a finished step (it called no callback): "
                        "per-step settings (variable denoise, SpotDiffusion shifts) stayed at the first step; "
                        "use a KSampler / SamplerCustom sampler", PV)
        log.info("%s run done: %d model calls, %d tile evaluations; saved %d by schedule and %d by "
                 "skip (of %d for all tiles at every call)%s; %s%s", P, s["calls"], s["tiles"],
                 s["schedule_saved"], s["skip_saved"], s["full"],
                 f"; mask prompts: {s['mask_apart']} window evaluations in calls without every prompt's rows, "
                 f"{s['mask_saved']} saved where their mask is 0" if s["mask_saved"] else "", run_calls(run),
                 f"; tile evaluations per device: {run.devices.describe()}" if run.devices is not None else "")

    def _log_plan(self, plan: Plan, run: RunState, item: int = 0):
        cfg = self.cfg
        k = cfg.tile_batch_size or "auto"
        mode = "quadtree" if cfg.layout is not None else "grid"
        if len(cfg.layouts) > 1:
            mode += f" (batch item {item})"
        log.info("%s %s %s on a %dx%d latent: %s, tile batch %s, overlap %s", P, cfg.method, mode,
                 plan.W, plan.H, plan.describe(), k,
                 f"{cfg.tile_overlap}px" if cfg.enable_overlap and not plan.spot else "off")
        for note in plan.notes:
            log.info("%s %s", P, note)
        if len(plan.set) > MANY_TILES:
            log.warning("%s %d tiles: sampling will be slow; raise min_tile_size / tile size", P,
                        len(plan.set))
        if cfg.skip_below > 0:
            log.info("%s Will skip %d/%d tiles (min dimension < %dpx)", PS, plan.n_skipped, len(plan.set),
                     cfg.skip_below)
