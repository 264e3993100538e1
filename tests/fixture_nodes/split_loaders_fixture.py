"""Stand-ins for ComfyUI's split model loaders, as the model templates ComfyUI ships load a model.

The edit-model example workflow (Flux.2 Klein) loads its diffusion model, text encoder and VAE from
three files (``UNETLoader``, ``CLIPLoader``, ``VAELoader``), none of which can be downloaded here:

* ``QTDTestUNETLoader`` (family) -> MODEL: the tiny model of a family from ``tests/families.py``
  (ComfyUI's own classes, seeded weights), with a probe: a ``DIFFUSION_MODEL`` wrapper (ComfyUI's
  extension point) that logs, for every diffusion-model call, the rows and latent size it is given
  and the size of each reference latent (``ref_latents``) with how many distinct rows it holds::

      [QTD fixture probe] Flux2 call: 4 rows of 4x4 latent px; references 4x4 (4 distinct rows)

  so a server test can see what each tile batch was given.
* ``QTDTestCLIPLoader`` () -> CLIP: the fixture CLIP (``fx.FixtureCLIP``, 64-dim context).

The VAE stand-in is ``QTDTestVAELoader`` (``__init__.py``) with ``latent`` = ``flux2``.
"""
from __future__ import annotations

import inspect
import logging
import sys

import torch

log = logging.getLogger(__name__)

PROBE_KEY = "qtd_fixture_probe"


def _fx():
    return sys.modules["qtd_fixtures"]


def _families():
    from . import load_test_module
    return load_test_module("qtd_families", "families.py")


def describe_call(family: str, x: torch.Tensor, refs) -> str:
    """The probe's line for one diffusion-model call (see the module docstring)."""
    parts = []
    for r in refs or []:
        distinct = int(torch.unique(r.flatten(1).float(), dim=0).shape[0])
        parts.append(f"{r.shape[-1]}x{r.shape[-2]} ({distinct} distinct rows)")
    return (f"[QTD fixture probe] {family} call: {x.shape[0]} rows of {x.shape[-1]}x{x.shape[-2]} latent px; "
            f"references {', '.join(parts) if parts else 'none'}")


def add_probe(model, family: str):
    """Log every diffusion-model call of ``model`` (a ModelPatcher) through a keyed DIFFUSION_MODEL wrapper;
    the call's arguments are read by name from the diffusion model's own signature."""
    import comfy.patcher_extension as pe

    signature = inspect.signature(model.model.diffusion_model.forward)

    def probe(executor, *args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        log.info("%s", describe_call(family, bound["x"], bound.get("ref_latents")))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, PROBE_KEY, probe)
    return model


class QTDTestUNETLoader:
    """A tiny model of a ComfyUI family (stands in for UNETLoader), with the call probe."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {"default": "Flux2", "tooltip": "A family of tests/families.py "
                                                                                 "(its comfy.supported_models class)."})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: the tiny model of a model family, logging what each diffusion-model call is given."

    def load(self, family):
        return (add_probe(_families().tiny(family).model, family),)


class QTDTestCLIPLoader:
    """The fixture CLIP (stands in for CLIPLoader)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: a hashing CLIP with 64-dim context."

    def load(self):
        return (_fx().FixtureCLIP(),)


NODE_CLASS_MAPPINGS = {"QTDTestUNETLoader": QTDTestUNETLoader, "QTDTestCLIPLoader": QTDTestCLIPLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestUNETLoader": "QTD Test UNET Loader", "QTDTestCLIPLoader": "QTD Test CLIP Loader"}
