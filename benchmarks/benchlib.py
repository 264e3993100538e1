"""Shared setup and instruments of the benchmark scripts (bench_cpu.py, bench_gpu.py).

Nothing here asserts anything about time: the scripts print ratios measured side by side in
one run. Everything goes through ComfyUI's own extension points (nothing is patched):

* :class:`ModelMeter` is a ``model_function_wrapper`` set on the model *before*
  ``QuadtreeDiffusion`` clones it. The engine composes with an existing wrapper (it calls it
  once per tile batch), so the meter sees every tile batch the model is asked for: it counts
  them and can record one step's calls (x, t, c) to be replayed on the bare model.
  In an untiled run it is the only wrapper and sees the whole-canvas calls.
* :class:`StepClock` is a keyed ``SAMPLER_SAMPLE`` wrapper (key ``qtd_bench``) that wraps the
  sampler's callback and time-stamps the end of every step (after a device synchronise on
  GPUs), so a step's time excludes the run's fixed setup (noise, model loading, planning).
  On the CPU the stamps are the thread's CPU time (torch pinned to one thread): the machines
  this runs on are shared, and CPU time is the work done whatever the neighbours do; the
  wall-clock stamps are kept beside them.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import logging
import os
import platform
import re
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
BENCH_KEY = "qtd_bench"
RUN_DONE_RE = re.compile(r"run done: (\d+) model calls, (\d+) tile evaluations; saved (\d+) by schedule "
                         r"and (\d+) by skip \(of (\d+) for all tiles at every call\)")


# ----------------------------------------------------------------------------- setup

def load_fixtures(setup_comfy: bool = False):
    """tests/fixtures.py as module ``qtd_fixtures`` (the way tests/conftest.py registers it); with
    ``setup_comfy``, ComfyUI put on ``sys.path`` for the CPU as the tests do (``fx.setup_comfy``)."""
    name = "qtd_fixtures"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(TESTS_DIR, "fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if setup_comfy:
        module.setup_comfy()
    return module


def _setup_comfy_accelerated(fx) -> str:
    """ComfyUI on sys.path (the repo root off it) without forcing the CPU."""
    path = os.path.realpath(fx.default_comfy_path())
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"ComfyUI not found at {path!r}: set COMFYUI_PATH or run scripts/provision.sh")
    sys.path[:] = [p for p in sys.path if not fx._same_dir(p, REPO_ROOT) and not fx._same_dir(p, BENCH_DIR)]
    sys.path.insert(0, path)
    import comfy.options  # noqa: F401  (library mode: ComfyUI's argument parsing stays off)
    return path


def setup(device: str = "cpu", threads: int | None = None, pack_dir: str | None = None):
    """(fixtures module, pack module, ComfyUI path). ``device`` 'cpu' forces ComfyUI onto the CPU
    (like the tests); anything else leaves ComfyUI's own device choice (the GPU). ``pack_dir``
    loads the node pack from another folder (a prototype copy) under the same module name."""
    import torch
    if threads:
        torch.set_num_threads(int(threads))
    fx = load_fixtures()
    if device == "cpu":
        path = fx.setup_comfy()
    else:
        path = _setup_comfy_accelerated(fx)
    # The script's own folder must not shadow ComfyUI's top-level modules either.
    sys.path[:] = [p for p in sys.path if not fx._same_dir(p, BENCH_DIR)]
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    pack = fx.load_pack(os.path.realpath(pack_dir) if pack_dir else REPO_ROOT)
    return fx, pack, path


def demo_photo_maker():
    """``make_photo(size) -> PIL.Image`` from scripts/make_sample_photo.py, or None if absent."""
    path = os.path.join(REPO_ROOT, "scripts", "make_sample_photo.py")
    if not os.path.isfile(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location("qtd_sample_photo", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return lambda size: module.make_photo(size)
    except Exception as e:  # noqa: BLE001  the photo is a convenience: fall back to the fixture photo
        logging.getLogger(__name__).warning("demo photo unavailable (%s); using the fixture photo", e)
        return None


def versions(comfy_path: str) -> dict:
    import torch
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "?"
    try:
        sys.path.insert(0, comfy_path)
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except Exception:  # noqa: BLE001  a version string only
        comfy_version = "?"
    info = {"torch": torch.__version__, "comfyui": comfy_version, "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(sys.executable)]
                                                                             + sys.argv)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- instruments

def _sync(device):
    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class ModelMeter:
    """model_function_wrapper counting (and optionally recording) every call of the model.

    A *call* is one ``apply_model`` call (one tile batch in a tiled run); ``tiles`` counts tile
    evaluations the way the engine's run summary does (a tile evaluated for cond and uncond in
    one call counts once); ``pixels`` counts latent pixels evaluated (rows x h x w).
    """

    def __init__(self, profile_ranges: bool = False):
        self.clock: StepClock | None = None
        self.record_step: int | None = None     # record the calls made during this step index
        self.recorded: list = []
        self.signatures: dict = {}              # {(step, call signature): count}
        self.events: list = []                  # CUDA (start, end, step) events per call, if timing
        self.cuda_events = False
        self.profile_ranges = profile_ranges
        self.reset()

    def __deepcopy__(self, memo):   # ModelPatcher.clone deep-copies model_options: share the meter
        return self

    def reset(self):
        self.calls = 0
        self.rows = 0
        self.tiles = 0
        self.pixels = 0
        self.shapes: dict = {}
        self.recorded = []
        self.signatures = {}
        self.events = []

    def __call__(self, apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        chunks = max(1, len(args.get("cond_or_uncond") or [1]))
        self.calls += 1
        self.rows += x.shape[0]
        self.tiles += max(1, x.shape[0] // chunks)
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        key = tuple(x.shape)
        self.shapes[key] = self.shapes.get(key, 0) + 1
        step = self.clock.step if self.clock is not None else 0
        sig = (step, call_signature(x, t, c))
        self.signatures[sig] = self.signatures.get(sig, 0) + 1
        if self.record_step is not None and step == self.record_step:
            self.recorded.append((x, t, c))
        if self.cuda_events:
            import torch
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = apply_model(x, t, **c)
            e1.record()
            self.events.append((e0, e1, step))
            return out
        if self.profile_ranges:
            import torch
            with torch.profiler.record_function("qtd_bench::model"):
                return apply_model(x, t, **c)
        return apply_model(x, t, **c)


def clock_for(device):
    """The timer of a device: the calling thread's CPU time on the CPU (the benchmark pins torch to
    one thread, so it is the work done, steady on a shared machine), wall time elsewhere."""
    if getattr(device, "type", str(device)) == "cpu":
        return time.thread_time
    return time.perf_counter


class StepClock:
    """Keyed SAMPLER_SAMPLE wrapper: stamps the end of every sampler step (callback)."""

    def __init__(self, device="cpu", profile_ranges: bool = False):
        self.device = device
        self.timer = clock_for(device)
        self.profile_ranges = profile_ranges
        self.step = 0
        self.stamps: list[float] = []
        self.wall: list[float] = []
        self._range = None

    def __deepcopy__(self, memo):
        return self

    def _open_range(self, i):
        if self.profile_ranges:
            import torch
            self._range = torch.profiler.record_function(f"qtd_bench::step{i}")
            self._range.__enter__()

    def _close_range(self):
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _stamp(self):
        _sync(self.device)
        self.stamps.append(self.timer())
        self.wall.append(time.perf_counter())

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                 disable_pbar):
        self.step = 0
        self.stamps, self.wall = [], []
        self._stamp()
        self._open_range(0)

        def stamping(i, denoised, x, total):
            self._stamp()
            self._close_range()
            self.step = i + 1
            self._open_range(i + 1)
            if callback is not None:
                return callback(i, denoised, x, total)

        try:
            return executor(guider, sigmas, extra_args, stamping, noise, latent_image, denoise_mask,
                            disable_pbar)
        finally:
            self._close_range()

    @property
    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def wall_step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.wall, self.wall[1:])]

    def steady_step_time(self) -> float:
        """Median step time without the first step (kernel selection, caches), if there are more."""
        st = self.step_times
        if not st:
            return float("nan")
        return statistics.median(st[1:] if len(st) > 1 else st)


def instrument(model, device="cpu", profile_ranges: bool = False):
    """A clone of ``model`` carrying a ModelMeter and a StepClock: returns (clone, meter, clock)."""
    import comfy.patcher_extension
    m = model.clone()
    meter = ModelMeter(profile_ranges)
    clock = StepClock(device, profile_ranges)
    meter.clock = clock
    m.set_model_unet_function_wrapper(meter)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, BENCH_KEY, clock)
    return m, meter, clock


class RunSummaryLog(logging.Handler):
    """Collects the engine's once-per-run summary line ``[Quadtree Diffusion] run done: ...``."""

    def __init__(self, echo: bool = False):
        super().__init__(logging.INFO)
        self.echo = echo
        self.summaries: list[dict] = []
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        self.lines.append(msg)
        m = RUN_DONE_RE.search(msg)
        if m:
            keys = ("calls", "tiles", "schedule_saved", "skip_saved", "full")
            self.summaries.append(dict(zip(keys, map(int, m.groups()))))

    @contextlib.contextmanager
    def attached(self, logger_name: str):
        lg = logging.getLogger(logger_name)
        old, old_prop = lg.level, lg.propagate
        lg.addHandler(self)
        lg.setLevel(logging.INFO)
        lg.propagate = self.echo    # keep the tables readable; the lines are kept in self.lines
        try:
            yield self
        finally:
            lg.removeHandler(self)
            lg.setLevel(old)
            lg.propagate = old_prop


