"""Startup self-check: what this pack needs of ComfyUI, checked by feature when the pack loads.

ComfyUI changes its internals often and users run newer versions than this pack was tested on.
Instead of failing deep inside a run, or silently making a wrong image, the pack checks when it
loads every ComfyUI extension point and internal it relies on (:data:`FEATURES`), by feature and
never by version string: modules, classes, methods and attributes exist; the functions its wrappers
wrap take the parameters the wrappers read, in that order; the node API it is written against is
there.  One log line per feature that differs:

* **missing or changed** (WARNING): what changed, which nodes or options it affects, what still
  works.  The feature is switched off: nodes that need it still register and, when run, fail with a
  clear message (:func:`require`); where the pack has a fallback it is used and logged (per-tile
  ControlNet computed on the canvas, ComfyUI's tiled VAE, ...);
* **changed, handled** (INFO): a wrapped function takes a new parameter (the pack's wrappers pass it
  on), ControlNet caches its prepared hints per size (every tile copy starts with empty caches),
  model patches that crop themselves (``spatial_crop_inputs``, used), patch classes the pack does
  not know (passed on unchanged, named once per run when used).

Then one summary line.  The node API: ``comfy_api.v0_0_2`` is the pinned one; without it (or with
parts missing) the nodes use the newest API this ComfyUI offers for the same V3 schema,
``comfy_api.latest`` (:func:`node_api`, logged).

Nothing here patches or replaces anything of ComfyUI: it imports, reads attributes and signatures,
converts one empty prompt with ``convert_cond`` and builds throw-away ``ControlBase`` objects to see
which of their containers ``cleanup()`` empties.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

from .utils import P

log = logging.getLogger(__name__)

TAG = f"{P} self-check:"
REPORT_HINT = ("update the node pack (and ComfyUI); if that does not help, report the '[Quadtree Diffusion] "
               "self-check' lines of ComfyUI's startup log (README: ComfyUI versions)")

NODE_API_PINNED = "comfy_api.v0_0_2"
NODE_API_NEWEST = "comfy_api.latest"
IO_NAMES = ("ComfyNode", "Schema", "Custom", "NodeOutput", "Image", "Float", "Int", "Boolean", "Combo", "Model",
            "Vae", "Latent", "Conditioning")

ANY = None      # Sig.extra: any further parameter is expected (nothing to report)

# Model-patch classes of comfy_extras/nodes_model_patch.py that tile_patches.py tiles (or, USO, repeats per row).
KNOWN_PATCHES = ("DiffSynthCnetPatch", "ZImageControlPatch", "UsoStyleProjectorPatch", "WanUni3CCnetPatch")

# ControlBase attributes tile_control.py reads or sets on its per-tile copies.
CONTROL_ATTRS = ("cond_hint_original", "cond_hint", "compression_ratio", "upscale_algorithm", "timestep_range",
                 "previous_controlnet", "vae", "latent_format", "extra_concat_orig", "preprocess_image")


@dataclass(frozen=True)
class Sig:
    """``target``'s positional parameters must start with ``expected`` ("*": any name); parameters after
    them that are not in ``extra`` are new (reported as handled: the pack's callables pass them on)."""
    target: str
    expected: tuple
    extra: tuple | None = ()


@dataclass(frozen=True)
class Feature:
    """One thing the pack needs of ComfyUI.  ``needs``: "module:attr.attr" names that must exist;
    ``sigs``: signatures (:class:`Sig`); ``probe(report)`` -> (missing, handled) texts for what
    names and signatures cannot show.  ``after``: features this one builds on (when one of them is
    missing so is this one, without a line of its own).  ``affects`` / ``still``: the log line's
    parts when it is missing; ``handled``: what the pack does when it only changed."""
    key: str
    affects: str
    still: str
    needs: tuple = ()
    sigs: tuple = ()
    probe: Callable | None = None
    after: tuple = ()
    handled: str = "the pack passes new parameters on unchanged"


@dataclass(frozen=True)
class Finding:
    feature: str
    changed: str
    affects: str = ""
    still: str = ""
    missing: bool = True      # True: switched off (WARNING); False: changed and handled (INFO)

    def line(self) -> str:
        if self.missing:
            return f"{TAG} {self.changed}. Affects: {self.affects}. Still works: {self.still}."
        return f"{TAG} {self.changed}: {self.affects}."


@dataclass
class Report:
    findings: list = field(default_factory=list)
    missing: set = field(default_factory=set)          # keys of features that are switched off
    control_caches: frozenset = frozenset()            # ControlBase containers cleanup() empties
    wrapper_types: dict = field(default_factory=dict)  # "SAMPLER_SAMPLE" -> ComfyUI's value, the usable ones
    checked: int = 0

    def finding(self, key: str) -> Finding | None:
        """The finding that switched ``key`` off: its own, or that of the feature it builds on."""
        own = next((f for f in self.findings if f.feature == key and f.missing), None)
        if own is not None:
            return own
        feat = next((f for f in FEATURES if f.key == key), None)
        for dep in feat.after if feat is not None else ():
            hit = self.finding(dep)
            if hit is not None:
                return hit
        return None


# --------------------------------------------------------------------------- looking things up

def _resolve(name: str):
    """The object named "module:attr.attr" (AttributeError / ImportError when it is not there)."""
    mod, _, path = name.partition(":")
    obj = sys.modules.get(mod) or importlib.import_module(mod)
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def _dotted(name: str) -> str:
    return name.replace(":", ".")


def _absent(names) -> list[str]:
    out = []
    for n in names:
        try:
            _resolve(n)
        except (ImportError, AttributeError):
            out.append(_dotted(n))
    return out


def _plural(items, one: str, many: str) -> str:
    return one if len(items) == 1 else many


def _signature_change(sig: Sig) -> tuple[str | None, str | None]:
    """(missing, handled) for a signature: positional parameters that no longer start with the
    expected ones; new parameters after them."""
    params = list(inspect.signature(_resolve(sig.target)).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    head = [p.name for p in params[:len(sig.expected)] if p.kind in kinds]
    name = _dotted(sig.target) + "()"
    if len(head) < len(sig.expected) or any(e not in ("*", h) for e, h in zip(sig.expected, head)):
        have = ", ".join(p.name for p in params)
        want = ", ".join("..." if e == "*" else e for e in sig.expected)
        return f"{name} now takes ({have}) where the pack expects ({want}, ...)", None
    if sig.extra is ANY:
        return None, None
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    new = [p.name for p in params[len(sig.expected):] if p.kind not in var and p.name not in sig.extra]
    if new:
        return None, f"{name} takes new {_plural(new, 'parameter', 'parameters')} {', '.join(new)}"
    return None, None


def loaded_extra(name: str):
    """ComfyUI's ``comfy_extras/<name>.py`` as ComfyUI loaded it (it registers extras under their
    file name), else imported as ``comfy_extras.<name>``; None if this ComfyUI has none."""
    tail = f"comfy_extras/{name}.py"
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None) or ""
        if f.replace("\\", "/").endswith(tail):
            return mod
    try:
        return importlib.import_module(f"comfy_extras.{name}")
    except Exception:
        return None


# --------------------------------------------------------------------------- probes

def _uuid_probe(report):
    """Tile and regional prompts find their cond dicts by the ``uuid`` ComfyUI's convert_cond gives them."""
    import comfy.sampler_helpers
    (c,) = comfy.sampler_helpers.convert_cond([[None, {}]])
    return (None if "uuid" in c else "comfy.sampler_helpers.convert_cond() gives prompts no 'uuid'"), None


def _control_probe(report):
    import comfy.controlnet as cn
    lacking = [a for a in CONTROL_ATTRS if not hasattr(cn.ControlBase(), a)]
    if lacking:
        return f"comfy.controlnet.ControlBase objects have no {', '.join(lacking)}", None
    return None, None


def control_caches() -> frozenset | None:
    """The containers of a ``ControlBase`` that its ``cleanup()`` empties: where this ComfyUI caches
    prepared hints (0.3.x: none, a single ``cond_hint``; newer: per-size ``cond_hints`` /
    ``control_inputs`` dicts).  Found on throw-away objects: each empty dict gets one entry (a
    second ``ControlBase``, so a cleanup that walks the values still works), then ``cleanup()``.
    None if that cannot be run."""
    import comfy.controlnet as cn
    probe = cn.ControlBase()
    filled = {name: v for name, v in vars(probe).items() if isinstance(v, dict) and not v}
    for v in filled.values():
        v[("self-check",)] = cn.ControlBase()
    try:
        probe.cleanup()
    except Exception:
        return None
    return frozenset(name for name, v in filled.items() if not v)


def _control_cache_probe(report):
    caches = control_caches()
    report.control_caches = caches or frozenset()
    if caches:
        names = ", ".join(sorted(caches))
        return None, f"ComfyUI's ControlNet caches prepared hints in per-size containers ({names})"
    return None, None


def _patch_classes():
    nmp = loaded_extra("nodes_model_patch")
    if nmp is None:
        return {}
    return {n: c for n, c in vars(nmp).items()
            if inspect.isclass(c) and c.__module__ == nmp.__name__ and "__call__" in vars(c)
            and callable(getattr(c, "models", None))}


def _uni3c_probe(report):
    cls = _patch_classes().get("WanUni3CCnetPatch")
    if cls is None:
        return None, None
    params = inspect.signature(cls.__init__).parameters
    lacking = [n for n in ("render_video", "vae") if n not in params]
    if not callable(getattr(cls, "encode_render_video", None)):
        lacking.append("encode_render_video()")
    if lacking:
        return f"ComfyUI's WanUni3CCnetPatch has no {', '.join(lacking)}", None
    return None, None


def _patch_crop_probe(report):
    own = sorted(n for n, c in _patch_classes().items() if callable(getattr(c, "spatial_crop_inputs", None)))
    if own:
        return None, (f"ComfyUI's model {_plural(own, 'patch', 'patches')} {', '.join(own)} crop themselves to a "
                      f"tile (spatial_crop_inputs)")
    return None, None


def _unknown_patch_probe(report):
    unknown = sorted(n for n, c in _patch_classes().items()
                     if n not in KNOWN_PATCHES and not callable(getattr(c, "spatial_crop_inputs", None)))
    if unknown:
        return None, f"ComfyUI has model-patch classes the tiler does not know ({', '.join(unknown)})"
    return None, None


def _own_method_probe(which: str):
    def probe(report):
        from comfy.ldm.models import autoencoder as ae
        lacking = [c.__name__ for c in (ae.AutoencodingEngine, ae.AutoencodingEngineLegacy) if which not in vars(c)]
        if lacking:
            verb = _plural(lacking, "defines", "define")
            return f"comfy.ldm.models.autoencoder.{' and '.join(lacking)} no longer {verb} {which}() itself", None
        return None, None
    return probe


# --------------------------------------------------------------------------- what the pack needs

_TILED_NODES = "Quadtree Diffusion and SpotDiffusion Parameters (Quadtree)"
_PROMPTS = "Quadtree Tile Conditioning (fails when run, naming this)"
_CANVAS_CONTROL = ("per-tile ControlNet / T2I-Adapter (ComfyUI computes control on the whole canvas and each tile "
                   "takes its crop: control memory of the canvas)")
_REGIONS = "regional (area) prompts (tiled on a grid of their own, at full strength)"
_VAE_NODES = ("Quadtree VAE Encode / Decode use ComfyUI's tiled VAE instead (logged per run; the result no longer "
              "equals VAE Encode / Decode)")
_MM = "comfy.model_management:"

FEATURES = (
    Feature("unet_wrapper",
            needs=("comfy.model_patcher:ModelPatcher.clone", "comfy.model_patcher:ModelPatcher.set_model_unet_function_wrapper",
                   _MM + "throw_exception_if_processing_interrupted", _MM + "get_free_memory"),
            sigs=(Sig("comfy.model_base:BaseModel.apply_model", ("x", "t"), ANY),),
            affects=f"{_TILED_NODES} (they fail when run, naming this)",
            still="Quadtree Visualizer, Quadtree Grid Layout, Quadtree Tile Crops, the Quadtree VAE nodes"),
    Feature("keyed_wrappers",
            needs=("comfy.model_patcher:ModelPatcher.add_wrapper_with_key",
                   "comfy.model_patcher:ModelPatcher.remove_wrappers_with_key", "comfy.patcher_extension:WrappersMP"),
            affects=(f"Quadtree Diffusion's per-tile denoise and skip (tiles run at full strength, logged), {_PROMPTS}, "
                     f"{_CANVAS_CONTROL}, {_REGIONS}, memory planning for one tile batch"),
            still="tiled sampling with every method"),
    Feature("sampler_sample", after=("keyed_wrappers",),
            needs=("comfy.patcher_extension:WrappersMP.SAMPLER_SAMPLE",),
            sigs=(Sig("comfy.samplers:KSAMPLER.sample", ("*", "sigmas", "extra_args", "callback", "noise",
                                                         "latent_image", "denoise_mask", "disable_pbar")),),
            affects=f"Quadtree Diffusion's per-tile denoise and skip (tiles run at full strength, logged), {_PROMPTS}, "
                    f"{_REGIONS}",
            still="tiled sampling with every method, per-tile ControlNet, model patches",
            handled="Quadtree Diffusion's SAMPLER_SAMPLE wrapper passes new parameters on unchanged"),
    Feature("prepare_sampling", after=("keyed_wrappers",),
            needs=("comfy.patcher_extension:WrappersMP.PREPARE_SAMPLING",),
            sigs=(Sig("comfy.sampler_helpers:prepare_sampling", ("model", "noise_shape", "conds"),
                      ("model_options", "force_full_load", "force_offload")),),
            affects=("Quadtree Diffusion's memory planning (ComfyUI plans memory for the whole canvas, so it may "
                     "offload more) and its refusal, before sampling, of latents it cannot tile"),
            still="tiled sampling with every option",
            handled="Quadtree Diffusion's PREPARE_SAMPLING wrapper passes new parameters on unchanged"),
    Feature("calc_cond_batch", after=("keyed_wrappers",),
            needs=("comfy.patcher_extension:WrappersMP.CALC_COND_BATCH",),
            sigs=(Sig("comfy.samplers:_calc_cond_batch", ("model", "conds", "x_in", "timestep", "model_options")),),
            affects=f"{_CANVAS_CONTROL}, {_PROMPTS}, {_REGIONS}",
            still="tiled sampling with per-tile denoise, skip, SpotDiffusion and model patches",
            handled="Quadtree Diffusion's CALC_COND_BATCH wrappers pass new parameters on unchanged"),
    Feature("tile_prompts",
            needs=("comfy.sampler_helpers:convert_cond", "comfy.samplers:encode_model_conds",
                   "comfy.conds:CONDCrossAttn.concat", "comfy.conds:CONDCrossAttn.process_cond"),
            probe=_uuid_probe,
            affects=f"{_PROMPTS}, {_REGIONS}",
            still="every other node, and prompts without tile prompts"),
    Feature("controlnet",
            needs=("comfy.controlnet:ControlBase", "comfy.controlnet:ControlNet.get_control",
                   "comfy.controlnet:T2IAdapter.scale_image_to", "comfy.controlnet:broadcast_image_to",
                   "comfy.utils:common_upscale", "comfy.utils:repeat_to_batch_size",
                   _MM + "loaded_models", _MM + "load_models_gpu"),
            sigs=(Sig("comfy.controlnet:ControlNet.get_control",
                      ("x_noisy", "t", "cond", "batched_number", "transformer_options")),),
            probe=_control_probe,
            affects=_CANVAS_CONTROL, still="tiled sampling with ControlNet, every other node",
            handled="per-tile control passes new parameters on unchanged"),
    Feature("controlnet_cache", after=("controlnet",), probe=_control_cache_probe,
            affects="", still="",
            handled="each tile's private copy of a control starts with them empty, so every tile prepares its own crop"),
    Feature("uni3c", probe=_uni3c_probe,
            affects="Wan Uni3C camera control under Quadtree Diffusion (passed on unchanged: every tile gets the whole "
                    "render, logged per run)",
            still="every other model patch and node"),
    Feature("patch_crop", probe=_patch_crop_probe, affects="", still="",
            handled="the tiler uses it to give each tile its crop"),
    Feature("patch_classes", probe=_unknown_patch_probe, affects="", still="",
            handled="Quadtree Diffusion passes such patches on unchanged to every tile (a control image in them is "
                    "not cropped per tile; named once per run when used)"),
    Feature("vae_graph",
            needs=("comfy.ldm.models.autoencoder:AutoencodingEngine", "comfy.ldm.models.autoencoder:AutoencodingEngineLegacy",
                   "comfy.ldm.models.autoencoder:EmptyRegularizer",
                   "comfy.ldm.models.autoencoder:DiagonalGaussianRegularizer",
                   "comfy.ldm.modules.diffusionmodules.model:Encoder", "comfy.ldm.modules.diffusionmodules.model:Decoder",
                   "comfy.ldm.modules.diffusionmodules.model:ResnetBlock",
                   "comfy.ldm.modules.diffusionmodules.model:AttnBlock",
                   "comfy.ldm.modules.diffusionmodules.model:Upsample",
                   "comfy.ldm.modules.diffusionmodules.model:Downsample", "comfy.ops:cast_bias_weight",
                   _MM + "load_models_gpu", _MM + "get_free_memory", _MM + "intermediate_device",
                   _MM + "soft_empty_cache", _MM + "cast_to", _MM + "throw_exception_if_processing_interrupted",
                   "comfy.utils:ProgressBar"),
            affects=_VAE_NODES, still="every other node"),
    Feature("vae_decode", after=("vae_graph",), probe=_own_method_probe("decode"),
            affects="Quadtree VAE Decode uses ComfyUI's tiled VAE decode instead (logged per run; the image no "
                    "longer equals VAE Decode's)",
            still="Quadtree VAE Encode (exact), every other node"),
    Feature("vae_encode", after=("vae_graph",), probe=_own_method_probe("encode"),
            affects="Quadtree VAE Encode uses ComfyUI's tiled VAE encode instead (logged per run; the latent no "
                    "longer equals VAE Encode's)",
            still="Quadtree VAE Decode (exact), every other node"),
    Feature("vae_fallback",
            sigs=(Sig("nodes:VAEDecodeTiled.decode", ("vae", "samples", "tile_size", "overlap"),
                      ("temporal_size", "temporal_overlap")),
                  Sig("nodes:VAEEncodeTiled.encode", ("vae", "pixels", "tile_size", "overlap"),
                      ("temporal_size", "temporal_overlap"))),
            affects="Quadtree VAE Encode / Decode on VAEs the exact path does not take (they fail when run, naming this)",
            still="the exact path (SD / SDXL / SD3 / FLUX VAEs), every other node",
            handled="the Quadtree VAE nodes call them with the parameters they know"),
)

_WRAPPER_FEATURES = {"SAMPLER_SAMPLE": "sampler_sample", "PREPARE_SAMPLING": "prepare_sampling",
                     "CALC_COND_BATCH": "calc_cond_batch"}


def _check(feat: Feature, report: Report) -> tuple[str | None, str | None]:
    absent = _absent(feat.needs)
    if absent:
        return f"this ComfyUI has no {', '.join(absent)}", None
    handled = []
    for sig in feat.sigs:
        missing, new = _signature_change(sig)
        if missing:
            return missing, None
        if new:
            handled.append(new)
    if feat.probe is not None:
        missing, new = feat.probe(report)
        if missing:
            return missing, None
        if new:
            handled.append(new)
    return None, "; ".join(handled) or None


def run_checks() -> Report:
    """Every feature of :data:`FEATURES` checked (a check that cannot run counts as missing, with its error)."""
    report = Report()
    for feat in FEATURES:
        report.checked += 1
        if any(dep in report.missing for dep in feat.after):
            report.missing.add(feat.key)
            continue
        try:
            missing, handled = _check(feat, report)
        except Exception as e:      # a check never stops the pack from loading
            missing, handled = f"checking {feat.key} failed ({type(e).__name__}: {e})", None
        if missing:
            report.missing.add(feat.key)
            report.findings.append(Finding(feat.key, missing, feat.affects, feat.still))
        elif handled:
            report.findings.append(Finding(feat.key, handled, feat.handled, missing=False))
    if "keyed_wrappers" not in report.missing:
        import comfy.patcher_extension
        wmp = comfy.patcher_extension.WrappersMP
        report.wrapper_types = {name: getattr(wmp, name) for name, key in _WRAPPER_FEATURES.items()
                                if key not in report.missing}
    if _api_finding is not None:
        report.findings.insert(0, _api_finding)
    return report


# --------------------------------------------------------------------------- node API

_api_finding: Finding | None = None


def node_api():
    """``(ComfyExtension, io)`` of ``comfy_api.v0_0_2``, else (logged) of ``comfy_api.latest``: the newest V3
    node API of this ComfyUI, with the same schema.  Without either, an ImportError that says so."""
    global _api_finding
    problems = []
    for name in (NODE_API_PINNED, NODE_API_NEWEST):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            problems.append(f"{name} cannot be imported ({e})")
            continue
        io = getattr(mod, "io", None)
        lacking = [n for n in ("ComfyExtension", "io") if not hasattr(mod, n)]
        lacking += [f"io.{n}" for n in IO_NAMES if io is not None and not hasattr(io, n)]
        if lacking:
            problems.append(f"{name} has no {', '.join(lacking)}")
            continue
        if problems:
            _api_finding = Finding("node_api", f"{'; '.join(problems)}: the nodes use {name} instead",
                                   "every node of the pack (defined with the same V3 schema there)",
                                   "every node, unless that API differs in what the nodes use")
        return mod.ComfyExtension, mod.io
    msg = (f"{TAG} no V3 node API the pack can use: {'; '.join(problems)}. None of the pack's nodes can register; "
           f"{REPORT_HINT}")
    log.error(msg)
    raise ImportError(msg)


# --------------------------------------------------------------------------- results

_report: Report | None = None


def report() -> Report:
    """The checks' results, computed once (at the pack's load: :func:`log_report`)."""
    global _report
    if _report is None:
        _report = run_checks()
    return _report


def log_report() -> Report:
    """Run the checks and log one line per missing or changed feature, then a summary line."""
    rep = report()
    for f in rep.findings:
        log.log(logging.WARNING if f.missing else logging.INFO, f.line())
    n_missing = sum(1 for f in rep.findings if f.missing)
    counts = [(n_missing, "missing or changed"), (len(rep.findings) - n_missing, "changed and handled")]
    state = ", ".join(f"{n} {what}" for n, what in counts if n) + " (lines above)" if rep.findings else "all as expected"
    log.info("%s %d ComfyUI features checked: %s", TAG, rep.checked + 1, state)
    return rep


def available(key: str) -> bool:
    return key not in report().missing


def missing_reason(key: str) -> str | None:
    """What is missing or changed for feature ``key`` (None if it is usable)."""
    if available(key):
        return None
    f = report().finding(key)
    return f.changed if f is not None else f"{key} is unavailable"


def require(node: str, *keys: str) -> None:
    """Raise a clear error for node ``node`` when this ComfyUI lacks one of the features ``keys``."""
    for key in keys:
        why = missing_reason(key)
        if why is not None:
            raise RuntimeError(f"{node} cannot run on this ComfyUI: {why}. {REPORT_HINT[0].upper()}{REPORT_HINT[1:]}.")


def wrapper_types() -> dict:
    """ComfyUI's keyed wrapper types the pack can use here, by name (SAMPLER_SAMPLE, PREPARE_SAMPLING,
    CALC_COND_BATCH); a missing or changed one is absent (logged at load)."""
    return report().wrapper_types


def hint_caches() -> frozenset:
    """The ControlBase containers where this ComfyUI caches prepared hints (see :func:`control_caches`)."""
    return report().control_caches
