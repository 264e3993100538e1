"""Several devices (issue 24): each step's tile batches spread over ComfyUI's MultiGPU clones.

Two devices on the CPU: the model's own device ``cpu`` and ``cpu:1`` (a distinct torch device key
whose tensors live in the same memory).  The second device's clone is built with ComfyUI's own
MultiGPU building blocks, as ``comfy.multigpu.create_multigpu_deepclones`` builds it: a fresh model
from the loader factory (``ModelPatcher.deepclone_multigpu``, so the fixture model gets a
``cached_patcher_init`` that rebuilds it with the same seed), flagged ``is_multigpu_base_clone``,
registered under the model's ``"multigpu"`` additional models, ``match_multigpu_clones()``, and
relative speeds registered by ``GPUOptionsGroup``.  ``create_multigpu_deepclones`` itself finds no
second device on a CPU-only machine (``get_all_torch_devices`` lists the CPU once), so its device
enumeration is the one step done here by hand.  Sampling then goes through ComfyUI's real
KSampler, which puts the clones and its per-device thread pool into the run's model options.

Skipped where ComfyUI has no MultiGPU clones (``comfy/multigpu.py``, 0.23+; CI's 0.3.75), but for the
pure split.
"""
import importlib.util
import os
import sys
import threading
from collections import Counter

import pytest
import torch


def _tests(file: str):
    """Helpers of another test file (pytest's importlib mode puts no tests/ on sys.path)."""
    name = "qtd_" + file[:-3]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), file))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


cn = _tests("test_controlnet.py")       # the tiny ControlNet, its hint and the crop checks
mp = _tests("test_model_patches.py")    # the Qwen-Image DiffSynth model patch and its crop checks

SECOND = torch.device("cpu", 1)
W_PX, H_PX = 384, 256          # latent 48 x 32


def _has_multigpu():
    try:
        import comfy.multigpu   # noqa: F401
        return True
    except ImportError:
        return False


needs_multigpu = pytest.mark.skipif("not _has_multigpu()",
                                    reason="this ComfyUI has no MultiGPU clones (comfy/multigpu.py, ComfyUI 0.23+)")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def unload_after():
    """Each test's models unloaded after it: a dropped MultiGPU clone can leave ComfyUI a loaded-model
    entry whose patcher is gone (``loaded_models()`` then lists None, which a later model patch's
    re-encode hands to ``load_models_gpu``)."""
    yield
    import comfy.model_management as mm
    mm.unload_all_models()
    mm.cleanup_models()



def on_two_devices(model, factory, speeds=None):
    """``model`` (a clone) with a MultiGPU deep clone on SECOND, built as ComfyUI's MultiGPU CFG Split
    builds it; ``speeds`` {device index: relative speed} as MultiGPU Options would give them."""
    import comfy.multigpu
    m = model.clone()
    m.cached_patcher_init = factory
    clone = m.deepclone_multigpu(new_load_device=SECOND)
    clone.is_multigpu_base_clone = True
    m.set_additional_models("multigpu", m.get_additional_models_with_key("multigpu") + [clone])
    m.match_multigpu_clones()
    opts = comfy.multigpu.GPUOptionsGroup()
    for index, speed in (speeds or {}).items():
        opts.add(comfy.multigpu.GPUOptions(device_index=index, relative_speed=speed))
    opts.register(m)
    return m


class Rows:
    """Forward pre-hooks on each device's diffusion model: rows per call and the threads they ran on.
    ``before(device, n)`` runs in the hook (n: that device's calls so far)."""

    def __init__(self, models: dict, before=None):
        self.rows = {d: [] for d in models}
        self.threads = {d: set() for d in models}
        self.before = before
        self.handles = [m.diffusion_model.register_forward_pre_hook(self._hook(d)) for d, m in models.items()]

    def _hook(self, device):
        def hook(module, args):
            if self.before is not None:
                self.before(device, len(self.rows[device]))
            x = args[0] if args else None
            self.rows[device].append(int(x.shape[0]) if torch.is_tensor(x) else 0)
            self.threads[device].add(threading.current_thread().name)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def on_both(mg, sample):
    """``sample(mg)`` with each device's model calls counted: (result, Rows); both devices must work."""
    rows = Rows(device_models(mg))
    try:
        out = sample(mg)
    finally:
        rows.remove()
    assert all(rows.rows.values()), rows.rows
    return out, rows