def node_class(pack, node_id: str):
    """The pack's node class ``node_id``, found the way ComfyUI's load_custom_node finds it: in the
    pack's NODE_CLASS_MAPPINGS (a V1 pack, e.g. an older copy given to --pack / --compare-pack), else
    in the node list of its V3 ``comfy_entrypoint()``. Run it with ``fx.call_node``."""
    mappings = getattr(pack, "NODE_CLASS_MAPPINGS", None)
    if mappings is not None:
        return mappings[node_id]
    import asyncio

    async def node_list():
        return await (await pack.comfy_entrypoint()).get_node_list()
    for cls in asyncio.run(node_list()):
        if cls.GET_NODE_INFO_V1()["name"] == node_id:
            return cls
    raise KeyError(f"the node pack {pack.__name__} registers no node {node_id!r}")


def tile_model(pack, model, **kw):
    """QuadtreeDiffusion node applied to ``model`` (node defaults overridden by ``kw``)."""
    node = node_class(pack, "QuadtreeDiffusion")
    args = {"method": "Mixture of Diffusers", "enable_overlap": True, "tile_overlap": 64, "tile_batch_size": 4,
            "skip_diffusion_below": 0, "variable_denoise": "off", "tile_width": 1024, "tile_height": 1024,
            "quadtree": None}
    args.update(kw)
    (m,) = load_fixtures().call_node(node, model=model, **args)
    return m


