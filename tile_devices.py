"""Several devices: each step's tile batches spread over the devices ComfyUI's MultiGPU nodes prepared.

ComfyUI's ``MultiGPU CFG Split`` (0.23+, ``comfy/multigpu.py``) gives the model deep clones on other
devices; while it samples, ``model_options['multigpu_clones']`` maps each device to its
ModelPatcher (the model's own device first), ``['multigpu_options']`` holds their relative speeds and
``['multigpu_thread_pool']`` one worker thread per device.  ComfyUI's own split
(``_calc_cond_batch_multigpu``) hands each device some of the step's *conditionings*: with one
conditioning (CFG 1) one device works and the others wait, and a tiled model called per conditioning
runs every tile of it on one device.

For a tiled model the *tile* split applies instead (README, Multi-GPU, says why):

1. the keyed ``CALC_COND_BATCH`` wrapper (:meth:`TileDevices.calc_cond_batch`) hands ComfyUI's
   ordinary path the call's options without the clones (every conditioning in one call on the
   model's device, exactly as on one device) and marks the call's ``transformer_options`` with the
   run's :class:`DeviceSet`.  Conditionings with hooks (scheduled LoRA hooks), which ComfyUI applies
   per device clone in its own split, keep ComfyUI's conditioning split;
2. the engine hands each evaluation to :meth:`DeviceSet.evaluate`: the windows, in order, are
   cut into one contiguous share per device in proportion to its relative speed (ComfyUI's
   ``load_balance_devices`` on the windows' pixels, :func:`owners`); each device's share runs in
   tile batches on that device's pool worker, through its model clone, with the call's inputs
   copied to it and its own ControlNet instance (``get_instance_for_device``; its canvas hint
   prepared beforehand on the calling thread, so a latent-input ControlNet's VAE never encodes on
   two threads at once; the workers only crop it), and is blended into
   a canvas buffer of its own; the buffers are summed on the output device in device order
   (deterministic, bounded by one canvas per device);
3. a device that fails (an error, or the interrupt, which ComfyUI's check clears when one thread
   sees it) stops the others at their next tile batch; the call returns only when every device has
   stopped, and raises that device's own error.

Without clones on two devices or more nothing here runs: no thread, no copy.
"""
from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import Counter

import torch

from .tile_inputs import map_tensors
from .utils import P, RUN_KEY

log = logging.getLogger(__name__)

KEY = "quadtree_diffusion_devices"      # the keyed CALC_COND_BATCH wrapper choosing the tile split
DEVICES_KEY = "quadtree_diffusion_device_set"  # transformer_options: the DeviceSet of a call whose tiles are spread


class Stopped(Exception):
    """A device's work ended early because another device failed (never reaches the user)."""


# --------------------------------------------------------------------------- the split (pure)

def proportional(total: int, speeds: list) -> list:
    """Work per device in proportion to its relative speed: total * s_d / sum(s)."""
    s = sum(speeds)
    return [total * v / s for v in speeds]


def owners(work: torch.Tensor, targets: list) -> torch.Tensor:
    """The device of each window, in order: device d takes the windows whose work midpoint
    (c_{i-1} + c_i) / 2 of the cumulative work c lies in [T_{d-1}, T_d), T_d = targets_0 + ... + targets_d.
    Non-decreasing, so each device's windows of a size are one contiguous run."""
    w = work.to(torch.float64)
    mid = torch.cumsum(w, 0) - w / 2
    bounds = torch.tensor(list(itertools.accumulate(targets))[:-1], dtype=torch.float64)
    return torch.searchsorted(bounds, mid, right=True)


def memory_of(device) -> torch.device:
    """The memory a device key stands for (``cpu:1`` is the CPU's)."""
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cpu" else d


def patch_memories(to: dict) -> set:
    """Where the models of the call's model patches live (a patch's ``models()``: ComfyUI's patch classes
    keep one model, which neither ComfyUI's multi-GPU path nor this one copies per device)."""
    out = set()
    for patches in (to.get("patches") or {}).values():
        for p in patches if isinstance(patches, list) else ():
            models = getattr(p, "models", None)
            try:
                found = models() if callable(models) else ()
            except Exception:
                continue
            out.update(memory_of(m.load_device) for m in found if getattr(m, "load_device", None) is not None)
    return out


def has_hooks(conds) -> bool:
    """Whether any conditioning carries hooks (ComfyUI applies those per device clone)."""
    return any(isinstance(c, dict) and c.get("hooks") is not None for cond in conds if cond for c in cond)


# --------------------------------------------------------------------------- inputs on a device

