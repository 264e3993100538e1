"""ComfyUI drift, simulated (issue 22): run by tests/test_drift.py in a subprocess of its own.

    python drift_probe.py SCENARIO [SCENARIO ...]

The parent process sets up the real ComfyUI on the CPU (tests/fixtures.py) and imports what the
scenarios use.  Each scenario then runs in a forked child: the child changes the running ComfyUI the
way a later version could (a wrapper type missing, a wrapped function called with a new keyword,
``comfy_api.v0_0_2`` missing, the VAE's ``decode`` moved to a base class, a model-patch class the
tiler does not know, ControlNet hints cached in per-size dicts as in upstream PR #15832), *then*
loads the pack and runs it.  Changing ComfyUI here is the test harness imitating that version; the
pack itself never patches ComfyUI (tests/test_no_patching.py).

Prints one line per scenario: ``DRIFT <json>`` with ``scenario``, ``lines`` ([level, logger,
message] of every log record of the pack and every WARNING of ComfyUI), ``result`` (what the
scenario measured) and ``error`` (a traceback, or null).
"""
import asyncio
import importlib.util
import json
import logging
import os
import signal
import sys
import traceback

TESTS = os.path.dirname(os.path.realpath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fx = _load("qtd_fixtures", os.path.join(TESTS, "fixtures.py"))
fx.setup_comfy()

import torch  # noqa: E402

torch.set_num_threads(1)        # tiny tensors; and no thread pool is started before the forks
import comfy.controlnet  # noqa: E402,F401
import comfy.ldm.models.autoencoder  # noqa: E402,F401
import comfy.patcher_extension  # noqa: E402,F401
import comfy.sampler_helpers  # noqa: E402,F401
import comfy.samplers  # noqa: E402,F401
import comfy.sd  # noqa: E402,F401
import comfy_api.latest  # noqa: E402,F401
import comfy_extras.nodes_model_patch  # noqa: E402,F401
import nodes as comfy_nodes  # noqa: E402

up = _load("qtd_upstream", os.path.join(TESTS, "upstream.py"))
cn_tests = _load("qtd_test_controlnet", os.path.join(TESTS, "test_controlnet.py"))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if record.name.startswith(fx.PACK_MODULE_NAME) or record.levelno >= logging.WARNING:
            self.lines.append([record.levelname, record.name, record.getMessage()])


# --------------------------------------------------------------------------- helpers

def node_list(pack):
    ext = asyncio.run(pack.comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def tiled(pack, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(method="MultiDiffusion", enable_overlap=False, tile_width=32, tile_height=32, tile_batch_size=4),
        **kw})


def controlled_run(pack, make=lambda c: c):
    """Tiny SD1.5 with a tiny recording ControlNet (tests/test_controlnet.py) on a 96 x 64 px canvas, tiled in
    4 x 4 latent px tiles: (output, control calls [(x shape, hint)], hint image, plan windows, tile shapes)."""
    control, rec = cn_tests.tiny_controlnet(fx, 11)
    img = cn_tests.gradient(1)
    pos, neg = cn_tests.with_control(cn_tests.conds(fx), control, img, make=make)
    m, calls = fx.logged(fx.tiny_sd15(0))
    m = tiled(pack, m)
    out = fx.run_ksampler(m, pos, neg, cn_tests.latent(), steps=cn_tests.STEPS, cfg=5.0)
    plan = cn_tests.plan_of(pack, m)
    return out, rec.calls, img, plan.windows, sorted({s[-2:] for s in calls.shapes})


def require_error(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------- scenarios

def clean():
    pack = fx.load_pack()
    return {"nodes": sorted(c.define_schema().node_id for c in node_list(pack))}


def no_v0_0_2():
    sys.modules["comfy_api.v0_0_2"] = None          # a ComfyUI without it: importing it fails
    pack = fx.load_pack()
    classes = node_list(pack)
    layout = fx.call_node(pack.nodes.QuadtreeGridLayout, width=256, height=256, tile_width=128, tile_height=128,
                          denoise=1.0)[0]
    m = tiled(pack, fx.tiny_sd15(0))
    out = fx.run_ksampler(m, *cn_tests.conds(fx), cn_tests.latent(), steps=2)
    return {"nodes": sorted(c.define_schema().node_id for c in classes),
            "latest": all(issubclass(c, comfy_api.latest.io.ComfyNode) for c in classes),
            "grid_tiles": len(layout.tiles), "finite": bool(torch.isfinite(out).all())}


def no_calc_cond_batch():
    pe, samplers = comfy.patcher_extension, comfy.samplers
    del pe.WrappersMP.CALC_COND_BATCH                 # a ComfyUI without that wrapper type ...
    samplers._calc_cond_batch_outer = lambda model, conds, x_in, timestep, model_options: \
        samplers._calc_cond_batch(model, conds, x_in, timestep, model_options)    # ... never asks for it
    pack = fx.load_pack()
    out, control_calls, _, windows, tile_shapes = controlled_run(pack)
    err = require_error(lambda: fx.call_node(pack.nodes.QuadtreeTileConditioning, conditioning=[cn_tests.conds(fx)[0]],
                                             quadtree=[pack.quadtree.grid_layout(96, 64, 32, 32, 1.0)],
                                             tile_conditioning=[cn_tests.conds(fx)[0]] * 6))
    return {"nodes": len(node_list(pack)), "finite": bool(torch.isfinite(out).all()),
            "control_shapes": sorted({tuple(s[-2:]) for s, _ in control_calls}), "tile_shapes": tile_shapes,
            "windows": len(windows), "tile_prompt_error": err}


def new_keyword():
    pe, samplers = comfy.patcher_extension, comfy.samplers
    inner, received = samplers._calc_cond_batch, []

    def _calc_cond_batch(model, conds, x_in, timestep, model_options, new_option=None):
        received.append(new_option)
        return inner(model, conds, x_in, timestep, model_options)

    def _calc_cond_batch_outer(model, conds, x_in, timestep, model_options):
        executor = pe.WrapperExecutor.new_executor(_calc_cond_batch, pe.get_all_wrappers(
            pe.WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True))
        return executor.execute(model, conds, x_in, timestep, model_options, new_option="from ComfyUI")

    samplers._calc_cond_batch = _calc_cond_batch
    samplers._calc_cond_batch_outer = _calc_cond_batch_outer
    pack = fx.load_pack()
    out, control_calls, img, windows, tile_shapes = controlled_run(pack)
    seen = cn_tests.seen_windows(control_calls, img.movedim(-1, 1), windows, n_chunks=2, batch=1)
    return {"finite": bool(torch.isfinite(out).all()), "received": sorted(set(map(str, received))),
            "calls": len(received), "tiles_seen": len(seen), "windows": len(windows), "tile_shapes": tile_shapes}


def sampler_signature_changed():
    samplers = comfy.samplers
    sample = samplers.KSAMPLER.sample

    def renamed(self, model_wrap, sigma_schedule, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                disable_pbar=False):          # a parameter the SAMPLER_SAMPLE wrapper reads, renamed
        return sample(self, model_wrap, sigma_schedule, extra_args, callback, noise, latent_image, denoise_mask,
                      disable_pbar)

    samplers.KSAMPLER.sample = renamed
    pack = fx.load_pack()
    layout = pack.quadtree.grid_layout(96, 64, 32, 32, 0.5)      # every tile at denoise 0.5
    m, calls = fx.logged(fx.tiny_sd15(0))
    m = tiled(pack, m, quadtree=layout, variable_denoise="schedule")
    out = fx.run_ksampler(m, *cn_tests.conds(fx), cn_tests.latent(), steps=4, denoise=1.0)
    return {"finite": bool(torch.isfinite(out).all()), "tile_calls": len(calls.shapes),
            "tile_shapes": sorted({s[-2:] for s in calls.shapes})}


def vae_decode_moved():
    ae = comfy.ldm.models.autoencoder
    legacy = ae.AutoencodingEngineLegacy
    base = type("DecodeMixin", (), {"decode": vars(legacy)["decode"]})
    legacy.__bases__ = (base, ae.AutoencodingEngine)      # decode now lives on a base class
    del legacy.decode
    pack = fx.load_pack()
    vae = fx.tiny_vae(0)
    px = fx.synthetic_photo(64, 64)
    lat = vae.encode(px)
    ours = fx.call_node(pack.nodes.VAEDecodeTiled_QuadtreeDiffusion, samples={"samples": lat}, vae=vae,
                        tile_size=128, fast=False)[0]
    comfy_tiled = comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": lat}, 128, 32)[0]
    enc = fx.call_node(pack.nodes.VAEEncodeTiled_QuadtreeDiffusion, pixels=px, vae=vae, tile_size=128, fast=False,
                       color_fix=True)[0]["samples"]
    return {"decode_equals_comfy_tiled": bool(torch.equal(ours, comfy_tiled)),
            "encode_max_diff": float((enc - vae.encode(px)).abs().max())}


def unknown_patch():
    nmp = comfy_extras.nodes_model_patch

    class FutureCnetPatch:                           # a model-patch class a later ComfyUI could add
        def __init__(self, image):
            self.image = image

        def __call__(self, kwargs):
            return kwargs

        def models(self):
            return []

        def to(self, device_or_dtype):
            return self

    FutureCnetPatch.__module__ = nmp.__name__
    nmp.FutureCnetPatch = FutureCnetPatch
    pack = fx.load_pack()
    model = fx.local_model(0)
    image = cn_tests.gradient(1)
    model.set_model_double_block_patch(FutureCnetPatch(image))
    net = model.model.diffusion_model
    net.record = True
    m = tiled(pack, model)
    for _ in range(2):
        fx.run_ksampler(m, *cn_tests.conds(fx), cn_tests.latent(), steps=2)
    held = [c["transformer_options"]["patches"]["double_block"][0] for c in net.calls]
    return {"runs": 2, "calls": len(held), "tile_shapes": sorted({tuple(c["x"].shape[-2:]) for c in net.calls}),
            "unchanged": all(type(p).__name__ == "FutureCnetPatch" and torch.equal(p.image, image) for p in held)}


def hint_cache_dict():
    up.install_size_keyed(comfy.controlnet)          # ControlNet caches prepared hints per size (PR #15832)
    pack = fx.load_pack()

    def prefilled(control):     # wrong hints cached for the canvas and the tile size: a shared cache would hand them on
        for h, w in ((8, 12), (4, 4)):
            control.cond_hints[(h, w)] = torch.full((1, 3, h * 8, w * 8), -7.0)
        return control

    out, control_calls, img, windows, _ = controlled_run(pack, make=prefilled)
    seen = cn_tests.seen_windows(control_calls, img.movedim(-1, 1), windows, n_chunks=2, batch=1)
    return {"finite": bool(torch.isfinite(out).all()), "caches": sorted(pack.self_check.hint_caches()),
            "seen": sorted(f"{w}:{n}" for w, n in seen.items()),
            "expected": sorted(f"{(w.y0, w.y1, w.x0, w.x1)}:{cn_tests.STEPS}" for w in windows)}


SCENARIOS = {f.__name__: f for f in (clean, no_v0_0_2, no_calc_cond_batch, new_keyword, sampler_signature_changed,
                                     vae_decode_moved, unknown_patch, hint_cache_dict)}


def run_child(name) -> dict:
    records = Records()
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.INFO)
    report = {"scenario": name, "result": None, "error": None}
    try:
        report["result"] = SCENARIOS[name]()
    except BaseException:
        report["error"] = traceback.format_exc()
    report["lines"] = records.lines
    return report


def main(names):
    for name in names:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child: one simulated ComfyUI
            os.close(r)
            signal.alarm(240)
            with os.fdopen(w, "w") as out:
                out.write(json.dumps(run_child(name)))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as inp:
            data = inp.read()
        _, status = os.waitpid(pid, 0)
        report = json.loads(data) if data else {"scenario": name, "result": None, "lines": [],
                                                "error": f"the child ended without a report (status {status})"}
        print("DRIFT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SCENARIOS))