def device_models(m) -> dict:
    (clone,) = m.get_additional_models_with_key("multigpu")
    return {"cpu": m.model, "cpu:1": clone.model}


@pytest.fixture(scope="module")
def local(fx):
    return fx.local_model(0)


@pytest.fixture(scope="module")
def photo(fx):
    return fx.synthetic_photo(W_PX, H_PX, seed=1)


@pytest.fixture(scope="module")
def source(fx, photo):
    return fx.FixtureVAE().encode(photo)


def conds(fx):
    return fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")


def tiled(pack, fx, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_batch_size=2, tile_width=128, tile_height=128, tile_overlap=32,
                                           method="Mixture of Diffusers"), **kw})


def layout(pack, fx, photo):
    return fx.visualize(pack, photo, min_tile_size=64, min_denoise=0.2, max_denoise=1.0)[1]


def engine_model(pack, fx, local, photo, kind):
    if kind == "grid":
        return tiled(pack, fx, local)
    if kind == "quadtree":
        return tiled(pack, fx, local, quadtree=layout(pack, fx, photo), variable_denoise="schedule")
    m = tiled(pack, fx, local, method="SpotDiffusion", enable_overlap=False, quadtree=layout(pack, fx, photo),
              variable_denoise="schedule")
    return fx.call_node(pack.nodes.SpotDiffusionParams_QuadtreeDiffusion, model=m, shift_method="fibonacci",
                        seed=2)[0]


def run_done(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "run done" in r.getMessage()]
    assert lines, "no run-done line"
    return lines[-1]


# --------------------------------------------------------------------------- the split (pure)

def test_owners_follow_relative_speeds(pack):
    """Windows go to devices in contiguous runs whose work is in proportion to the speeds."""
    td = pack.tile_devices
    own = td.owners(torch.ones(40), [10.0, 30.0])
    assert own.tolist() == [0] * 10 + [1] * 30
    own = td.owners(torch.tensor([4.0, 1, 1, 1, 1]), [4.0, 4.0])      # a big window is a share of its own
    assert own.tolist() == [0, 1, 1, 1, 1]
    assert td.owners(torch.ones(3), [3.0]).tolist() == [0, 0, 0]


def test_model_patch_on_one_devices_memory_keeps_its_tiles_there(pack):
    """A model patch whose model lives on cuda:0: devices on other memory get no tiles (the CPU's
    device keys share one memory)."""
    td = pack.tile_devices

    class Patch:
        def __init__(self, device):
            self.device = device

        def models(self):
            return [type("Patcher", (), {"load_device": self.device})()]
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    ds = td.DeviceSet({cuda0: None, cuda1: None})
    assert ds.usable({}) == [True, True]
    assert ds.usable({"patches": {"double_block": [Patch(cuda0)]}}) == [True, False]
    assert ds.usable({"patches": {"double_block": [Patch(torch.device("cpu"))]}}) == [True, False]  # none: the first
    assert td.DeviceSet({torch.device("cpu"): None, SECOND: None}).usable(
        {"patches": {"double_block": [Patch(torch.device("cpu"))]}}) == [True, True]
    own = td.owners(torch.ones(6), td.proportional(6, [1.0, 0.0]))
    assert own.tolist() == [0] * 6


# --------------------------------------------------------------------------- same result as one device

