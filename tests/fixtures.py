"""Tiny, deterministic, CPU-fast stand-ins built from real ComfyUI classes.

This module is imported in three ways, so it must not depend on how it was found:

* by ``tests/conftest.py`` (registered as ``qtd_fixtures``; tests do ``import qtd_fixtures``),
* by ``tests/fixture_nodes`` inside a real ComfyUI server process (loaded by file path),
* by helper scripts run in subprocesses (``tests/test_no_patching.py``).

ComfyUI itself is imported lazily (inside functions) so that :func:`setup_comfy` can put it on
``sys.path`` and force the CPU before anything from ``comfy`` is loaded.

Public helpers
--------------
setup_comfy(comfy_path=None) -> str
load_pack(repo=None, name="quadtree_diffusion") -> module
tiny_sd15(seed=0, context_dim=64) -> ModelPatcher
local_model(seed=0, in_channels=4, hidden=32, num_layers=3, context_dim=64) -> ModelPatcher
position_latent(channels, h, w), window_of(row, canvas)      (tiles that tell where they came from)
local_model_for_format(latent_format, seed=0) -> ModelPatcher  (another channel count / compression)
local_inpaint_model(seed=0, **kw) -> ModelPatcher            (9 input channels, concat_keys mask+masked_image)
tiny_flux_config(in_channels=16) -> dict                     (FLUX.1 dev-style config, any ComfyUI version)
tiny_conditioning(text, dim=64, seed=0, tokens=77, pooled_dim=None) -> CONDITIONING
FixtureCLIP(dim=64), FixtureVAE()
empty_latent(width, height, batch_size=1) -> LATENT dict
run_ksampler(model, positive, negative, latent, seed=0, steps=4, cfg=7.0,
             sampler_name="euler", scheduler="normal", denoise=1.0) -> torch.Tensor
logged(model) -> (ModelPatcher, CallLog)        (records what the model is given: per tile batch
                                                  when set before Quadtree Diffusion)
call_node(node_class, **inputs) -> tuple         (V1 and V3 node classes)
synthetic_photo(width=512, height=512, seed=0) -> IMAGE tensor [1,H,W,3]
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
import sys
from typing import NamedTuple

import torch

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
PACK_MODULE_NAME = "quadtree_diffusion"

CONTEXT_DIM = 64
LATENT_CHANNELS = 4
DOWNSCALE = 8


# --------------------------------------------------------------------------------------------
# ComfyUI runtime setup (in-process, CPU only)
# --------------------------------------------------------------------------------------------

def default_comfy_path() -> str:
    cache = os.environ.get("QTD_CACHE") or os.path.join(REPO_ROOT, ".cache")
    return os.environ.get("COMFYUI_PATH") or os.path.join(cache, "ComfyUI")


def default_python() -> str:
    """The venv python provisioned by scripts/provision.sh (falls back to the running one)."""
    cache = os.environ.get("QTD_CACHE") or os.path.join(REPO_ROOT, ".cache")
    venv = os.environ.get("QTD_VENV") or os.path.join(cache, "venv")
    py = os.path.join(venv, "bin", "python")
    return py if os.path.exists(py) else sys.executable


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a or os.getcwd()) == os.path.realpath(b)
    except OSError:
        return False


def setup_comfy(comfy_path: str | None = None) -> str:
    """Make real ComfyUI importable as a library running on the CPU. Idempotent.

    * ComfyUI goes first on ``sys.path``;
    * the repo root (which holds the pack's own ``nodes.py``/``utils.py``) and ``tests/`` (which
      holds a ``server.py``) are removed from ``sys.path`` so ``import nodes``/``import server``
      are ComfyUI's (``python -m pytest`` adds the cwd);
    * ``comfy.cli_args.args.cpu`` (and ``use_pytorch_cross_attention``) are set before
      ``comfy.model_management`` is imported.
    """
    path = os.path.realpath(comfy_path or default_comfy_path())
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(
            f"ComfyUI not found at {path!r}: run scripts/provision.sh (or set COMFYUI_PATH)")

    # Off: the repo root (pack's nodes.py/utils.py) and tests/ (server.py). ComfyUI goes first.
    sys.path[:] = [p for p in sys.path
                   if not (_same_dir(p, REPO_ROOT) or _same_dir(p, TESTS_DIR) or _same_dir(p, path))]
    sys.path.insert(0, path)

    if "comfy.model_management" not in sys.modules:
        import comfy.options  # noqa: F401  (args parsing stays disabled: library mode)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        # SDPA is several times faster than ComfyUI's CPU default (sub-quadratic attention);
        # the server harness passes the same flag (--use-pytorch-cross-attention).
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management as mm
    dev = mm.get_torch_device()
    if getattr(dev, "type", str(dev)) != "cpu":
        raise RuntimeError(f"ComfyUI was imported before setup_comfy() and runs on {dev}, not the CPU")
    # ComfyUI's own top-level `nodes` must win over the pack's nodes.py.
    mod = sys.modules.get("nodes")
    if mod is not None and not os.path.realpath(getattr(mod, "__file__", "")).startswith(path + os.sep):
        raise RuntimeError(f"'nodes' resolves to {mod.__file__}, not ComfyUI's nodes.py")
    return path


def load_pack(repo: str | None = None, name: str = PACK_MODULE_NAME):
    """Import the node pack from ``repo`` (default: this checkout) as package ``name``.

    The folder name is irrelevant: the pack is loaded from its ``__init__.py`` with its own
    folder as the package search path, exactly like ComfyUI loads custom nodes.
    """
    if name in sys.modules:
        return sys.modules[name]
    repo = os.path.realpath(repo or REPO_ROOT)
    init = os.path.join(repo, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"the node pack has no {init} yet")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[repo])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        for key in [k for k in sys.modules if k.startswith(name + ".")]:
            sys.modules.pop(key, None)
        raise
    return module


# --------------------------------------------------------------------------------------------
# Deterministic initialisation
# --------------------------------------------------------------------------------------------

def text_seed(text: str, seed: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def init_module_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter deterministically (ComfyUI's ops skip torch's weight init).

    Norm layers get weight 1 / bias 0 (torch's norms and the families' own RMSNorm / QK-norm classes, whose
    gain is a 1-D ``weight`` or ``scale``: zero there would zero every query and key, and attention would be
    uniform, blind to positions); every other weight ~ N(0, gain / sqrt(fan_in)), biases 0.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    done = set()
    for mod in module.modules():
        if isinstance(mod, norm_types) or type(mod).__name__.lower().endswith("norm"):
            for name in ("weight", "scale"):
                w = getattr(mod, name, None)
                if isinstance(w, torch.nn.Parameter) and w.ndim == 1:
                    w.fill_(1.0)
                    done.add(id(w))
            if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):
                mod.bias.zero_()
                done.add(id(mod.bias))
    for pname, p in module.named_parameters():
        if id(p) in done:
            continue
        if pname.endswith("bias") or p.ndim < 2:
            p.zero_()
        else:
            fan_in = p[0].numel()
            std = gain / math.sqrt(max(1, fan_in))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return module


def _patcher(base_model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def tiny_sd15_unet_config(context_dim: int = CONTEXT_DIM, in_channels: int = 4) -> dict:
    """A shrunk SD1.5 UNet: 32/64 channels, one res block per level, attention at level 1 only."""
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [0, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 0, 0],
        "use_spatial_transformer": True,
        "legacy": False,
        "context_dim": context_dim,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        # num_heads / num_head_channels come from SD15.unet_extra_config (overridden in tiny_sd15).
    }


def tiny_sd15(seed: int = 0, context_dim: int = CONTEXT_DIM):
    """A real ``comfy.model_base.BaseModel`` (SD15 config, EPS) with a tiny seeded UNet."""
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(tiny_sd15_unet_config(context_dim))
    # SD15.unet_extra_config asks for 8 heads; 2 heads of 32 channels are much faster on the CPU.
    config.unet_config["num_heads"] = 2
    config.unet_config["num_head_channels"] = -1
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    init_module_(model.diffusion_model, seed, gain=1.0)
    with torch.no_grad():  # keep eps predictions around unit scale
        model.diffusion_model.out[-1].weight.mul_(0.3)
    model.eval()
    return _patcher(model)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LocalConvNet(torch.nn.Module):
    """A diffusion model of KNOWN receptive field: ``num_layers`` plain zero-padded convs.

    Output pixel (y, x) depends only on input pixels within Chebyshev distance
    ``receptive_radius`` = num_layers * (kernel // 2), so it is translation-equivariant away from the
    image border. The timestep (sinusoidal embedding) and the pooled text context each add a
    spatially-constant per-channel bias after the first conv, so cond/uncond and steps differ.
    The prediction is ``skip * x[:, :out_channels] + conv_stack(x)`` (the identity skip has radius
    0), which keeps eps near the noise so that sampling stays bounded.

    Set ``record = True`` to append every call's inputs to ``calls`` (dicts with ``x`` (includes any
    c_concat channels), ``timesteps``, ``context``, ``transformer_options``, ``kwargs``).
    """

    def __init__(self, in_channels=4, out_channels=4, hidden=32, num_layers=3, kernel=3,
                 context_dim=CONTEXT_DIM, temb_dim=32, seed=0):
        super().__init__()
        assert num_layers >= 2 and kernel % 2 == 1
        chans = [in_channels] + [hidden] * (num_layers - 1) + [out_channels]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(chans[i], chans[i + 1], kernel, padding=kernel // 2) for i in range(num_layers))
        self.time_proj = torch.nn.Linear(temb_dim, hidden)
        self.ctx_proj = torch.nn.Linear(context_dim, hidden)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_dim = context_dim
        self.temb_dim = temb_dim
        self.receptive_radius = num_layers * (kernel // 2)
        self.skip = 1.0
        self.dtype = torch.float32
        self.record = False
        self.calls = []
        init_module_(self, seed, gain=1.0)
        with torch.no_grad():  # make the conditioning biases clearly visible
            self.time_proj.weight.mul_(0.5)
            self.ctx_proj.weight.mul_(2.0)
            self.convs[-1].weight.mul_(0.1)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        if x.shape[1] != self.in_channels:
            raise ValueError(f"LocalConvNet expects {self.in_channels} input channels, got {tuple(x.shape)}")
        if self.record:
            self.calls.append({
                "x": x.detach().clone(),
                "timesteps": None if timesteps is None else timesteps.detach().clone(),
                "context": None if context is None else context.detach().clone(),
                "transformer_options": transformer_options,
                "kwargs": dict(kwargs),
            })
        h = self.convs[0](x)
        bias = torch.zeros(x.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
        if timesteps is not None:
            t = timesteps.reshape(-1).to(h.device)
            bias = bias + self.time_proj(timestep_embedding(t, self.temb_dim).to(h.dtype))
        if context is not None:
            bias = bias + self.ctx_proj(context.to(h.dtype).mean(dim=1))
        h = h + bias[:, :, None, None]
        for conv in self.convs[1:]:
            h = conv(torch.nn.functional.silu(h))
        return h + self.skip * x[:, :self.out_channels]


def complete_dataclass_config(cls, cfg: dict, defaults: dict) -> dict:
    """``cfg`` plus, for every field of the dataclass ``cls`` that this ComfyUI requires and ``cfg``
    lacks, its value from ``defaults`` (feature detection: newer ComfyUI adds required fields,
    e.g. ``FluxParams.txt_ids_dims`` since 0.4).  A required field with no default is an error
    naming it, so a fixture fails clearly when ComfyUI adds another."""
    import dataclasses
    out = dict(cfg)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in out:
            if f.name not in defaults:
                raise TypeError(f"{cls.__name__} requires '{f.name}' in this ComfyUI: add it to the fixture's defaults")
            out[f.name] = copy.deepcopy(defaults[f.name])
    return out


def tiny_flux_config(in_channels: int = 16) -> dict:
    """A FLUX dev-style unet config (guidance_embed) shrunk to CPU size; in_channels 96 = FLUX Fill."""
    from comfy.ldm.flux.model import FluxParams
    cfg = dict(image_model="flux", in_channels=in_channels, out_channels=16, vec_in_dim=64, context_in_dim=64,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
               theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    return complete_dataclass_config(FluxParams, cfg, {"txt_ids_dims": []})   # FLUX.1: no txt id axes


def local_model(seed: int = 0, in_channels: int = 4, hidden: int = 32, num_layers: int = 3,
                context_dim: int = CONTEXT_DIM):
    """Real SD15 ``BaseModel``/``ModelPatcher`` whose ``diffusion_model`` is a :class:`LocalConvNet`.

    ``model.model.diffusion_model.receptive_radius`` is the radius in latent pixels; it is also
    available as ``model.receptive_radius``. ``in_channels=9`` gives an inpaint model (ComfyUI
    concatenates ``c_concat`` = mask + masked latent to x, see ``BaseModel.set_inpaint``).
    """
    import comfy.model_base
    import comfy.supported_models

    unet_config = tiny_sd15_unet_config(context_dim, in_channels=in_channels)
    unet_config["disable_unet_model_creation"] = True
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    model.diffusion_model = LocalConvNet(in_channels=in_channels, hidden=hidden, num_layers=num_layers,
                                         context_dim=context_dim, seed=seed)
    if config.inpaint_model():
        model.set_inpaint()
    model.eval()
    patcher = _patcher(model)
    patcher.receptive_radius = model.diffusion_model.receptive_radius
    return patcher


def position_latent(channels: int, h: int, w: int) -> torch.Tensor:
    """A [1, channels, h, w] latent whose channels 0/1 are 10 x row / 10 x column (the rest 0): a
    tile's input tells which window of the canvas it is (see :func:`window_of`)."""
    lat = torch.zeros(1, channels, h, w)
    lat[:, 0] = 10.0 * torch.arange(h, dtype=torch.float32)[:, None]
    lat[:, 1] = 10.0 * torch.arange(w, dtype=torch.float32)[None, :]
    return lat


