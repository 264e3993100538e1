"""Test-only ComfyUI custom nodes that hand out the tiny fixture models of tests/fixtures.py.

Installed into a test server's ``custom_nodes`` folder (as a symlink) by tests/server.py:

* ``QTDTestCheckpointLoader`` (kind, seed) -> (MODEL, CLIP, VAE): drop-in for CheckpointLoaderSimple.
* ``QTDTestConditioning`` (text) -> CONDITIONING.
* ``QTDTestCaptioner`` (image, prompt, constant) -> STRING, and a stand-in ``TextGenerate`` where
  ComfyUI lacks it (``captioner_fixture.py``): the captioner of the per-tile prompt example.
* ``QTDTestCancelProbe`` (model, stage, at_call) -> MODEL: holds a run until Cancel and logs any
  model call made after it (``cancel_probe.py``).
* ``QTDTestCLIPLoader`` / ``QTDTestVideoVAELoader``: the video example's text encoder and video VAE
  (``video_fixture.py``); its diffusion model is ``QTDTestCheckpointLoader`` kind ``tiny_wan``.
* ``QTDTestVAELoader`` (seed) -> VAE: a tiny real ``comfy.sd.VAE`` (ComfyUI's AutoencoderKL with
  seeded weights, ``fx.tiny_vae``), which the Quadtree VAE nodes run exactly; the checkpoint
  loader's VAE (a duck-typed linear stand-in) makes them fall back to ComfyUI's tiled VAE.

``tests/fixtures.py`` is found through ``$QTD_FIXTURES_PY`` or next to this package's real
(symlink-resolved) folder, and loaded by file path as module ``qtd_fixtures``.
"""
import importlib.util
import os
import sys


def _load_fixtures():
    if "qtd_fixtures" in sys.modules:
        return sys.modules["qtd_fixtures"]
    candidates = [
        os.environ.get("QTD_FIXTURES_PY"),
        os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "fixtures.py"),
    ]
    for path in candidates:
        if path and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("qtd_fixtures", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["qtd_fixtures"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop("qtd_fixtures", None)
                raise
            return module
    raise ImportError(f"tests/fixtures.py not found (tried {candidates}); set QTD_FIXTURES_PY")


fx = _load_fixtures()


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


class QTDTestVAELoader:
    """A tiny real ComfyUI VAE (stands in for VAELoader / a checkpoint's VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Weight seed."})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: ComfyUI's AutoencoderKL, 32/64 channels, seeded weights."

    def load(self, seed):
        return (fx.tiny_vae(seed=seed),)


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