@needs_multigpu
@pytest.mark.parametrize("kind", ["grid", "quadtree", "spot"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_two_devices_equal_one_device(pack, fx, local, photo, source, kind, cfg, caplog):
    """Grid, quadtree with per-tile denoise, SpotDiffusion; CFG 1 and 4: the two-device result equals
    the one-device result; each device evaluates its share of the tiles on its own pool thread (rows
    counted on each device's own model), as the run-done line reports; one device uses no thread."""
    pos, neg = conds(fx)
    m = engine_model(pack, fx, local, photo, kind)
    one_rows = Rows({"cpu": m.model})
    try:
        with caplog.at_level("INFO"):
            ref = fx.run_ksampler(m, pos, neg, source, steps=3, cfg=cfg, denoise=0.6)
    finally:
        one_rows.remove()
    assert one_rows.threads["cpu"] == {threading.current_thread().name}     # one device: no thread
    one_line = run_done(caplog)
    assert "per device" not in one_line
    mg = on_two_devices(m, (fx.local_model, (0,)))
    rows = Rows(device_models(mg))
    caplog.clear()
    try:
        with caplog.at_level("INFO"):
            out = fx.run_ksampler(mg, pos, neg, source, steps=3, cfg=cfg, denoise=0.6)
    finally:
        rows.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    n_chunks = 1 if cfg == 1.0 else 2
    tiles = {d: sum(r) // n_chunks for d, r in rows.rows.items()}
    assert sum(one_rows.rows["cpu"]) // n_chunks == sum(tiles.values())
    assert min(tiles.values()) > 0.25 * sum(tiles.values()), tiles        # both devices work, about half each
    assert threading.current_thread().name not in rows.threads["cpu"] | rows.threads["cpu:1"]
    assert not rows.threads["cpu"] & rows.threads["cpu:1"]                # each device on its own worker
    line = run_done(caplog)
    assert line.endswith(f"; tile evaluations per device: cpu {tiles['cpu']}, cpu:1 {tiles['cpu:1']}"), line


@needs_multigpu
def test_multigpu_split_before_quadtree_diffusion(pack, fx, local, source):
    """MultiGPU CFG Split placed before Quadtree Diffusion: the same spread, the same result."""
    pos, neg = conds(fx)
    ref = fx.run_ksampler(tiled(pack, fx, local), pos, neg, source, steps=2, cfg=1.0, denoise=0.6)
    mg = tiled(pack, fx, on_two_devices(local, (fx.local_model, (0,))))
    out, _ = on_both(mg, lambda m: fx.run_ksampler(m, pos, neg, source, steps=2, cfg=1.0, denoise=0.6))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@needs_multigpu
def test_relative_speeds_weight_the_shares(pack, fx, local, photo, source, caplog):
    """MultiGPU Options' relative speed 3 for the second device: it evaluates about 3/4 of the tiles."""
    pos, neg = conds(fx)
    m = tiled(pack, fx, local, tile_width=64, tile_height=64, tile_overlap=0, tile_batch_size=4)
    mg = on_two_devices(m, (fx.local_model, (0,)), speeds={1: 3.0})
    rows = Rows(device_models(mg))
    try:
        fx.run_ksampler(mg, pos, neg, source, steps=2, cfg=1.0, denoise=0.6)
    finally:
        rows.remove()
    tiles = {d: sum(r) for d, r in rows.rows.items()}
    assert tiles == {"cpu": 2 * 6, "cpu:1": 2 * 18}        # 24 equal tiles per step: 6 + 18


def core(name):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def prompted(pack, fx, kind):
    """(model options, positive): tile prompts on a 2 x 2 grid of cells, or a regional prompt (an area,
    a plain mask) combined with the base prompt."""
    base, region = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("a red barn", tokens=154)
    if kind == "tile_prompts":
        (cells,) = fx.call_node(pack.nodes.QuadtreeGridLayout, width=W_PX, height=H_PX, tile_width=W_PX // 2,
                                tile_height=H_PX // 2, denoise=1.0)
        prompts = [fx.tiny_conditioning(f"tile {i}", tokens=77 * (1 + i % 2)) for i in range(4)]
        (pos,) = fx.call_node(pack.nodes.QuadtreeTileConditioning, conditioning=[base], quadtree=[cells],
                              tile_conditioning=prompts)
        return {"quadtree": cells, "tile_width": 64, "tile_height": 64, "tile_overlap": 0}, pos
    if kind == "area":
        (r,) = fx.call_node(core("ConditioningSetArea"), conditioning=region, width=192, height=128, x=96, y=64,
                            strength=1.0)
    else:
        mask = torch.zeros(1, H_PX, W_PX)
        mask[:, 64:192, 96:288] = 1.0
        (r,) = fx.call_node(core("ConditioningSetMask"), conditioning=region, mask=mask, strength=1.0,
                            set_cond_area="default")
    return {}, fx.call_node(core("ConditioningCombine"), conditioning_1=base, conditioning_2=r)[0]


@needs_multigpu
@pytest.mark.parametrize("kind", ["tile_prompts", "area", "mask"])
def test_prompts_on_two_devices_equal_one_device(pack, fx, local, source, kind):
    """Tile prompts and regional prompts (an area call, a mask prompt) give the one-device result,
    both devices working."""
    opts, pos = prompted(pack, fx, kind)
    neg = fx.tiny_conditioning("blurry")
    m = tiled(pack, fx, local, **opts)
    ref = fx.run_ksampler(m, pos, neg, source, steps=2, cfg=4.0, denoise=0.6)
    mg = on_two_devices(m, (fx.local_model, (0,)))
    out, _ = on_both(mg, lambda m: fx.run_ksampler(m, pos, neg, source, steps=2, cfg=4.0, denoise=0.6))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@needs_multigpu
def test_conditionings_with_hooks_keep_comfyuis_split(pack, fx, local, source, caplog):
    """Conditionings carrying hooks (ComfyUI applies those per device clone in its own split): ComfyUI's
    split by conditioning applies (logged), each device runs every tile of its conditioning, the
    one-device result."""
    import comfy.hooks
    hook = comfy.hooks.WeightHook()         # a LoRA hook that patches nothing (no weights)
    hook.weights, hook.need_weight_init = {}, False
    hooks = comfy.hooks.HookGroup()
    hooks.add(hook)
    pos, neg = ([[c, {**o, "hooks": hooks}] for c, o in cond] for cond in conds(fx))
    m = tiled(pack, fx, local)
    ref = fx.run_ksampler(m, pos, neg, source, steps=2, cfg=4.0, denoise=0.6)
    with caplog.at_level("INFO"):
        out, rows = on_both(on_two_devices(m, (fx.local_model, (0,))),
                            lambda mg: fx.run_ksampler(mg, pos, neg, source, steps=2, cfg=4.0, denoise=0.6))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert rows.rows["cpu"] == rows.rows["cpu:1"]          # one conditioning each, every tile
    assert "per device" not in run_done(caplog)
    assert any("split by conditioning applies" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- ControlNet

@needs_multigpu
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_controlnet_each_device_clone_gets_its_tiles_crops(pack, fx, cfg, monkeypatch):
    """With a ControlNet: the same result as one device; each device's control clone (ComfyUI's
    per-device deep clone) computes control for exactly the tiles that device evaluated, each tile
    with its own crop of the hint, and together they see every tile at every step.  Each device's
    canvas hint is prepared once, on the sampler's thread (the workers only crop)."""
    sd15 = fx.tiny_sd15(0)
    control, _ = cn.tiny_controlnet(fx, 11)
    img = cn.gradient(1)
    pos, neg = cn.with_control(cn.conds(fx), control, img)
    m = cn.tiled(pack, fx, sd15, tile_batch_size=2)
    plan = cn.plan_of(pack, m)
    lat = cn.latent()
    ref = fx.run_ksampler(m, pos, neg, lat, steps=cn.STEPS, cfg=cfg)
    mg = on_two_devices(m, (fx.tiny_sd15, (0,)))
    main = pos[0][1]["control"]
    rec_main = main.control_model
    rec_main.calls.clear()
    prepared = []
    real = pack.tile_control.canvas_hint

    def spy(control, H, W, device, cache):
        if (id(control), H, W, str(device)) not in cache:
            prepared.append(threading.current_thread().name)
        return real(control, H, W, device, cache)
    monkeypatch.setattr(pack.tile_control, "canvas_hint", spy)
    rows = Rows(device_models(mg))
    try:
        out = fx.run_ksampler(mg, pos, neg, lat, steps=cn.STEPS, cfg=cfg)
    finally:
        rows.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert prepared == [threading.current_thread().name] * 2, prepared
    dev = main.multigpu_clones[SECOND]               # made by ComfyUI's preprocess_multigpu_conds
    rec_dev = dev.control_model
    n_chunks = 1 if cfg == 1.0 else 2
    seen = {}
    for name, rec in (("cpu", rec_main), ("cpu:1", rec_dev)):
        assert rec.calls, f"{name}: its control was never called"
        seen[name] = cn.seen_windows(rec.calls, img.movedim(-1, 1), plan.windows, n_chunks=n_chunks, batch=1)
        assert sum(seen[name].values()) == sum(rows.rows[name]) // n_chunks     # control rows == its model's
    assert seen["cpu"] + seen["cpu:1"] == Counter({(w.y0, w.y1, w.x0, w.x1): cn.STEPS for w in plan.windows})


# --------------------------------------------------------------------------- model patches

@needs_multigpu
def test_model_patch_gives_each_devices_tiles_their_crops(pack, fx):
    """A model patch (ComfyUI's Qwen-Image DiffSynth ControlNet, in transformer_options' patches) on two
    devices: the one-device result, and on both devices' threads every call's patch holds exactly the
    control image's crops under its rows."""
    import qtd_families as fam
    log = []
    t, model, image = mp.qwen_with_diffsynth(fx, log)
    lat = fx.position_latent(16, mp.LAT, mp.LAT).unsqueeze(2)     # rows tell their window (little noise added)
    m = mp.tiled(pack, fx, model, tile_batch_size=2)
    ref = fx.run_ksampler(m, t.positive, t.negative, lat, steps=2, cfg=3.0, denoise=0.02)
    mg = on_two_devices(m, (lambda: fam.tiny("QwenImage").model, ()))
    log.clear()
    threads = []
    rows = Rows(device_models(mg), lambda device, n: threads.append(threading.current_thread().name))
    try:
        out = fx.run_ksampler(mg, t.positive, t.negative, lat, steps=2, cfg=3.0, denoise=0.02)
    finally:
        rows.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert all(rows.rows.values()) and len(set(threads)) == 2, rows.rows
    canvas = mg.model.process_latent_in(lat)[0, :, 0]
    mp.assert_rows_are_crops(log, image, canvas, 2)


# --------------------------------------------------------------------------- interrupt and errors

def many_batches(pack, fx, local):
    return tiled(pack, fx, local, tile_width=64, tile_height=64, tile_overlap=0, tile_batch_size=1)


@needs_multigpu
def test_interrupt_stops_both_devices(pack, fx, local, source):
    """The interrupt (cleared by whichever worker sees it first) stops both workers at their next tile
    batch: each has 12 batches in the step, neither makes more than 2."""
    import comfy.model_management as mm
    pos, neg = conds(fx)
    mg = on_two_devices(many_batches(pack, fx, local), (fx.local_model, (0,)))
    interrupted = threading.Event()

    def before(device, n):
        if device == "cpu:1" and n == 0:
            mm.interrupt_current_processing(True)
            interrupted.set()
        elif device == "cpu" and n == 0:
            interrupted.wait(10)
    rows = Rows(device_models(mg), before)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fx.run_ksampler(mg, pos, neg, source, steps=2, cfg=1.0, denoise=0.6)
    finally:
        rows.remove()
        mm.interrupt_current_processing(False)
    assert len(rows.rows["cpu"]) <= 2 and len(rows.rows["cpu:1"]) <= 2, rows.rows


@needs_multigpu
def test_error_on_one_device_reaches_the_user_and_stops_the_other(pack, fx, local, source):
    """An error in one worker is raised to the user as that error; the other worker stops at its next
    tile batch and has stopped when the error arrives."""
    import time
    pos, neg = conds(fx)
    mg = on_two_devices(many_batches(pack, fx, local), (fx.local_model, (0,)))
    failed = threading.Event()

    class DeviceBroke(RuntimeError):
        pass

    def before(device, n):
        if device == "cpu:1":
            failed.set()
            raise DeviceBroke("cpu:1 broke")
        if n == 0:
            failed.wait(10)
            time.sleep(0.2)         # the failing worker has flagged the stop by now
    rows = Rows(device_models(mg), before)
    try:
        with pytest.raises(DeviceBroke, match="cpu:1 broke"):
            fx.run_ksampler(mg, pos, neg, source, steps=2, cfg=1.0, denoise=0.6)
        at_error = len(rows.rows["cpu"])
        time.sleep(0.3)
        assert len(rows.rows["cpu"]) == at_error <= 1, rows.rows     # stopped, at most its batch in flight done
    finally:
        rows.remove()
