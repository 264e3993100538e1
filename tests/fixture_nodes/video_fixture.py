"""Test-only stand-ins for the video example workflow's loaders (Wan 2.1: diffusion model, text
encoder, video VAE), whose files cannot be downloaded here:

* ``QTDTestCLIPLoader`` () -> CLIP: the fixtures' hashing CLIP (64-wide tokens, what the tiny Wan
  model of ``QTDTestCheckpointLoader`` kind ``tiny_wan`` reads);
* ``QTDTestVideoVAELoader`` () -> VAE: :class:`FixtureVideoVAE`, a linear video VAE with Wan 2.1's
  latent layout: 16 channels, 8x in space, the first frame alone and then 4 frames per latent frame
  ([T, H, W, 3] frames <-> [1, 16, (T - 1) / 4 + 1, H / 8, W / 8]).

Registered by ``tests/fixture_nodes/__init__.py``.
"""
from __future__ import annotations

import sys

import torch

CHANNELS, SPACE, TIME = 16, 8, 4


def _fx():
    fx = sys.modules.get("qtd_fixtures")
    if fx is None:
        raise ImportError("qtd_fixtures is not loaded: import this file through tests/fixture_nodes")
    return fx


class FixtureVideoVAE:
    """Duck-typed ``comfy.sd.VAE`` of a video model: encode = 8x8 average pool in space, the first
    frame alone then 4-frame means in time, a fixed 3 -> 16 map; decode = its pseudo-inverse, each
    latent frame repeated (4 frames, 1 for the first), nearest 8x upsample, clamped to [0, 1]."""

    def __init__(self):
        g = torch.Generator().manual_seed(21)
        self.to_latent = torch.randn(CHANNELS, 3, generator=g)
        self.to_rgb = torch.linalg.pinv(self.to_latent)
        self.latent_channels, self.latent_dim, self.output_channels = CHANNELS, 3, 3
        self.downscale_ratio = self.upscale_ratio = SPACE
        self.device = self.output_device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.first_stage_model = torch.nn.Identity()
        self.not_video = False
        self.extra_1d_channel = None

    def throw_exception_if_invalid(self):
        return None

    def spacial_compression_decode(self):
        return SPACE

    def spacial_compression_encode(self):
        return SPACE

    def temporal_compression_decode(self):
        return TIME

    def temporal_compression_encode(self):
        return TIME

    def memory_used_encode(self, shape, dtype):
        return 0

    def memory_used_decode(self, shape, dtype):
        return 0

    def encode(self, pixels):
        px = pixels[..., :3].float()
        T, H, W = px.shape[0], px.shape[1] // SPACE * SPACE, px.shape[2] // SPACE * SPACE
        px = px[:, :H, :W].movedim(-1, 1)                                  # T, 3, H, W
        pooled = torch.nn.functional.avg_pool2d(px, SPACE) * 2.0 - 1.0
        groups = [pooled[:1]] + [pooled[i:i + TIME] for i in range(1, T, TIME)]
        frames = torch.stack([g.mean(0) for g in groups])                 # t, 3, h, w
        z = torch.einsum("lc,tchw->lthw", self.to_latent, frames)
        return z[None].contiguous()

    def decode(self, samples, vae_options={}):
        z = samples.float()[0]                                            # 16, t, h, w
        rgb = torch.einsum("cl,lthw->tchw", self.to_rgb, z)
        reps = torch.tensor([1] + [TIME] * (rgb.shape[0] - 1))
        rgb = rgb.repeat_interleave(reps, dim=0)
        rgb = torch.nn.functional.interpolate(((rgb + 1.0) * 0.5).clamp(0, 1), scale_factor=SPACE, mode="nearest")
        return rgb.movedim(1, -1)[None].contiguous()                      # 1, T, H, W, 3

    def encode_tiled(self, pixels, *args, **kwargs):
        return self.encode(pixels)

    def decode_tiled(self, samples, *args, **kwargs):
        return self.decode(samples)


class QTDTestVideoVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: a linear video VAE with Wan 2.1's latent layout (stands in for VAELoader)."

    def load(self):
        return (FixtureVideoVAE(),)


NODE_CLASS_MAPPINGS = {"QTDTestVideoVAELoader": QTDTestVideoVAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestVideoVAELoader": "QTD Test Video VAE Loader"}
