"""Test-only ``QTDTestControlNetLoader``: a tiny real ControlNet, the drop-in for ``ControlNetLoader``.

It builds ComfyUI's own ``comfy.cldm.cldm.ControlNet`` with the shrunk SD1.5 config of
``tests/fixtures.py`` (``tiny_sd15_unet_config``: 32/64 channels, 2 heads, context 64) and wraps it
in ``comfy.controlnet.ControlNet`` exactly as ``comfy.controlnet.load_controlnet_state_dict`` does
for a real checkpoint, so its residuals fit the ``tiny_sd15`` fixture model
(``QTDTestCheckpointLoader`` kind ``tiny_sd15``). Weights are seeded; the zero convolutions are
NOT zero (as in a trained ControlNet), so the hint visibly changes the sampled result.

Registered by ``tests/fixture_nodes/__init__.py`` (``NODE_CLASS_MAPPINGS`` below is merged there).
"""
from __future__ import annotations

import sys

import torch


def _fx():
    """tests/fixtures.py as loaded by the fixture package (or by tests/conftest.py in-process)."""
    fx = sys.modules.get("qtd_fixtures")
    if fx is None:
        raise ImportError("qtd_fixtures is not loaded: import this file through tests/fixture_nodes")
    return fx


def tiny_controlnet(seed: int = 0, hint_channels: int = 3):
    """A ``comfy.controlnet.ControlNet`` around a seeded tiny ``comfy.cldm.cldm.ControlNet``."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    fx = _fx()
    config = dict(fx.tiny_sd15_unet_config())
    config.pop("out_channels")
    config.update(num_heads=2, num_head_channels=-1, hint_channels=hint_channels,
                  dtype=torch.float32, device=torch.device("cpu"), operations=comfy.ops.disable_weight_init)
    model = comfy.cldm.cldm.ControlNet(**config)
    fx.init_module_(model, seed, gain=1.0)
    with torch.no_grad():  # small but non-zero residuals, like a trained net's zero convs
        for conv in list(model.zero_convs) + [model.middle_block_out]:
            for p in conv.parameters():
                if p.ndim >= 2:
                    p.mul_(0.2)
    model.eval()
    return comfy.controlnet.ControlNet(model, load_device=mm.get_torch_device(), manual_cast_dtype=None)


class QTDTestControlNetLoader:
    """Tiny seeded ControlNet for the ``tiny_sd15`` fixture model (stands in for ControlNetLoader)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Weight seed."})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: a tiny real ControlNet (comfy.cldm) matching the tiny_sd15 fixture model."

    def load(self, seed):
        return (tiny_controlnet(seed),)


NODE_CLASS_MAPPINGS = {"QTDTestControlNetLoader": QTDTestControlNetLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestControlNetLoader": "QTD Test ControlNet Loader"}