def engine_config(pack, **kw):
    """The TileConfig the QuadtreeDiffusion node builds for the same settings."""
    from importlib import import_module
    tp = import_module(pack.__name__ + ".tile_plan")
    return tp.TileConfig(method=kw.get("method", "Mixture of Diffusers"),
                         enable_overlap=kw.get("enable_overlap", True), tile_overlap=kw.get("tile_overlap", 64),
                         tile_batch_size=kw.get("tile_batch_size", 4), skip_below=kw.get("skip_diffusion_below", 0),
                         variable_denoise=kw.get("variable_denoise", "off"), tile_width=kw.get("tile_width", 1024),
                         tile_height=kw.get("tile_height", 1024), layout=kw.get("quadtree"))


def window_area_ratio(pack, base_model, H: int, W: int, **kw) -> tuple[float, object]:
    """(sum of evaluated tile-window areas / canvas area, plan) from the engine's own Plan."""
    from importlib import import_module

    import torch
    utils = import_module(pack.__name__ + ".utils")
    tp = import_module(pack.__name__ + ".tile_plan")
    plan = tp.plan_for(engine_config(pack, **kw), H, W, utils.latent_compression(base_model),
                       utils.latent_patch_size(base_model), "cpu", torch.float32)
    area = sum((w.y1 - w.y0) * (w.x1 - w.x0) for w in plan.windows if not w.skipped)
    return area / float(H * W), plan


def replay_time(base_model, calls, device="cpu", repeats: int = 3) -> float:
    """Median wall time of replaying ``calls`` [(x, t, c), ...] on the bare ``apply_model``."""
    import torch
    timer = clock_for(device)
    times = []
    with torch.no_grad():
        for x, t, c in calls[:1]:      # warm-up: one call
            base_model.apply_model(x, t, **c)
        for _ in range(max(1, repeats)):
            _sync(device)
            t0 = timer()
            for x, t, c in calls:
                base_model.apply_model(x, t, **c)
            _sync(device)
            times.append(timer() - t0)
    return statistics.median(times)


def fmt_table(headers, rows) -> str:
    """A GitHub-markdown table."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: str, data: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


# ----------------------------------------------------------------------------- engine alone

class IdentityModel:
    """A stand-in ``BaseModel`` whose ``apply_model`` returns its input: timing the engine's
    wrapper around it measures the engine's own work per model call (no model cost at all)."""

    class _Fmt:
        spacial_downscale_ratio = 8

    latent_format = _Fmt()

    def apply_model(self, x, t, **c):
        return x