def window_of(row: torch.Tensor, canvas: torch.Tensor) -> tuple[int, int]:
    """(y0, x0) of the h x w window of ``canvas`` [C, H, W] closest to ``row`` [C, h, w] on channels
    0-1 (mean absolute difference over every placement, computed at once with ``unfold``)."""
    h, w = row.shape[-2:]
    win = canvas[:2].unfold(1, h, 1).unfold(2, w, 1)          # [2, H-h+1, W-w+1, h, w]
    d = (win - row[:2, None, None]).abs().mean(dim=(0, 3, 4))
    i = int(torch.argmin(d))                                  # first minimum, row-major, as a scan finds it
    return i // d.shape[1], i % d.shape[1]


def local_model_for_format(latent_format, seed: int = 0):
    """:func:`local_model` for a latent format of ComfyUI's (its channel count; its compression
    ratio, whether this ComfyUI declares one or not): stands in for a 16x / 32x / 1x model."""
    patcher = local_model(seed)
    ch = latent_format.latent_channels
    patcher.model.latent_format = latent_format
    patcher.model.diffusion_model = LocalConvNet(in_channels=ch, out_channels=ch, seed=seed)
    patcher.receptive_radius = patcher.model.diffusion_model.receptive_radius
    return patcher


def local_inpaint_model(seed: int = 0, **kwargs):
    return local_model(seed=seed, in_channels=9, **kwargs)