def options_on(to: dict, device) -> dict:
    """A call's transformer_options for ``device``, as ComfyUI's multi-GPU path makes them: a copy
    whose patch lists ComfyUI casts there (``cast_transformer_options``), sigmas on the device,
    ``multigpu_thread_device`` set; the originals untouched."""
    import comfy.samplers
    o = {k: v for k, v in to.items() if k != DEVICES_KEY}
    for key in ("patches", "patches_replace"):
        if isinstance(o.get(key), dict):
            o[key] = {name: copy.copy(v) for name, v in o[key].items()}
    cast = getattr(comfy.samplers, "cast_transformer_options", None)
    if cast is not None:
        cast(o, device=device)
    for key in ("sigmas", "sample_sigmas"):
        if torch.is_tensor(o.get(key)):
            o[key] = o[key].to(device)
    o["multigpu_thread_device"] = device
    return o


def tensors_on(v, device):
    """Every tensor of (nested) model kwargs copied to ``device`` (a no-op where it is), a deferred
    control marker asked for that device's instance."""
    def move(a):
        if torch.is_tensor(a):
            return a.to(device)
        return a.for_device(device) if hasattr(a, "for_device") else a
    return map_tensors(v, move)


def cond_on(c: dict, device) -> dict:
    """A call's model kwargs for ``device``."""
    return {k: options_on(v, device) if k == "transformer_options" else tensors_on(v, device)
            for k, v in c.items()}


def batch_on(ct: dict, device) -> dict:
    """A tile batch's model kwargs with every tensor on ``device`` (tile prompts and references are
    cut from per-run tensors of the output device); options and control as they are."""
    return {k: v if k in ("transformer_options", "control") else tensors_on(v, device) for k, v in ct.items()}


# --------------------------------------------------------------------------- the devices of a run

class DeviceSet:
    """The devices of one sampling run: their model clones (``multigpu_clones``, the model's own
    device first), relative speeds, ComfyUI's thread pool, and tile evaluations made per device."""

    def __init__(self, clones: dict, options: dict | None = None, pool=None):
        self.clones = dict(clones)
        self.devices = list(self.clones)
        self.options = options if isinstance(options, dict) else {}
        self.pool = pool if hasattr(pool, "submit") and hasattr(pool, "get_result") else None
        self.tiles: Counter = Counter()
        self._lock = threading.Lock()

    def speeds(self) -> list:
        return [float((self.options.get(d) or {}).get("relative_speed", 1.0)) or 1.0 for d in self.devices]

    def targets(self, total: int) -> list:
        """Work per device for ``total`` units: ComfyUI's ``load_balance_devices`` where it has it,
        else in proportion to the relative speeds."""
        try:
            import comfy.multigpu
            lb = comfy.multigpu.load_balance_devices(
                {"multigpu_options": self.options, "multigpu_clones": self.clones}, total)
            return [float(lb.work_per_device[d]) for d in self.devices]
        except Exception:
            return proportional(total, self.speeds())

    def usable(self, to: dict, run=None) -> list:
        """Whether each device may take tiles: all of them, but where a model patch's model lives on one
        device's memory only the devices sharing it (logged once per run)."""
        pinned = patch_memories(to)
        ok = [not pinned or memory_of(d) in pinned for d in self.devices]
        if not all(ok):
            if not any(ok):
                ok = [i == 0 for i in range(len(ok))]
            if run is not None and run.once("devices_patches"):
                log.info("%s a model patch's model lives on %s: its tiles run on %s only", P,
                         ", ".join(sorted(str(m) for m in pinned)),
                         ", ".join(str(d) for d, y in zip(self.devices, ok) if y))
        return ok

    def shares(self, ev, usable=None) -> list:
        """Per device, its (group, start, stop) runs of the evaluation's windows (none where ``usable``
        says no)."""
        sizes = [(g, int(g.ids.numel())) for g in ev.groups]
        work = torch.cat([torch.full((n,), float(g.size[0] * g.size[1])) for g, n in sizes]) if sizes else torch.zeros(0)
        targets = self.targets(int(work.sum()))
        if usable is not None and not all(usable):
            targets = proportional(int(work.sum()), [s if y else 0.0 for s, y in zip(self.speeds(), usable)])
        own = owners(work, targets)
        out = [[] for _ in self.devices]
        at = 0
        for g, n in sizes:
            o = own[at:at + n]
            at += n
            for d in range(len(self.devices)):
                idx = (o == d).nonzero().reshape(-1)
                if idx.numel():
                    out[d].append((g, int(idx[0]), int(idx[-1]) + 1))
        return out

    def count(self, device, n: int):
        with self._lock:
            self.tiles[str(device)] += n

    def describe(self) -> str:
        return ", ".join(f"{d} {self.tiles.get(str(d), 0)}" for d in self.devices)

    # ---- one evaluation
    def evaluate(self, engine, model, x, t, c, cou, n_chunks, plan, ev, run):
        """``engine._evaluate`` over the devices: each its share of ``ev``'s windows, summed on x's device."""
        stop = threading.Event()
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        usable = self.usable(c.get("transformer_options") or {}, run)
        jobs = [(d, share) for d, share in zip(self.devices, self.shares(ev, usable)) if share]
        deferred = c.get("control")
        if hasattr(deferred, "prepare_hints"):      # on this thread: the workers only crop
            for d, _ in jobs:
                deferred.for_device(d).prepare_hints(t, ev.H, ev.W, torch.empty(0, device=d).device)
        results = self._run([(d, self._work, (engine, d, share, model, x, t, c, cou, n_chunks, plan, ev, run,
                                               stop, modes)) for d, share in jobs])
        errors = [e for _, e in results if e is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])
        out = None
        for o, _ in results:
            o = o.to(x.device)
            out = o if out is None else out.add_(o)
        return torch.zeros_like(x) if out is None else out

    def _run(self, jobs) -> list:
        """[(result, error)] of every job, in order, once all have ended: on ComfyUI's pool workers
        (one per device), else on threads of their own (the first job on this thread)."""
        pool_devices = getattr(self.pool, "devices", None) or []
        if self.pool is not None and all(d in pool_devices for d, _, _ in jobs):
            for d, fn, args in jobs:
                self.pool.submit(d, fn, *args)
            return [self.pool.get_result(d) for d, _, _ in jobs]
        results = [(None, None)] * len(jobs)

        def call(i, fn, args):
            try:
                results[i] = (fn(*args), None)
            except Exception as e:
                results[i] = (None, e)
        threads = [threading.Thread(target=call, args=(i, fn, args), daemon=True)
                   for i, (_, fn, args) in enumerate(jobs) if i > 0]
        for th in threads:
            th.start()
        if jobs:
            call(0, jobs[0][1], jobs[0][2])
        for th in threads:
            th.join()
        return results

    def _work(self, engine, device, share, model, x, t, c, cou, n_chunks, plan, ev, run, stop, modes):
        """One device's share (on its own thread): its inputs, its model clone, its canvas buffer."""
        import comfy.model_management as mm

        def check():
            if stop.is_set():
                raise Stopped(f"{device}: stopped, another device failed")
            mm.throw_exception_if_processing_interrupted()
        try:
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                set_device = getattr(mm, "set_torch_device", None)
                if set_device is not None:
                    set_device(device)
                base = self.clones[device].model
                m = model if base is model.base else type(model)(base.apply_model, model.inner, model.extra,
                                                                   model.kwargs)
                xd = x.to(device)
                td = t.to(device) if torch.is_tensor(t) else t
                cd = cond_on(c, device)

                def batches():
                    for g, a, b in share:
                        k = max(1, int(engine._batch_size(run, m, xd, n_chunks, g.size, b - a)))
                        for s in range(a, b, k):
                            yield g, slice(s, min(s + k, b))
                out = engine._evaluate_batches(m, xd, td, cd, cou, n_chunks, plan, ev, run, batches(), check,
                                               lambda ct: batch_on(ct, device))
                self.count(device, sum(b - a for _, a, b in share))
                return out
        except BaseException:
            stop.set()
            raise