def engine_only(pack, H: int, W: int, cfg_kw: dict, steps: int = 10, device="cpu", dtype=None,
                chunks: int = 2, context_dim: int = 64, source: bool = True) -> dict:
    """Time the engine's ``__call__`` (a TiledDiffusion wrapper) around :class:`IdentityModel`,
    as KSampler would drive it: a RunState in transformer_options, the step counter advanced
    per call, cond and uncond in one call. Returns s per call, per tile and the call count."""
    from importlib import import_module

    import torch
    td = pack.tiled_diffusion
    utils = import_module(pack.__name__ + ".utils")
    dtype = dtype or torch.float32
    cfg = engine_config(pack, **cfg_kw)
    engine = td.TiledDiffusion(cfg)
    sigmas = torch.linspace(14.6, 0.0, steps + 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((chunks, 4, H, W), generator=gen).to(device, dtype)
    src = torch.randn((1, 4, H, W), generator=gen).to(device, dtype) if source else None
    ctx = torch.randn((chunks, 77, context_dim), generator=gen).to(device, dtype)
    model = IdentityModel()
    timer = clock_for(device)

    def one_run():
        run = td.RunState(sigmas=[float(s) for s in sigmas.tolist()], source=src, canvas=(H, W))
        to = {utils.RUN_KEY: run}
        tiles = 0
        times = []
        for i in range(steps):
            run.step = i
            t = sigmas[i].reshape(1).repeat(chunks).to(device)
            args = {"input": x, "timestep": t, "c": {"c_crossattn": ctx, "transformer_options": to},
                    "cond_or_uncond": list(range(chunks))}
            _sync(device)
            t0 = timer()
            engine(model.apply_model, args)
            _sync(device)
            times.append(timer() - t0)
        tiles = run.stats["tiles"]
        return times, tiles, run.stats["calls"]

    one_run()        # plan + caches (built once per run in real use too)
    times, tiles, calls = one_run()
    total = sum(times[1:]) if len(times) > 1 else sum(times)
    n_calls = max(1, len(times) - 1)
    tiles_timed = tiles * n_calls / max(1, calls)
    return {"s_per_call": total / n_calls, "s_per_tile": total / max(1.0, tiles_timed),
            "tiles_per_call": tiles / max(1, calls), "calls": calls}


# ----------------------------------------------------------------------------- KSampler + replay by shape

def ksampler(model, positive, negative, latent: dict, seed=0, steps=20, cfg=7.0, sampler_name="euler",
             scheduler="normal", denoise=1.0):
    """ComfyUI's ``nodes.common_ksampler`` (the KSampler node's body). Where ComfyUI's ``nodes``
    cannot be imported (a machine without PyAV, which only ComfyUI's video nodes need), the same
    three calls it makes (``fix_empty_latent_channels``, ``prepare_noise``, ``comfy.sample.sample``).
    Returns (samples, path) with path naming which one ran."""
    try:
        import nodes as comfy_nodes
    except Exception as e:  # noqa: BLE001  e.g. PyAV missing; only the import falls back, never a run
        import comfy.sample
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed, None)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent_image, denoise=denoise, callback=None, disable_pbar=True, seed=seed)
        return samples, f"comfy.sample.sample (ComfyUI's nodes not importable: {type(e).__name__}: {e})"
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                         negative, latent, denoise=denoise)
    return out["samples"], "nodes.common_ksampler"


def call_signature(x, t, c) -> tuple:
    """What a model call costs depends on shapes only: (x shape, t shape, ((key, shape), ...))."""
    import torch
    cs = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in c.items() if torch.is_tensor(v)))
    return (tuple(x.shape), str(x.dtype), tuple(t.shape), cs)


def replay_signatures(base_model, counts: dict, device, repeats: int = 3) -> dict:
    """{signature: seconds per call} of the bare ``apply_model`` on random inputs of each call
    signature (median of ``repeats`` after one warm-up call)."""
    import torch
    timer = clock_for(device)
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for sig in counts:
            xs, xdt, ts, cs = sig
            dt = getattr(torch, xdt.replace("torch.", ""))
            x = torch.randn(xs, generator=gen).to(device, dt)
            t = torch.full(ts, 1.0).to(device)
            c = {k: torch.randn(s, generator=gen).to(device, getattr(torch, d.replace("torch.", "")))
                 for k, s, d in cs}
            base_model.apply_model(x, t, **c)
            times = []
            for _ in range(max(1, repeats)):
                _sync(device)
                t0 = timer()
                base_model.apply_model(x, t, **c)
                _sync(device)
                times.append(timer() - t0)
            out[sig] = statistics.median(times)
            del x, t, c
    return out
