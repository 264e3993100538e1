"""Test-only ComfyUI custom nodes that hand out the tiny fixture models of tests/fixtures.py.

Installed into a test server's ``custom_nodes`` folder (as a symlink) by tests/server.py:

* ``QTDTestCheckpointLoader`` (kind, seed) -> (MODEL, CLIP, VAE): drop-in for CheckpointLoaderSimple.
* ``QTDTestConditioning`` (text) -> CONDITIONING.
* ``QTDTestCaptioner`` (image, prompt, constant) -> STRING, and a stand-in ``TextGenerate`` where
  ComfyUI lacks it (``captioner_fixture.py``): the captioner of the per-tile prompt example.
* ``QTDTestCancelProbe`` (model, stage, at_call) -> MODEL: holds a run until Cancel and logs any
  model call made after it (``cancel_probe.py``).
* ``QTDTestVideoVAELoader``: the video example's video VAE (``video_fixture.py``); its text encoder
  is ``QTDTestCLIPLoader`` and its diffusion model ``QTDTestCheckpointLoader`` kind ``tiny_wan``.
* ``QTDTestVAELoader`` (seed, latent) -> VAE: a tiny real ``comfy.sd.VAE`` (ComfyUI's AutoencoderKL with
  seeded weights, ``fx.tiny_vae``; SD's latent, or Flux.2's with ``latent`` = ``flux2``), which the
  Quadtree VAE nodes run exactly; the checkpoint loader's VAE (a duck-typed linear stand-in) makes
  them fall back to ComfyUI's tiled VAE.
* ``QTDTestUNETLoader`` / ``QTDTestCLIPLoader``: stand-ins for ComfyUI's split loaders
  (``split_loaders_fixture.py``; the Flux.2 Klein example workflow).

``tests/fixtures.py`` is found through ``$QTD_FIXTURES_PY`` or next to this package's real
(symlink-resolved) folder, and loaded by file path as module ``qtd_fixtures``.
"""
import importlib.util
import os
import sys


def load_test_module(name: str, filename: str, env: str | None = None):
    """``tests/<filename>`` loaded by file path as module ``name`` (once), found through ``$<env>`` or next
    to this package's real (symlink-resolved) folder."""
    if name in sys.modules:
        return sys.modules[name]
    candidates = [
        os.environ.get(env) if env else None,
        os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), filename),
    ]
    for path in candidates:
        if path and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
    raise ImportError(f"tests/{filename} not found (tried {candidates})" + (f"; set {env}" if env else ""))


fx = load_test_module("qtd_fixtures", "fixtures.py", "QTD_FIXTURES_PY")


class QTDTestCheckpointLoader:
    """Tiny deterministic MODEL/CLIP/VAE for tests (stands in for CheckpointLoaderSimple)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (list(fx.MODEL_KINDS), {"default": "local", "tooltip": "Which fixture model to build."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Weight seed."}),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: a tiny seeded model, a hashing CLIP and a linear 8x VAE."

    def load(self, kind, seed):
        return (fx.make_model(kind, seed), fx.FixtureCLIP(), fx.FixtureVAE())


class QTDTestConditioning:
    """CONDITIONING deterministically derived from a text (no CLIP needed)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True, "tooltip": "Hashed into the conditioning."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing/quadtree_diffusion"

    def encode(self, text):
        return (fx.tiny_conditioning(text),)


# The latents QTDTestVAELoader's VAE makes: name -> fx.tiny_vae arguments.
VAE_LATENTS = {"sd": {},                                                 # 4 channels, 8x
               "flux2": {"z_channels": 32, "batch_norm_latent": True}}   # Flux.2's: 128 channels (2x2-packed), 16x


class QTDTestVAELoader:
    """A tiny real ComfyUI VAE (stands in for VAELoader / a checkpoint's VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Weight seed."})},
                "optional": {"latent": (list(VAE_LATENTS), {"default": "sd", "tooltip": "The latent it makes: SD's "
                                                            "(4 channels, 8x) or Flux.2's (128 channels, 16x)."})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: ComfyUI's AutoencoderKL, 32/64 channels, seeded weights."

    def load(self, seed, latent="sd"):
        return (fx.tiny_vae(seed=seed, **VAE_LATENTS[latent]),)


NODE_CLASS_MAPPINGS = {
    "QTDTestCheckpointLoader": QTDTestCheckpointLoader,
    "QTDTestConditioning": QTDTestConditioning,
    "QTDTestVAELoader": QTDTestVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QTDTestCheckpointLoader": "QTD Test Checkpoint Loader",
    "QTDTestConditioning": "QTD Test Conditioning",
    "QTDTestVAELoader": "QTD Test VAE Loader",
}

# Extra fixture nodes kept in their own files (ControlNet for the Tile-ControlNet example
# workflow's test; a model that really denoises, for the demo; the captioner of the per-tile
# prompt example).
from .controlnet_fixture import NODE_CLASS_MAPPINGS as _CN_NODES, NODE_DISPLAY_NAME_MAPPINGS as _CN_NAMES  # noqa: E402
from .denoiser_fixture import NODE_CLASS_MAPPINGS as _DN_NODES, NODE_DISPLAY_NAME_MAPPINGS as _DN_NAMES  # noqa: E402
from .captioner_fixture import NODE_CLASS_MAPPINGS as _CAP_NODES, NODE_DISPLAY_NAME_MAPPINGS as _CAP_NAMES  # noqa: E402
from .cancel_probe import NODE_CLASS_MAPPINGS as _CP_NODES, NODE_DISPLAY_NAME_MAPPINGS as _CP_NAMES  # noqa: E402
from .video_fixture import NODE_CLASS_MAPPINGS as _VID_NODES, NODE_DISPLAY_NAME_MAPPINGS as _VID_NAMES  # noqa: E402
from .split_loaders_fixture import NODE_CLASS_MAPPINGS as _SPLIT_NODES, NODE_DISPLAY_NAME_MAPPINGS as _SPLIT_NAMES  # noqa: E402,E501

NODE_CLASS_MAPPINGS.update(_CN_NODES)
NODE_CLASS_MAPPINGS.update(_DN_NODES)
NODE_CLASS_MAPPINGS.update(_CAP_NODES)
NODE_CLASS_MAPPINGS.update(_CP_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_CP_NAMES)
NODE_CLASS_MAPPINGS.update(_VID_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_VID_NAMES)
NODE_DISPLAY_NAME_MAPPINGS.update(_CAP_NAMES)
NODE_DISPLAY_NAME_MAPPINGS.update(_CN_NAMES)
NODE_DISPLAY_NAME_MAPPINGS.update(_DN_NAMES)
NODE_CLASS_MAPPINGS.update(_SPLIT_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_SPLIT_NAMES)
