"""Importing or using the pack must not monkey-patch ComfyUI.

Another test may already have imported the pack in this session, so the before/after comparison
runs in a fresh interpreter (the probe script below), which prints a JSON report.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import qtd_fixtures as fx

PROBE = textwrap.dedent(r'''
    import importlib.util, json, sys, types
    spec = importlib.util.spec_from_file_location("qtd_fixtures", sys.argv[1])
    fx = importlib.util.module_from_spec(spec); sys.modules["qtd_fixtures"] = fx; spec.loader.exec_module(fx)
    fx.setup_comfy()

    import torch
    import comfy.model_base, comfy.model_patcher, comfy.patcher_extension, comfy.sample
    import comfy.sampler_helpers, comfy.samplers
    import nodes as comfy_nodes

    report = {"errors": [], "notes": []}

    # -- the five objects named by the brief, compared by identity ------------------------
    def named():
        return {
            "comfy.samplers.KSampler.sample": comfy.samplers.KSampler.sample,
            "comfy.samplers.KSAMPLER.sample": comfy.samplers.KSAMPLER.sample,
            "comfy.samplers.calc_cond_batch": comfy.samplers.calc_cond_batch,
            "comfy.samplers.get_area_and_mult": comfy.samplers.get_area_and_mult,
            "comfy.model_base.BaseModel.apply_model": comfy.model_base.BaseModel.apply_model,
        }

    # -- a wider net: every public attribute of the sampling modules and key classes -------
    MODULES = [comfy.samplers, comfy.sample, comfy.sampler_helpers, comfy.model_patcher,
               comfy.model_base, comfy.patcher_extension]
    CLASSES = [comfy.samplers.KSampler, comfy.samplers.KSAMPLER, comfy.samplers.CFGGuider,
               comfy.model_base.BaseModel, comfy.model_patcher.ModelPatcher]

    def wide():
        snap = {}
        for m in MODULES:
            for k, v in vars(m).items():
                if not k.startswith("__"):
                    snap[f"{m.__name__}.{k}"] = v
        for c in CLASSES:
            for k, v in vars(c).items():
                if not k.startswith("__"):
                    snap[f"{c.__module__}.{c.__qualname__}.{k}"] = v
        snap["nodes.common_ksampler"] = comfy_nodes.common_ksampler
        snap["torch.nn.functional.conv2d"] = torch.nn.functional.conv2d
        return snap

    def diff(before, after):
        changed = sorted(k for k in set(before) | set(after)
                         if k not in before or k not in after or before[k] is not after[k])
        return changed

    def freeze(o, depth=0):
        """Structure of model_options & co: containers by value, everything else by identity."""
        if depth > 12:
            return "..."
        if isinstance(o, dict):
            return {repr(k): freeze(v, depth + 1) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [type(o).__name__] + [freeze(v, depth + 1) for v in o]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        return f"<{type(o).__name__} @{id(o):x}>"

    def patcher_state(m):
        return freeze({"model_options": m.model_options, "wrappers": m.wrappers, "callbacks": m.callbacks,
                       "object_patches": m.object_patches, "patches": m.patches,
                       "attachments": m.attachments, "injections": getattr(m, "injections", {})})

    named_before, wide_before = named(), wide()
    node_names_before = set(comfy_nodes.NODE_CLASS_MAPPINGS)

    pack = fx.load_pack(sys.argv[2] if len(sys.argv) > 2 else None)
    report["pack_file"] = pack.__file__

    def check(stage):
        for k in diff(named_before, named()):
            report["errors"].append(f"{stage}: {k} was replaced")
        for k in diff(wide_before, wide()):
            if k not in named_before:
                report["errors"].append(f"{stage}: {k} changed")
        if set(comfy_nodes.NODE_CLASS_MAPPINGS) != node_names_before:
            report["errors"].append(f"{stage}: ComfyUI's nodes.NODE_CLASS_MAPPINGS changed")

    check("after import")
    if "--import-only" in sys.argv:
        print("QTD_PROBE_REPORT=" + json.dumps(report))
        sys.exit(0)

    # the nodes as ComfyUI's load_custom_node registers them: NODE_CLASS_MAPPINGS when the pack
    # has one, else the V3 comfy_entrypoint() -> ComfyExtension.get_node_list()
    mappings = getattr(pack, "NODE_CLASS_MAPPINGS", None)
    if mappings is None and hasattr(pack, "comfy_entrypoint"):
        import asyncio
        async def _node_list():
            return await (await pack.comfy_entrypoint()).get_node_list()
        mappings = {cls.GET_NODE_INFO_V1()["name"]: cls for cls in asyncio.run(_node_list())}
    mappings = mappings or {}
    report["nodes"] = sorted(mappings)
    check("after registration")

    model = fx.local_model(0)
    state0 = patcher_state(model)
    pos, neg = fx.tiny_conditioning("probe"), fx.tiny_conditioning("")
    lat = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    ref = fx.run_ksampler(model, pos, neg, lat, seed=1, steps=3, denoise=0.6)

    clones = []
    for name in ("QuadtreeDiffusion", "SpotDiffusionParams_QuadtreeDiffusion"):
        if name not in mappings:
            report["errors"].append(f"node {name} not registered by the pack")
            continue
        cls = mappings[name]
        args = fx.node_input_defaults(cls)
        args["model"] = model
        if name == "QuadtreeDiffusion":
            args.update(tile_width=128, tile_height=128, tile_overlap=32, tile_batch_size=2)
        out = fx.call_node(cls, **args)[0]
        if out is model:
            report["errors"].append(f"{name} returned its input model instead of a clone")
        if patcher_state(model) != state0:
            report["errors"].append(f"{name} changed the input model's model_options/wrappers/patches")
        clones.append((name, out))
        check(f"after {name}")

    for name, clone in clones:
        before = patcher_state(clone)
        s = fx.run_ksampler(clone, pos, neg, lat, seed=1, steps=3, denoise=0.6)
        if not torch.isfinite(s).all():
            report["errors"].append(f"sampling with the {name} clone gave non-finite values")
        check(f"after sampling with the {name} clone")
        if patcher_state(model) != state0:
            report["errors"].append(f"sampling with the {name} clone changed the input model's options")

    again = fx.run_ksampler(model, pos, neg, lat, seed=1, steps=3, denoise=0.6)
    if not torch.equal(again, ref):
        report["errors"].append("the untouched input model samples differently after the pack was used")
    print("QTD_PROBE_REPORT=" + json.dumps(report))
''')


def run_probe(tmp_path, *extra, timeout=240):
    script = tmp_path / "no_patching_probe.py"
    script.write_text(PROBE)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("COMFYUI_PATH", fx.default_comfy_path())
    proc = subprocess.run([sys.executable, str(script), os.path.join(fx.TESTS_DIR, "fixtures.py"), *extra],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("QTD_PROBE_REPORT=")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"probe exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
                    f"--- stderr ---\n{proc.stderr[-8000:]}", pytrace=False)
    return json.loads(lines[-1].split("=", 1)[1])


def test_pack_patches_nothing_in_comfyui(tmp_path):
    if not os.path.isfile(os.path.join(fx.REPO_ROOT, "__init__.py")):
        pytest.fail("node pack has no __init__.py yet", pytrace=False)
    report = run_probe(tmp_path)
    assert report["errors"] == [], "\n".join(report["errors"])
    assert {"QuadtreeDiffusion", "QuadtreeVisualizer", "SpotDiffusionParams_QuadtreeDiffusion"} <= set(report["nodes"])


@pytest.mark.slow  # checks the checker (another ~10 s interpreter start); runs in `make test`
def test_probe_catches_a_patching_pack(tmp_path):
    """Negative control: a pack that monkey-patches ComfyUI on import is reported."""
    fake = tmp_path / "evil-pack"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import comfy.samplers, comfy.model_patcher\n"
        "_orig = comfy.samplers.calc_cond_batch\n"
        "comfy.samplers.calc_cond_batch = lambda *a, **k: _orig(*a, **k)\n"
        "comfy.model_patcher.ModelPatcher.clone = comfy.model_patcher.ModelPatcher.clone\n"
        "comfy.model_patcher.ModelPatcher.patch_model = lambda self, *a, **k: None\n"
        "NODE_CLASS_MAPPINGS = {}\n")
    report = run_probe(tmp_path, str(fake), "--import-only")
    errors = "\n".join(report["errors"])
    assert "comfy.samplers.calc_cond_batch was replaced" in errors
    assert "ModelPatcher.patch_model changed" in errors
