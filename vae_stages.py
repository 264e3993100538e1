"""The tiled VAE's building blocks: range maths, exact GroupNorm statistics, and the network of
ComfyUI's ``Encoder`` / ``Decoder`` (``comfy/ldm/modules/diffusionmodules/model.py``) flattened
into *stages* that the tile executor (``vae_executor.py``) runs tile by tile.

A stage reads whole feature maps (by name) and writes one. Every stage calls the VAE's own
modules (convolutions, up/downsamplers, attention projections), so ComfyUI's weight casting,
offloading and LoRA weight functions run as they do untiled. Only a GroupNorm is not called as a
module: its statistics must come from the whole image, so the executor normalises with pooled
statistics and takes the affine weight and bias through ``comfy.ops.cast_bias_weight`` (the
module's own cast path) when the module uses it.

Nothing here patches or replaces a function or method of ComfyUI or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Range maths, per axis, half-open [lo, hi). A stage's input range for output rows [lo, hi) is the
# smallest one whose result is exact there: rows of the output whose window reaches outside the
# range are wrong (zero padding inside the image) and are cropped away; where the range is clipped
# at the image border the module's own zero padding is exactly what the untiled run uses.


def conv_input_range(lo: int, hi: int, size: int, radius: int) -> tuple[int, int]:
    """Stride-1 conv of radius r (1 for 3x3, 0 for 1x1): [lo - r, hi + r) clipped to [0, size)."""
    return max(0, lo - radius), min(size, hi + radius)


def down_input_range(lo: int, hi: int, size: int) -> tuple[int, int]:
    """ComfyUI's ``Downsample`` (zero pad of 1 right/bottom, then 3x3 conv, stride 2): output row i
    reads input rows 2i..2i+2, so [2 lo, 2 hi + 1) clipped to size (row ``size`` is the pad)."""
    return 2 * lo, min(size, 2 * hi + 1)


def pool_input_range(lo: int, hi: int, size: int) -> tuple[int, int]:
    """2x2 average pool, stride 2: [2 lo, 2 hi) clipped to size."""
    return 2 * lo, min(size, 2 * hi)


def up_input_range(lo: int, hi: int, size: int) -> tuple[int, int]:
    """Nearest x2 upsample then 3x3 conv: output rows [lo - 1, hi + 1) of the upsampled map come
    from input rows floor((lo - 1) / 2) .. floor(hi / 2): [max(0, (lo-1)//2), min(size, hi//2 + 1))."""
    return max(0, (lo - 1) // 2), min(size, hi // 2 + 1)


RESAMPLE = {  # kind -> (input range, output size from input size, output origin of an input origin)
    "same": (None, lambda n: n, lambda o: o),
    "down": (down_input_range, lambda n: (n - 2) // 2 + 1, lambda o: o // 2),
    "pool": (pool_input_range, lambda n: n // 2, lambda o: o // 2),
    "up": (up_input_range, lambda n: 2 * n, lambda o: 2 * o),
}


# ---------------------------------------------------------------------------------------------
# GroupNorm statistics pooled over tile cores (each pixel counted once).

@dataclass
class Moments:
    """Count n, mean and M2 = sum of squared deviations per (batch, group), float64 on the CPU."""
    n: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, n: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan's parallel update for the union of two disjoint sets:
        n = na + nb, d = mean_b - mean_a, mean = mean_a + d nb / n, M2 = M2a + M2b + d^2 na nb / n."""
        mean, m2 = mean.cpu().double(), m2.cpu().double()          # .cpu() first: MPS has no float64
        if self.mean is None:
            self.n, self.mean, self.m2 = float(n), mean, m2
            return
        total = self.n + n
        d = mean - self.mean
        self.mean = self.mean + d * (n / total)
        self.m2 = self.m2 + m2 + d * d * (self.n * n / total)
        self.n = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance M2 / n): what torch's group_norm uses."""
        return self.mean, self.m2 / self.n


def group_moments(x: torch.Tensor, groups: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(n, mean, M2) per (batch, group) of x [B, C, h, w], accumulated in float32 on x's device
    (no copy of a cropped view): per channel c (n_c = h w) mean_c and var_c, then per group
    n = k n_c over its k channels, mean = avg_c mean_c, M2 = n_c sum_c (var_c + (mean_c - mean)^2)."""
    b, c, h, w = x.shape
    var_c, mean_c = torch.var_mean(x if x.dtype == torch.float32 else x.float(), dim=(2, 3), correction=0)
    var_c, mean_c = var_c.reshape(b, groups, -1), mean_c.reshape(b, groups, -1)
    mean = mean_c.mean(-1)
    m2 = (var_c + (mean_c - mean[..., None]).square()).sum(-1) * (h * w)
    return float(h * w * (c // groups)), mean, m2


def norm_affine(norm: torch.nn.Module, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The GroupNorm's weight and bias as float32 on ``device``, through ComfyUI's own cast path
    (``comfy.ops.cast_bias_weight``: offloaded weights, LoRA weight functions) when the module's
    forward would use it, else the parameters themselves."""
    import comfy.ops
    if getattr(norm, "weight", None) is None:
        return None, None
    casts = (getattr(norm, "comfy_cast_weights", False) or len(getattr(norm, "weight_function", ()) or ())
             or len(getattr(norm, "bias_function", ()) or ()))
    probe = torch.empty(0, device=device, dtype=torch.float32)
    if casts and hasattr(comfy.ops, "uncast_bias_weight"):
        w, b, stream = comfy.ops.cast_bias_weight(norm, probe, offloadable=True)
        out = w.float().clone(), None if b is None else b.float().clone()
        comfy.ops.uncast_bias_weight(norm, w, b, stream)
        return out
    if casts:
        w, b = comfy.ops.cast_bias_weight(norm, probe)
    else:
        w, b = norm.weight, norm.bias
    return w.to(device, torch.float32), None if b is None else b.to(device, torch.float32)


def norm_coefficients(mean, var, eps, weight, bias, channels, device):
    """Per (batch, channel) scale and shift of y = x a + b, the form torch's GroupNorm kernel
    applies: a_c = gamma_c / sqrt(var_g + eps), b_c = beta_c - mean_g a_c (computed in float64,
    returned float32 on ``device``, [B, C, 1, 1] each)."""
    groups = mean.shape[-1]
    rep = channels // groups
    inv = torch.rsqrt(var.cpu().double() + eps).repeat_interleave(rep, dim=-1)
    mu = mean.cpu().double().repeat_interleave(rep, dim=-1)
    a = inv if weight is None else inv * weight.cpu().double().reshape(1, -1)
    b = -mu * a if bias is None else bias.cpu().double().reshape(1, -1) - mu * a
    return a.float().to(device)[..., None, None], b.float().to(device)[..., None, None]


def apply_norm(x: torch.Tensor, coeffs, act: bool) -> torch.Tensor:
    """GroupNorm with given coefficients (x a + b in float32), returned in x's dtype; then SiLU."""
    a, b = coeffs
    y = torch.addcmul(b, x, a).to(x.dtype)          # computed in float32 (type promotion), no copy of x
    return F.silu(y, inplace=True) if act else y


# ---------------------------------------------------------------------------------------------
# Stages

@dataclass
class Stage:
    """One tiled operation: ``output = fn(input tiles, normed)``.

    ``normed`` is act(GroupNorm(inputs[0])) with whole-image statistics when ``norm`` is set.
    ``kind`` is the resampling (see RESAMPLE) or "attention" (global keys and values);
    ``radius`` the halo of a "same" stage; ``channels`` the widest tensor's channel count and
    ``cost`` the conv input's area per output pixel (4 for a stride-2 conv), for the tile budget.
    """
    name: str
    inputs: tuple[str, ...]
    output: str
    out_channels: int
    fn: Callable
    kind: str = "same"
    radius: int = 1
    norm: torch.nn.Module | None = None
    act: bool = True
    channels: int = 0
    cost: int = 1
    attn: torch.nn.Module | None = None
    level: int = 0            # resolution level: output pixels are 2^level image pixels (decoder/encoder)

    def input_range(self, lo: int, hi: int, size: int) -> tuple[int, int]:
        rng = RESAMPLE.get(self.kind, RESAMPLE["same"])[0]
        return conv_input_range(lo, hi, size, self.radius) if rng is None else rng(lo, hi, size)

    def out_size(self, n: int) -> int:
        return RESAMPLE.get(self.kind, RESAMPLE["same"])[1](n)

    def out_origin(self, o: int) -> int:
        return RESAMPLE.get(self.kind, RESAMPLE["same"])[2](o)
