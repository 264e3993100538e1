"""Test/demo-only ``QTDTestDenoiserLoader``: a fixture model that really denoises.

The random-weight fixture models (``tests/fixtures.py``) are ideal for checking the tile engine's
arithmetic, but they do not remove noise, so an image sampled with them is noise. The demo needs
a picture that shows what the workflow did, so this model predicts

    x0 = GaussianBlur_std(x),   std = clamp(k * sigma, min_std, max_std) latent pixels
                                (k = 10, min_std = 1, max_std = 24)

(the noisy latent x smoothed more the noisier it is: the linear denoiser of a smooth image
under white noise; what it "draws" is a smoothed, slightly cloudy version of the input, more so
the higher the denoise) plus a small per-channel colour offset from the text conditioning, so
classifier-free guidance has something to act on. It runs inside a real SD1.5 ``BaseModel``
(EPS prediction, ComfyUI's own sigma schedule): ``diffusion_model`` returns
``eps = (x - x0) / sigma``, and ComfyUI turns that back into x0. Like a UNet, its output at a
pixel depends only on a neighbourhood (radius ``ceil(3 * std)`` latent pixels, at most 72), with replicate
padding at the borders, so tiles without enough overlap would show seams.

Outputs (MODEL, CLIP, VAE) map 1:1 to ``CheckpointLoaderSimple``'s; CLIP and VAE are the fixture
ones of ``tests/fixtures.py``. Registered by ``tests/fixture_nodes/__init__.py``.
"""
from __future__ import annotations

import math
import sys

import torch


def _fx():
    fx = sys.modules.get("qtd_fixtures")
    if fx is None:
        raise ImportError("qtd_fixtures is not loaded: import this file through tests/fixture_nodes")
    return fx


def gaussian_kernel(std: float, device=None, dtype=torch.float32) -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * std)))
    i = torch.arange(-r, r + 1, device=device, dtype=torch.float64)
    k = torch.exp(-(i * i) / (2.0 * std * std))
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with replicate padding (any H, W >= 1)."""
    k = gaussian_kernel(std, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    C = x.shape[1]
    kx = k.reshape(1, 1, 1, -1).expand(C, 1, 1, -1)
    ky = k.reshape(1, 1, -1, 1).expand(C, 1, -1, 1)
    y = torch.nn.functional.pad(x, (r, r, 0, 0), mode="replicate")
    y = torch.nn.functional.conv2d(y, kx, groups=C)
    y = torch.nn.functional.pad(y, (0, 0, r, r), mode="replicate")
    return torch.nn.functional.conv2d(y, ky, groups=C)


class BlurDenoiser(torch.nn.Module):
    """``diffusion_model`` of an EPS model whose x0 prediction is a sigma-dependent blur."""

    def __init__(self, model_sampling, k: float = 10.0, min_std: float = 1.0, max_std: float = 24.0,
                 context_dim: int = 64, out_channels: int = 4, seed: int = 0):
        super().__init__()
        self.__dict__["_model_sampling"] = model_sampling  # owned by BaseModel; not a submodule here
        self.k, self.min_std, self.max_std = k, min_std, max_std
        self.receptive_radius = int(math.ceil(3.0 * max_std))
        self.ctx_proj = torch.nn.Linear(context_dim, out_channels)
        self.dtype = torch.float32
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.ctx_proj.weight.copy_(torch.randn(self.ctx_proj.weight.shape, generator=gen) / math.sqrt(context_dim))
            self.ctx_proj.bias.zero_()

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        sigma = self._model_sampling.sigma(timesteps.reshape(-1).float()).to(x)
        s = sigma.reshape(-1, 1, 1, 1)
        xt = x * torch.sqrt(s * s + 1.0)          # undo ComfyUI's c_in scaling of the EPS input
        std = float(min(self.max_std, max(self.min_std, self.k * float(sigma.max()))))
        x0 = gaussian_blur(xt, std)
        if context is not None:
            x0 = x0 + 0.01 * torch.tanh(self.ctx_proj(context.to(x0).mean(dim=1)))[:, :, None, None]
        return (xt - x0) / s


def blur_denoiser_model(seed: int = 0):
    """A real ``comfy.model_base.BaseModel`` (SD15, EPS) whose diffusion model is a BlurDenoiser."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    fx = _fx()
    unet_config = fx.tiny_sd15_unet_config()
    unet_config["disable_unet_model_creation"] = True
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    model.diffusion_model = BlurDenoiser(model.model_sampling, context_dim=fx.CONTEXT_DIM, seed=seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.receptive_radius = model.diffusion_model.receptive_radius
    return patcher


class QTDTestDenoiserLoader:
    """A fixture model that denoises by blurring (stands in for CheckpointLoaderSimple in the demo)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                              "tooltip": "Seed of the conditioning projection."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: an EPS model whose x0 is a sigma-dependent Gaussian blur, fixture CLIP and VAE."

    def load(self, seed):
        fx = _fx()
        return (blur_denoiser_model(seed), fx.FixtureCLIP(), fx.FixtureVAE())


NODE_CLASS_MAPPINGS = {"QTDTestDenoiserLoader": QTDTestDenoiserLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestDenoiserLoader": "QTD Test Denoiser Loader"}
