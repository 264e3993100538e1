"""Test-only ``QTDTestCancelProbe``: holds a sampling run at a chosen point until ComfyUI's Cancel
arrives, then reports whether the model was called again.

It goes on the model *before* Quadtree Diffusion, through ComfyUI's own extension points:

* a ``model_function_wrapper``: the engine composes with it and calls it once per tile batch, so it
  counts the model's calls. With ``stage`` "sample" it holds the run once call ``at_call`` has
  returned from the model, until ComfyUI's interrupt flag is set (the test POSTs ``/interrupt`` once
  it reads the waiting line in the log): what follows is the engine's own reaction, no model work;
* with ``stage`` "plan", a keyed ``PREPARE_SAMPLING`` wrapper registered before the engine's (so
  it runs first): it holds the run before the engine plans its tiles, until the flag is set.

Either way it then lets the run go on, and logs a line for every model call made after the flag was
seen: a run that honours Cancel makes none. Lines are prefixed ``[QTD probe]``.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)
KEY = "qtd_test_cancel_probe"
WAIT_S = 120.0


def wait_for_cancel(where: str) -> None:
    """Log that the run waits at ``where``, then poll ComfyUI's interrupt flag (without clearing it)."""
    import comfy.model_management as mm
    log.warning("[QTD probe] waiting for Cancel %s", where)
    deadline = time.monotonic() + WAIT_S
    while not mm.processing_interrupted():
        if time.monotonic() > deadline:
            log.warning("[QTD probe] no Cancel within %.0f s", WAIT_S)
            return
        time.sleep(0.001)
    log.warning("[QTD probe] Cancel seen %s (time %.6f)", where, time.time())


class Probe:
    def __init__(self, stage: str, at_call: int):
        self.stage, self.at_call = stage, at_call
        self.calls = 0
        self.released = False

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args, *extra, **kwargs):
        self.calls += 1
        if self.released:
            log.warning("[QTD probe] model call %d after Cancel", self.calls)
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if self.stage == "sample" and self.calls == self.at_call:
            wait_for_cancel(f"after model call {self.calls}")
            self.released = True
        return out

    def sampler_sample(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        except BaseException as e:
            log.warning("[QTD probe] the sampler ended with %s (time %.6f)", type(e).__name__, time.time())
            raise

    def prepare_sampling(self, executor, *args, **kwargs):
        if self.stage == "plan":
            wait_for_cancel("before the tiles are planned")
            self.released = True
        return executor(*args, **kwargs)


class QTDTestCancelProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to probe (put this node before Quadtree Diffusion)."}),
            "stage": (["sample", "plan"], {"default": "sample", "tooltip": "Where to hold the run until Cancel."}),
            "at_call": ("INT", {"default": 3, "min": 1, "max": 1 << 20, "tooltip": "sample: the model call to hold."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: holds a run until Cancel, then logs any model call made after it."

    def probe(self, model, stage, at_call):
        import comfy.patcher_extension
        m = model.clone()
        p = Probe(stage, int(at_call))
        m.set_model_unet_function_wrapper(p)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY, p.prepare_sampling)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, KEY, p.sampler_sample)
        return (m,)


NODE_CLASS_MAPPINGS = {"QTDTestCancelProbe": QTDTestCancelProbe}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestCancelProbe": "QTD Test Cancel Probe"}