def make_model(kind: str, seed: int = 0):
    if kind == "tiny_sd15":
        return tiny_sd15(seed)
    if kind == "local":
        return local_model(seed)
    if kind == "local_inpaint":
        return local_inpaint_model(seed)
    if kind == "tiny_wan":
        return tiny_wan(seed)
    raise ValueError(f"unknown fixture model kind {kind!r}")


def tiny_wan(seed: int = 0):
    """A tiny Wan 2.1 text-to-video model (tests/families.py's ``WAN21_T2V``: ComfyUI's own WanModel,
    64 wide, one block; 16 latent channels, reads 64-wide text tokens)."""
    import importlib.util
    name = "qtd_families"
    families = sys.modules.get(name)
    if families is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.realpath(__file__)),
                                                                         "families.py"))
        families = importlib.util.module_from_spec(spec)
        sys.modules[name] = families
        spec.loader.exec_module(families)
    import comfy.supported_models
    return families.build(comfy.supported_models.WAN21_T2V, families._wan_cfg(), seed=seed)


MODEL_KINDS = ("tiny_sd15", "local", "local_inpaint", "tiny_wan")


# --------------------------------------------------------------------------------------------
# Conditioning, CLIP and VAE stand-ins
# --------------------------------------------------------------------------------------------

def tiny_conditioning(text: str = "", dim: int = CONTEXT_DIM, seed: int = 0, tokens: int = 77,
                      pooled_dim: int | None = None):
    """ComfyUI CONDITIONING ``[[cond [1,tokens,dim], {"pooled_output": [1,pooled_dim]}]]``,
    a deterministic function of (text, seed)."""
    gen = torch.Generator(device="cpu").manual_seed(text_seed(text, seed))
    cond = torch.randn((1, tokens, dim), generator=gen)
    pooled = torch.randn((1, pooled_dim or dim), generator=gen)
    return [[cond, {"pooled_output": pooled}]]