def devices_of(c: dict):
    """The DeviceSet a call's tiles are spread over (None: one device)."""
    return (c.get("transformer_options") or {}).get(DEVICES_KEY)


class TileDevices:
    """The keyed ``CALC_COND_BATCH`` wrapper that chooses the tile split (one per node output)."""

    def __init__(self, engine):
        self.engine = engine

    def __deepcopy__(self, memo):
        return self      # like the engine: configuration only, shared by model clones

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        """CALC_COND_BATCH: with clones on two devices or more, ComfyUI's ordinary path (all
        conditionings in one call) and the run's DeviceSet for the engine; else unchanged."""
        clones = model_options.get("multigpu_clones")
        to = model_options.get("transformer_options") or {}
        run = to.get(RUN_KEY)
        if (not isinstance(clones, dict) or len(clones) < 2 or run is None
                or model_options.get("model_function_wrapper") is not self.engine):
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        if has_hooks(conds):
            if run.once("devices_hooks"):
                log.info("%s conditionings with hooks: ComfyUI's MultiGPU split by conditioning applies "
                         "(each device runs every tile of its conditionings)", P)
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        if run.devices is None:
            run.devices = DeviceSet(clones, model_options.get("multigpu_options"),
                                    model_options.get("multigpu_thread_pool"))
            log.info("%s %d devices (%s): each step's tiles are spread over them (relative speeds %s)", P,
                     len(clones), ", ".join(str(d) for d in clones),
                     ", ".join(f"{s:g}" for s in run.devices.speeds()))
        mo = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
        mo["transformer_options"] = {**to, DEVICES_KEY: run.devices}
        main = getattr(model, "current_patcher", None)
        for p in clones.values():       # what ComfyUI's prepare_state does for each clone on its own path
            if p is not main and hasattr(p, "prepare_state"):
                p.prepare_state(timestep, mo)
        return executor(model, conds, x_in, timestep, mo, *args, **kwargs)