class FixtureCLIP:
    """Duck-typed ``comfy.sd.CLIP`` good enough for ComfyUI's ``CLIPTextEncode``."""

    def __init__(self, dim: int = CONTEXT_DIM, seed: int = 0):
        self.dim = dim
        self.seed = seed
        self.layer_idx = None
        self.tokenizer_options = {}
        self.apply_hooks_to_conds = None

    def clone(self):
        return copy.copy(self)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"fixture": [[(text, 1.0)]]}

    def _text(self, tokens):
        return "".join(t for t, _ in tokens["fixture"][0])

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        [[cond, extra]] = tiny_conditioning(self._text(tokens), dim=self.dim, seed=self.seed)
        if return_dict:
            return {"cond": cond, **extra}
        if return_pooled:
            return cond, extra["pooled_output"]
        return cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        [[cond, extra]] = tiny_conditioning(self._text(tokens), dim=self.dim, seed=self.seed)
        extra = dict(extra)
        extra.update(add_dict)
        return [[cond, extra]]

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))

    def set_tokenizer_option(self, option_name, value):
        self.tokenizer_options[option_name] = value

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def add_hooks_to_dict(self, pooled_dict):
        return pooled_dict

    def load_model(self):
        return None

    def get_key_patches(self):
        return {}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return []


# latent = RGB_TO_LATENT @ (2*rgb - 1): a fixed full-rank 4x3 map with SD-VAE-like magnitudes.
RGB_TO_LATENT = torch.tensor([
    [2.0, 1.5, 1.0],
    [-1.0, 2.5, -0.5],
    [0.5, -1.5, 2.5],
    [1.5, 0.5, -2.0],
], dtype=torch.float32)
LATENT_TO_RGB = torch.linalg.pinv(RGB_TO_LATENT)


class FixtureVAE:
    """Duck-typed ``comfy.sd.VAE`` for VAEEncode/VAEDecode/VAEEncodeTiled/VAEDecodeTiled/
    VAEEncodeForInpaint. encode = crop to a multiple of 8, 8x8 average pool, fixed 3->4 linear
    map; decode = pseudo-inverse 4->3 map, nearest 8x upsample, clamp to [0,1].
    ``decode(encode(img)) == img`` for images that are constant on 8x8 blocks."""

    def __init__(self):
        self.downscale_ratio = DOWNSCALE
        self.upscale_ratio = DOWNSCALE
        self.latent_channels = LATENT_CHANNELS
        self.latent_dim = 2
        self.output_channels = 3
        self.crop_input = True
        self.not_video = True
        self.extra_1d_channel = None
        self.first_stage_model = torch.nn.Identity()
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")
        self.output_device = torch.device("cpu")
        self.size = 0
        self.calls = []

    # --- metadata -----------------------------------------------------------------------
    def throw_exception_if_invalid(self):
        return None

    def model_size(self):
        return 0

    def get_ram_usage(self):
        return 0

    def get_sd(self):
        return {}

    def memory_used_encode(self, shape, dtype):
        return 0

    def memory_used_decode(self, shape, dtype):
        return 0

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def vae_encode_crop_pixels(self, pixels):
        dims = pixels.shape[1:-1]
        for d in range(len(dims)):
            x = (dims[d] // DOWNSCALE) * DOWNSCALE
            off = (dims[d] % DOWNSCALE) // 2
            if x != dims[d]:
                pixels = pixels.narrow(d + 1, off, x)
        return pixels

    # --- encode / decode ------------------------------------------------------------------
    def encode(self, pixel_samples):
        self.calls.append(("encode", tuple(pixel_samples.shape)))
        px = self.vae_encode_crop_pixels(pixel_samples)[..., :3].float().movedim(-1, 1)  # B,3,H,W
        pooled = torch.nn.functional.avg_pool2d(px, DOWNSCALE)
        return torch.einsum("lc,bchw->blhw", RGB_TO_LATENT, pooled * 2.0 - 1.0).contiguous()

    def decode(self, samples_in, vae_options={}):
        self.calls.append(("decode", tuple(samples_in.shape)))
        rgb = torch.einsum("cl,blhw->bchw", LATENT_TO_RGB, samples_in.float())
        rgb = ((rgb + 1.0) * 0.5).clamp(0.0, 1.0)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=DOWNSCALE, mode="nearest")
        return rgb.movedim(1, -1).contiguous()

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.encode(pixel_samples)  # the map is local: tiling changes nothing

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.decode(samples)


# --------------------------------------------------------------------------------------------
# A real ComfyUI VAE (comfy.sd.VAE around ComfyUI's own AutoencoderKL / Encoder / Decoder), tiny

# SD-shaped (attention only in the middle, 8x: four levels), 32/64 channels (GroupNorm's 32 groups).
TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                     "dropout": 0.0}


# What comfy.sd.VAE builds for an SD1.x/SD2/SDXL VAE (4 levels, 128..512 channels, 2 blocks a level).
SD_VAE_DDCONFIG = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}


@torch.no_grad()
def seeded_state_dict(module: torch.nn.Module, seed: int) -> dict:
    """A seeded state dict for ``module`` (ComfyUI's ops skip weight init): convs/linears
    N(0, 1/fan_in), their biases N(0, 0.1^2), norm weights 1 + N(0, 0.2^2) and biases N(0, 0.2^2)
    (so a wrongly applied affine shows), batch-norm running mean N(0, 0.5^2) / var U(0.5, 2)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norms = {n for n, m in module.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    out = {}
    for name, t in module.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        shape = tuple(t.shape)
        if leaf == "running_mean":
            v = torch.randn(shape, generator=gen) * 0.5
        elif leaf == "running_var":
            v = torch.rand(shape, generator=gen) * 1.5 + 0.5
        elif not t.is_floating_point():
            v = t.clone()
        elif owner in norms:
            v = (1.0 if leaf == "weight" else 0.0) + 0.2 * torch.randn(shape, generator=gen)
        elif leaf == "bias" or t.ndim < 2:
            v = 0.1 * torch.randn(shape, generator=gen)
        else:
            v = torch.randn(shape, generator=gen) / math.sqrt(max(1, t[0].numel()))
        out[name] = v.to(t.dtype) if t.is_floating_point() else v
    return out


def tiny_vae(seed: int = 0, z_channels: int = 4, batch_norm_latent: bool = False, dtype=None,
             quant_conv: bool = True, ddconfig: dict | None = None):
    """A real ``comfy.sd.VAE`` around ComfyUI's ``AutoencoderKL`` with :data:`TINY_VAE_DDCONFIG`,
    seeded weights, ``z_channels`` latent channels (16: SD3/FLUX-style), optionally the Flux2-style
    batch-norm latent (2x2-packed, 16x, 4 z_channels latent channels), optionally without quant
    convs (FLUX's ``AutoencodingEngine``); ``ddconfig`` overrides the network (e.g. SD's full size,
    ``SD_VAE_DDCONFIG``, for benchmarks). Built through ``comfy.sd.VAE(sd=..., config=...)``, the
    config path every supported ComfyUI has; the attributes sd.py sets when it detects such a VAE
    from its weights are set the same way."""
    import comfy.model_management as mm
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    dd = dict(TINY_VAE_DDCONFIG, **(ddconfig or {}), z_channels=z_channels)
    if batch_norm_latent:
        dd["batch_norm_latent"] = True
    params = {"ddconfig": dd, "embed_dim": z_channels}
    vae = comfy.sd.VAE(sd=seeded_state_dict(AutoencoderKL(**params), seed), config={"params": params}, dtype=dtype)
    if batch_norm_latent:   # what sd.py does for a VAE with 'bn.running_mean'
        vae.downscale_ratio *= 2
        vae.upscale_ratio *= 2
    vae.latent_channels = z_channels * (4 if batch_norm_latent else 1)
    if not quant_conv:      # FLUX's VAE: AutoencodingEngine (no quant convs), as sd.py builds it
        eng = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
        eng.load_state_dict(seeded_state_dict(eng, seed))
        vae.first_stage_model = eng.to(vae.vae_dtype).eval()
        vae.patcher = type(vae.patcher)(eng, load_device=vae.device, offload_device=mm.vae_offload_device())
        vae.size = None
    return vae


def smooth_latent(channels: int, height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A latent-like tensor: low-frequency noise (bilinear from 1/4 resolution) plus a ramp."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.randn((batch, channels, max(1, height // 4), max(1, width // 4)), generator=gen)
    z = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    ramp = torch.linspace(-1.0, 1.0, width).reshape(1, 1, 1, width)
    return (z * 1.5 + ramp + 0.3 * torch.randn((batch, channels, height, width), generator=gen)).contiguous()


# --------------------------------------------------------------------------------------------
# Sampling / node helpers
# --------------------------------------------------------------------------------------------

def empty_latent(width: int, height: int, batch_size: int = 1) -> dict:
    return {"samples": torch.zeros([batch_size, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE])}


def run_ksampler(model, positive, negative, latent, seed: int = 0, steps: int = 4, cfg: float = 7.0,
                 sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0):
    """Run ComfyUI's real ``nodes.common_ksampler`` in-process and return the output latent tensor.

    ``latent`` is a LATENT dict or a bare ``[B,4,h,w]`` tensor."""
    import nodes as comfy_nodes  # ComfyUI's top-level nodes.py (setup_comfy keeps the pack off sys.path)

    if torch.is_tensor(latent):
        latent = {"samples": latent}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler,
                                         positive, negative, latent, denoise=denoise)
    return out["samples"]



class ModelInput(NamedTuple):
    """What the model was given in one call: ``x`` (a detached copy of the input), ``c`` (the
    conditioning keyword arguments as given: c_crossattn, y, c_concat, ``transformer_options``,
    ``control``, ...), ``t`` (the timestep) and ``cou`` (``cond_or_uncond``: the kind of each
    equal-sized chunk of rows, 0 positive, 1 negative)."""
    x: torch.Tensor
    c: dict
    t: torch.Tensor
    cou: tuple = ()

    def chunks(self, key: str = "c_crossattn"):
        """(kind, rows of ``c[key]``) per cond chunk of the call."""
        v = self.c[key]
        rows = v.shape[0] // len(self.cou)
        return [(kind, v[j * rows:(j + 1) * rows]) for j, kind in enumerate(self.cou)]


class CallLog:
    """A unet function wrapper (``set_model_unet_function_wrapper``) that records every model call and
    passes it on unchanged.  Set *before* Quadtree Diffusion, it is the engine's inner wrapper: the engine
    calls it once per tile batch, so it sees exactly what the model is given.

    ``calls``: one :class:`ModelInput` per call; ``shapes``: the input shapes, in call order.
    ``answer``: optional ``answer(call: ModelInput) -> x0`` that replaces the model (the model is then
    never run): a stand-in whose prediction a test constructs, e.g. to read the blend weights back."""

    def __init__(self, answer=None):
        self.calls: list[ModelInput] = []
        self.answer = answer

    def __deepcopy__(self, memo):      # ModelPatcher.clone() deep-copies model_options: keep this one log
        return self

    def __call__(self, apply_model, args, *extra, **kwargs):
        call = ModelInput(args["input"].detach().clone(), args["c"], args["timestep"],
                          tuple(args.get("cond_or_uncond") or ()))
        self.calls.append(call)
        if self.answer is not None:
            return self.answer(call)
        return apply_model(args["input"], args["timestep"], **args["c"])

    @property
    def shapes(self) -> list[tuple]:
        return [tuple(call.x.shape) for call in self.calls]


def logged(model, answer=None):
    """``(clone of model with a CallLog as its unet function wrapper, the CallLog)``; ``answer``: see
    :class:`CallLog`."""
    m = model.clone()
    log = CallLog(answer)
    m.set_model_unet_function_wrapper(log)
    return m, log


def call_node(node_class, **inputs):
    """Execute a node class the way ComfyUI would (V1: FUNCTION method; V3: execute classmethod);
    returns the output tuple."""
    func_name = getattr(node_class, "FUNCTION", None)
    if hasattr(node_class, "define_schema") and hasattr(node_class, "execute"):
        out = node_class.execute(**inputs)
    else:
        out = getattr(node_class(), func_name)(**inputs)
    if hasattr(out, "args") and not isinstance(out, (tuple, dict)):
        return tuple(out.args)
    if isinstance(out, dict):
        return tuple(out.get("result", ()))
    return tuple(out)


def node_input_defaults(node_class) -> dict:
    """Default values for every required widget input (first combo option for combos)."""
    spec = node_class.INPUT_TYPES()
    out = {}
    for name, entry in spec.get("required", {}).items():
        kind = entry[0]
        opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        if isinstance(kind, (list, tuple)):
            out[name] = opts.get("default", kind[0] if kind else None)
        elif kind == "COMBO" and "options" in opts:
            out[name] = opts.get("default", opts["options"][0])
        elif "default" in opts:
            out[name] = opts["default"]
    return out


def _node_inputs(node_class, inputs: dict) -> dict:
    """The node's required widget defaults (its own schema: a default change reaches every test), then
    ``inputs`` by input name; an input the node does not have is an error, not a silent extra."""
    spec = node_class.INPUT_TYPES()
    known = set(spec.get("required", {})) | set(spec.get("optional", {}))
    unknown = set(inputs) - known
    if unknown:
        raise TypeError(f"{node_class.__name__} has no input(s) {sorted(unknown)}")
    return {**node_input_defaults(node_class), **inputs}


def tiled(pack, model, **inputs):
    """Quadtree Diffusion as a user wires it (the one helper the tests use): ``model`` through the node
    with its schema defaults and ``inputs``; returns the tiled MODEL."""
    node = pack.nodes.QuadtreeDiffusion
    return call_node(node, **_node_inputs(node, dict(inputs, model=model)))[0]


def visualize(pack, image, **inputs):
    """Quadtree Visualizer on ``image`` with its schema defaults and ``inputs``: (preview, layout)."""
    node = pack.nodes.QuadtreeVisualizer
    return call_node(node, **_node_inputs(node, dict(inputs, image=image)))


def plan_of(pack, model, H: int, W: int, compression: int = 8, align: int = 1, **kw):
    """The plan the engine of a Quadtree Diffusion ``model`` builds for an H x W latent (CPU, float32)."""
    engine = model.model_options["model_function_wrapper"]
    return pack.tiled_diffusion.plan_for(engine.cfg, H=H, W=W, compression=compression, align=align, device="cpu",
                                         dtype=torch.float32, **kw)


def synthetic_photo(width: int = 512, height: int = 512, seed: int = 0) -> torch.Tensor:
    """A photo-like IMAGE [1,H,W,3] in 0..1: a smooth sky gradient (flat, top half), a soft
    horizon, and a high-frequency noisy texture region (bottom-right) plus a few hard edges."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ys = torch.linspace(0.0, 1.0, height).reshape(height, 1, 1)
    xs = torch.linspace(0.0, 1.0, width).reshape(1, width, 1)
    sky_top = torch.tensor([0.25, 0.45, 0.85]).reshape(1, 1, 3)
    sky_low = torch.tensor([0.75, 0.85, 0.95]).reshape(1, 1, 3)
    img = sky_top + (sky_low - sky_top) * ys + 0.0 * xs
    ground = torch.tensor([0.35, 0.45, 0.2]).reshape(1, 1, 3)
    horizon = int(height * 0.55)
    img = img.expand(height, width, 3).clone()
    img[horizon:] = ground + 0.05 * ys[horizon:]
    # detailed region: noisy texture in the bottom-right quadrant
    th, tw = height - horizon, width // 2
    texture = torch.rand((th, tw, 3), generator=gen) * 0.6 - 0.3
    img[horizon:, width - tw:] = (img[horizon:, width - tw:] + texture).clamp(0, 1)
    # a few hard-edged "objects" on the ground at the left
    for i in range(3):
        y0 = horizon + 10 + i * (th // 4)
        x0 = 20 + i * (width // 10)
        img[y0:y0 + th // 6, x0:x0 + width // 12] = torch.tensor([0.8 - 0.2 * i, 0.2, 0.1 + 0.3 * i])
    return img.unsqueeze(0).clamp(0.0, 1.0).contiguous()


def save_image(image: torch.Tensor, path: str) -> str:
    """Save IMAGE [1,H,W,3] (or [H,W,3]) as an 8-bit PNG."""
    import numpy as np
    from PIL import Image

    if image.ndim == 4:
        image = image[0]
    arr = (image.clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path
