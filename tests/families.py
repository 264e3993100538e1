"""Tiny models of every image/video family ComfyUI ships, built from ComfyUI's own classes.

Each family of ``comfy.supported_models.models`` (the classes ComfyUI detects checkpoints as) gets a
builder here: the family's own ``supported_models`` config class with a shrunk diffusion-model
config (1-2 blocks, 32-64 channels), its own ``model_base`` class (``config.get_model``), seeded
weights (ComfyUI skips weight init, so an unfilled model returns NaN), and conditioning of the
shapes its ``extra_conds`` reads.  :func:`tiny` returns a :class:`Tiny` with the model, positive /
negative CONDITIONING, a small latent and the latent patch the model tokenises by.

Families that cannot be image/video-tiled at all are in :data:`EXCLUDED` with the reason.  A family
of the running ComfyUI that is in neither fails the family matrix by name (see
``tests/test_family_matrix.py``): add a builder here.

Every builder works on ComfyUI 0.3.75 and 0.28.0: constructor arguments a version lacks or adds are
handled by feature detection (:func:`dataclass_config`), never by version.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch

import qtd_fixtures as fx

CPU = torch.device("cpu")


@dataclass
class Tiny:
    """A family's tiny model and what to sample it with (latent for batch 1; [1, C, (T,) H, W])."""
    model: object
    positive: list
    negative: list
    latent: torch.Tensor
    patch: tuple = (1, 1)             # latent px per token along (H, W)
    frames: int | None = None         # T of a 5-D latent (the model must see it untouched)
    tile: int = 8                     # grid tile side in latent px (a multiple of the patch)
    note: str = ""
    max_abs_diff: float = 0.0         # one tile vs untiled: 0 = bit-exact
    extra: dict = field(default_factory=dict)


EXCLUDED = {
    # audio: 1-D latents [B, C, L] (or [B, C, L, 1] spectrogram-like sequences): no height x width to tile
    "StableAudio": "audio (1-D latent [B, 64, L]): nothing to tile in height x width",
    "StableAudio3": "audio (1-D latent): nothing to tile in height x width",
    "ACEStep": "audio (music latent [B, 8, 16, L]: 16 frequency bands x time, not an image)",
    "ACEStep15": "audio (1-D latent): nothing to tile in height x width",
    # 3-D shapes: latents are sets of tokens [B, C, N], not images
    "Hunyuan3Dv2": "3-D shape model (latent [B, 64, N] tokens of a shape, not an image)",
    "Hunyuan3Dv2mini": "3-D shape model (latent [B, 64, N] tokens of a shape, not an image)",
    "Hunyuan3Dv2_1": "3-D shape model (latent [B, 64, N] tokens of a shape, not an image)",
    "TripoSplat": "3-D Gaussian-splat model (latent is a token sequence, not an image)",
    # not diffusion models: ComfyUI loads them as models, but they are never sampled
    "RT_DETR_v4": "object detector (no sampling: nothing for Quadtree Diffusion to tile)",
    "SAM3": "segmentation model (no sampling: nothing for Quadtree Diffusion to tile)",
    "SAM31": "segmentation model (no sampling: nothing for Quadtree Diffusion to tile)",
    "DepthAnything3": "depth estimator (no sampling: nothing for Quadtree Diffusion to tile)",
}

# Families the matrix knows it cannot sample tiled yet, with what is missing (the test xfails with it).
XFAIL = {
    "HiDreamO1": "its conditioning (input ids with one placeholder per image token, MRoPE positions, token types, "
                 "vision masks) is built in extra_conds for the canvas's token grid; tiles need it rebuilt for each "
                 "tile size, which the engine does not do yet (it refuses the model with a clear error instead)",
}


# The model inputs of each family that relate to the canvas by place, as the diffusion model receives them:
# the family matrix checks that every tile meets them where the canvas does (test_family_matrix.py,
# test_positional_inputs_meet_each_tile_where_the_canvas_does).  The builders give them coordinate-coded
# values (coded, place_mask, ramp_mask).  Names: a keyword input of the diffusion model; "c_concat" (the
# channels of its x after the latent's); "t" (the timestep it receives: per token, or per frame);
# "in:<module>" / "out:<module>" (what a submodule receives / makes, where the model resamples or embeds the
# input itself before it meets the tokens).
POSITIONAL = {
    **dict.fromkeys(["SD15", "SD15_instructpix2pix", "SDXL_instructpix2pix", "Stable_Zero123", "SD_X4Upscaler",
                     "SVD_img2vid", "SV3D_u", "SV3D_p", "FluxInpaint", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V",
                     "HunyuanVideo15", "HunyuanVideo15_SR_Distilled", "HunyuanImage21Refiner", "CosmosI2V",
                     "WAN21_I2V", "WAN21_FunControl2V", "WAN22_WanDancer", "CogVideoX_I2V", "CogVideoX_Inpaint"],
                    ("c_concat",)),
    "CosmosI2VPredict2": ("c_concat", "t"),                             # t per frame: the mask's mean
    "WAN22_T2V": ("t",),                                                # (with a noise mask) t per frame
    "LTXV": ("t",),                                                     # t per token: the mask times t
    "WAN21_Camera": ("c_concat", "camera_conditions"),                  # Plucker rays per pixel (8 per latent px)
    "WAN22_Camera": ("c_concat", "camera_conditions"),
    "WAN21_Vace": ("vace_context",),                                    # control frames + mask
    "WAN21_T2V": ("time_dim_concat",),                                  # Phantom subject frames
    "WAN22_Animate": ("c_concat", "pose_latents"),
    "WAN22_S2V": ("control_video", "reference_motion", "out:frame_packer.proj", "out:frame_packer.proj_2x",
                  "out:frame_packer.proj_4x"),                          # motion tokens at 1/2, 1/4, 1/8
    "WAN21_SCAIL": ("pose_latents", "out:patch_embedding_pose"),        # half-resolution pose, its tokens
    "WAN21_SCAIL2": ("pose_latents", "sam_latents", "ref_mask_latents", "out:patch_embedding_pose"),
    "SeedVR2": ("condition",),
    "Kandinsky5": ("c_concat", "time_dim_replace"),
    "Stable_Cascade_B": ("in:effnet_mapper.0",),                        # effnet as the model resamples it
    "PiD": ("in:lq_proj.latent_proj.0",),                               # lq_latent on the token grid
}


# --------------------------------------------------------------------------- helpers

# Buffers ComfyUI allocates with torch.empty and fills from the checkpoint (SD3's positional table,
# SeedVR2's stored prompt embeddings): uninitialised memory, possibly NaN, unless the fixture fills them.
EMPTY_BUFFERS = ("pos_embed", "positive_conditioning", "negative_conditioning")


@torch.no_grad()
def seeded(model, seed=0, gain=1.0):
    """Fill the diffusion model's weights (and :data:`EMPTY_BUFFERS`) deterministically, eval mode."""
    fx.init_module_(model.diffusion_model, seed, gain=gain)
    g = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.diffusion_model.named_buffers():
        if name.split(".")[-1] in EMPTY_BUFFERS and buf.is_floating_point():
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.02)
    model.eval()
    return model


def build(family, unet_config: dict, seed: int = 0, after: dict | None = None, gain: float = 1.0,
          get_model=None, state_dict=None):
    """The family's config class with ``unet_config`` -> its own ``get_model`` -> seeded ModelPatcher.

    ``after``: entries set on ``config.unet_config`` after the class applied its ``unet_extra_config``.
    """
    config = family(dict(unet_config))
    if after:
        config.unet_config.update(after)
    config.set_inference_dtype(torch.float32, None)
    with torch.no_grad():       # some model_base classes copy weights from the state dict in place
        if get_model is not None:
            model = get_model(config)
        else:
            model = config.get_model(state_dict or {}, "", device=CPU)
    seeded(model, seed, gain)
    return fx._patcher(model)


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def conds(dim: int, tokens: int = 8, pooled: int | None = None, **extra):
    """(positive, negative) CONDITIONING: [[cross_attn [1, tokens, dim], {pooled_output, **extra}]]."""
    out = []
    for seed in (1, 2):
        d = {}
        if pooled:
            d["pooled_output"] = rand(1, pooled, seed=seed + 10)
        for k, v in extra.items():
            d[k] = v(seed) if callable(v) else v
        out.append([[rand(1, tokens, dim, seed=seed), d]])
    return out[0], out[1]


def coded(*shape, seed=7, scale=1.0):
    """A conditioning tensor [1, C, (T,) h, w] coded with its places: channel 0 holds the row and channel 1
    the column (as fractions of the side), the others are random.  Every place holds values of its own, so
    a tile given a crop from another place shows it (the family matrix's correspondence test)."""
    v = rand(*shape, seed=seed, scale=scale)
    h, w = shape[-2:]
    v[:, 0] = torch.arange(h, dtype=v.dtype)[:, None] / h * scale
    v[:, 1] = torch.arange(w, dtype=v.dtype)[None, :] / w * scale
    return v


def place_mask(h=16, w=16, frames=None, scale=8, seed=8):
    """A binary mask (1 = regenerate) at ``scale`` px per latent px, constant on each latent px, in which
    every 4 x 4 block of latent px differs from every other (the first seed from ``seed`` that gives it).
    ComfyUI rounds masks, so the place is coded in the pattern.  [1, h*scale, w*scale] or [1, 1, frames, ...]."""
    for s in itertools.count(seed):
        bits = (rand(h, w, seed=s) > 0).float()
        blocks = bits.unfold(0, 4, 1).unfold(1, 4, 1).reshape(-1, 16)
        if torch.unique(blocks, dim=0).shape[0] == blocks.shape[0]:
            break
    m = bits.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None]
    return m if frames is None else m[:, None, None].expand(1, 1, frames, *m.shape[-2:]).contiguous()


def ramp_mask(h=16, w=16, frames=1):
    """A mask the model reads as values (LTXV's per-token timesteps, Wan 2.2's per-frame means) coded with
    its places: (row * w + col + 1) / (h * w + 1), in (0, 1).  [1, 1, frames, h, w]."""
    v = (torch.arange(h * w, dtype=torch.float32).reshape(h, w) + 1) / (h * w + 1)
    return v.expand(1, 1, frames, h, w).contiguous()


def latent(fmt, h=16, w=16, frames=None):
    ch = fmt.latent_channels
    if frames is None:
        return rand(1, ch, h, w, seed=5)
    return rand(1, ch, frames, h, w, seed=5)


# Values of params-dataclass fields that newer ComfyUI versions require (FLUX.1/Chroma: no text id
# axes; HunyuanVideo: no mean-flow sum); older versions lack the fields and they are dropped.
DATACLASS_DEFAULTS = {"txt_ids_dims": [], "meanflow_sum": False, "vec_in_dim": None, "use_x0": False,
                      "use_sequential_txt_ids": False}


def dataclass_config(cls, cfg, defaults=None):
    """``cfg`` for a params dataclass: required fields this ComfyUI adds taken from ``defaults`` (or
    :data:`DATACLASS_DEFAULTS`); fields it does not know dropped (feature detection both ways)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return fx.complete_dataclass_config(cls, {k: v for k, v in cfg.items() if k in names},
                                        {**DATACLASS_DEFAULTS, **(defaults or {})})


# --------------------------------------------------------------------------- builders

BUILDERS: dict = {}


def family(*names):
    def deco(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn
    return deco


def tiny(name: str) -> Tiny:
    """The tiny model of family ``name`` of the running ComfyUI."""
    import comfy.supported_models as sm
    cls = next(m for m in sm.models if m.__name__ == name)
    return BUILDERS[name](cls)


# ---- UNet families (SD1.x/2.x, SDXL and their variants)

def _unet_cfg(context_dim=64, in_channels=4, adm=None, **kw):
    cfg = fx.tiny_sd15_unet_config(context_dim, in_channels=in_channels)
    cfg.update(adm_in_channels=adm)
    if adm:
        cfg["num_classes"] = "sequential"
    cfg.update(kw)
    return cfg


@family("SD15", "SD20", "SD15_instructpix2pix", "Stable_Zero123", "LotusD")
def _sd15(cls):
    # SD1.5 as an inpainting model (9 channels: latent + mask + masked image, concat_keys of set_inpaint)
    in_ch = 9 if cls.__name__ == "SD15" else cls.unet_config.get("in_channels", 4)
    cfg = _unet_cfg(in_channels=in_ch, adm=cls.unet_config.get("adm_in_channels"),
                    use_linear_in_transformer=cls.unet_config.get("use_linear_in_transformer", False))
    if cls.__name__ == "SD20":
        cfg["context_dim"] = 64
    m = build(cls, cfg, after=dict(num_heads=2, num_head_channels=-1))
    pos, neg = conds(64, pooled=64)
    if in_ch == 9:      # inpainting: the image and its pixel mask, cropped per tile as c_concat
        for c in (pos, neg):
            c[0][1].update(concat_latent_image=coded(1, 4, 16, 16), concat_mask=place_mask())
    if in_ch == 8:      # instruct-pix2pix / zero123: concat_latent_image (the image being edited)
        for c in (pos, neg):
            c[0][1]["concat_latent_image"] = coded(1, 4, 16, 16)
        if cls.__name__ == "Stable_Zero123":
            for c in (pos, neg):
                c[0][0] = rand(1, 1, 64, seed=3)
    return Tiny(m, pos, neg, latent(m.model.latent_format))


# ---- FLUX-style double/single-stream transformers

def _flux_cfg(**kw):
    from comfy.ldm.flux.model import FluxParams
    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
               theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    cfg.update(kw)
    return dataclass_config(FluxParams, cfg, {"txt_ids_dims": []}) | {"image_model": cfg["image_model"]}


@family("Flux", "FluxSchnell", "FluxInpaint")
def _flux(cls):
    inpaint = cls.unet_config.get("in_channels") == 96
    m = build(cls, _flux_cfg(in_channels=96 if inpaint else 16,
                             guidance_embed=cls.unet_config.get("guidance_embed", True)))
    extra = {"guidance": 2.5}
    if inpaint:     # FLUX Fill: the image being inpainted and its pixel mask, cropped per tile
        extra.update(concat_latent_image=coded(1, 16, 16, 16), concat_mask=place_mask()[:, None])
    pos, neg = conds(64, pooled=64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("Flux2")
def _flux2(cls):
    # FLUX.2: 128-channel latents (the 32-channel VAE latent packed 2x2, 16x), tokenised 1x1
    cfg = _flux_cfg(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, axes_dim=[8, 8, 8, 8],
                    num_heads=2, hidden_size=64, mlp_ratio=3.0, theta=2000, patch_size=1, qkv_bias=False,
                    guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
                    default_ref_method="index", ref_index_scale=10.0)
    m = build(cls, cfg)
    ref = rand(1, 128, 6, 4, seed=9)
    pos, neg = conds(64, pooled=64, guidance=2.5, reference_latents=[ref])
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(1, 1))


def _chroma_cfg(**kw):
    cfg = dict(in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=2,
               depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
               in_dim=64, out_dim=64, hidden_dim=64, n_layers=1)
    cfg.update(kw)
    return cfg


@family("Chroma")
def _chroma(cls):
    import comfy.ldm.chroma.model as cm
    cfg = dataclass_config(cm.ChromaParams, _chroma_cfg())
    m = build(cls, dict(cfg, image_model="chroma"))
    pos, neg = conds(64, pooled=64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("ChromaRadiance")
def _chroma_radiance(cls):
    # pixel space (1x): 3 channels, 16x16 px patches decoded by a small per-pixel NeRF head
    import comfy.ldm.chroma_radiance.model as crm
    cfg = _chroma_cfg(in_channels=3, out_channels=3, patch_size=16, nerf_hidden_size=16, nerf_mlp_ratio=2,
                      nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="conv",
                      nerf_embedder_dtype=torch.float32)
    cfg = dataclass_config(crm.ChromaRadianceParams, cfg)
    m = build(cls, dict(cfg, image_model="chroma_radiance"))
    pos, neg = conds(64, pooled=64)
    return Tiny(m, pos, neg, latent(m.model.latent_format, 96, 96), patch=(16, 16), tile=32)


@family("HiDream")
def _hidream(cls):
    # pooled vector y, T5 tokens (context) and per-layer Llama tokens [B, layers, tokens, dim]
    cfg = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
               num_single_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 48],
               text_emb_dim=64, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[16, 8, 8],
               max_resolution=[128, 128], llama_layers=[0, 1])
    m = build(cls, cfg)
    # (HiDream-E1's source image, placed beside the latent, takes full-width tiles: test_positional_inputs.py)
    pos, neg = conds(64, pooled=64, conditioning_llama3=lambda s: rand(1, 2, 6, 48, seed=s + 20))
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


# ---- single-stream / Lumina-style

@family("Lumina2", "ZImage")
def _lumina2(cls):
    z = cls.__name__ == "ZImage"
    # Z-Image modulates with min(dim, 256) features from a 256-wide timestep embedding: dim >= 256
    cfg = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256 if z else 64, n_layers=1, n_refiner_layers=1,
               n_heads=8 if z else 2, n_kv_heads=8 if z else 2, multiple_of=16, ffn_dim_multiplier=1.0, qk_norm=True,
               cap_feat_dim=64,
               axes_dims=[8, 12, 12], axes_lens=[64, 64, 64], rope_theta=256.0 if z else 10000.0)
    if z:
        cfg.update(z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
    m = build(cls, cfg)
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("QwenImage")
def _qwen_image(cls):
    cfg = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1,
               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=[8, 12, 12])
    m = build(cls, cfg)
    # Qwen-Image-Edit: a reference latent of the canvas's size (cropped to each tile), 5-D as its VAE encodes
    # it; where each tile meets it: test_reference_positions.py
    pos, neg = conds(64, reference_latents=[rand(1, 16, 1, 16, 16, seed=9)])
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


# ---- Hunyuan video / image

def _hunyuan_cfg(**kw):
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
    cfg = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
               theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
               use_cond_type_embedding=False, vision_in_dim=None)
    cfg.update(kw)
    return dataclass_config(HunyuanVideoParams, cfg) | {"image_model": "hunyuan_video"}


@family("HunyuanImage21")
def _hunyuan_image21(cls):
    # 32x, 64 channels, 2-D latent, 1x1 patches, byT5 glyph tokens
    cfg = _hunyuan_cfg(in_channels=64, out_channels=64, vec_in_dim=None, patch_size=[1, 1], axes_dim=[16, 16],
                       byt5=True)
    m = build(cls, cfg)
    pos, neg = conds(64, pooled=64, conditioning_byt5small=lambda s: rand(1, 4, 1472, seed=s + 30))
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(1, 1))


# ---- Cosmos Predict2 (Anima)

@family("CosmosT2IPredict2", "CosmosI2VPredict2")
def _cosmos_predict2(cls):
    in_ch = cls.unet_config.get("in_channels", 16)
    cfg = dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=in_ch,
               out_channels=16, patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64,
               num_blocks=1, num_heads=2, mlp_ratio=2.0, crossattn_emb_channels=64, pos_emb_cls="rope3d",
               pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True,
               adaln_lora_dim=16, rope_h_extrapolation_ratio=1.0, rope_w_extrapolation_ratio=1.0,
               rope_t_extrapolation_ratio=1.0, extra_per_block_abs_pos_emb=False, rope_enable_fps_modulation=False)
    m = build(cls, cfg)
    extra = {"concat_mask": place_mask(frames=1)} if in_ch > 16 else {}       # I2V: mask_inverted + timesteps per frame
    pos, neg = conds(64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=1), patch=(2, 2), frames=1)


# ---- LTXV

@family("LTXV")
def _ltxv(cls):
    cfg = dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32,
               num_attention_heads=2, caption_channels=64, num_layers=1)
    m = build(cls, cfg)
    # a conditioning mask (per-token timesteps from the cropped mask)
    pos, neg = conds(64, frame_rate=25, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     concat_mask=ramp_mask(frames=2))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(1, 1), frames=2)


# ---- WAN

def _wan_cfg(**kw):
    cfg = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64,
               ffn_dim=128, freq_dim=32, text_dim=64, out_dim=16, num_heads=2, num_layers=1)
    cfg.update(kw)
    return cfg


@family("WAN21_T2V")
def _wan21(cls):
    m = build(cls, _wan_cfg())
    # Phantom subject images (WanPhantomSubjectToVideo): latents of the canvas's size, concatenated along time
    pos, neg = conds(64, time_dim_concat=coded(1, 16, 1, 16, 16))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN22_T2V")
def _wan22(cls):
    # Wan 2.2 5B: 48 channels at 16x; with an inpainting noise mask, the timestep is per frame (its mean)
    m = build(cls, _wan_cfg(in_dim=48, out_dim=48))
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(2, 2), frames=2,
                extra={"noise_mask": ramp_mask(frames=2)})


# ---- SD3

@family("SD3")
def _sd3(cls):
    cfg = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
               pos_embed_max_size=32, num_patches=32 * 32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])
    m = build(cls, cfg)
    pos, neg = conds(64, pooled=64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


# ---- more UNet variants

@family("SD21UnclipL", "SD21UnclipH")
def _sd21_unclip(cls):
    cfg = _unet_cfg(adm=64, use_linear_in_transformer=True)
    m = build(cls, cfg, after=dict(num_heads=2, num_head_channels=-1))
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format))


@family("Stable_Zero123")
def _zero123(cls):
    # novel-view model: concat_latent_image (the input view) and a projected CLIP-image + pose token
    sd = {"cc_projection.weight": rand(64, 68, seed=3, scale=0.1), "cc_projection.bias": torch.zeros(64)}
    m = build(cls, _unet_cfg(in_channels=8), after=dict(num_heads=2, num_head_channels=-1), state_dict=sd)
    pos, neg = conds(68, tokens=1, concat_latent_image=coded(1, 4, 16, 16))
    return Tiny(m, pos, neg, latent(m.model.latent_format))


def _sdxl_cfg(in_channels=4, adm=64 + 6 * 256):
    return _unet_cfg(in_channels=in_channels, adm=adm, use_linear_in_transformer=True, num_classes="sequential")


@family("SDXL", "SSD1B", "KOALA_700M", "KOALA_1B", "Segmind_Vega", "SDXL_instructpix2pix")
def _sdxl(cls):
    ip2p = cls.unet_config.get("in_channels") == 8
    m = build(cls, _sdxl_cfg(8 if ip2p else 4), after=dict(num_heads=2, num_head_channels=-1))
    extra = {"concat_latent_image": coded(1, 4, 16, 16)} if ip2p else {}
    pos, neg = conds(64, pooled=64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format))


@family("SDXLRefiner")
def _sdxl_refiner(cls):
    m = build(cls, _sdxl_cfg(adm=64 + 5 * 256), after=dict(num_heads=2, num_head_channels=-1))
    pos, neg = conds(64, pooled=64)
    return Tiny(m, pos, neg, latent(m.model.latent_format))


@family("SD_X4Upscaler")
def _sd_x4(cls):
    # 4 latent + 3 image channels: the low-resolution image (concat_image), cropped per tile
    cfg = _unet_cfg(in_channels=7, use_linear_in_transformer=True)
    m = build(cls, cfg, after=dict(num_heads=2, num_head_channels=-1, num_classes=1000,
                                   disable_self_attentions=[True, False]))
    pos, neg = conds(64, concat_image=coded(1, 3, 16, 16, scale=0.5))
    return Tiny(m, pos, neg, latent(m.model.latent_format))


@family("SVD_img2vid", "SV3D_u", "SV3D_p")
def _svd(cls):
    # video UNet: the frames are the batch (num_video_frames), temporal layers mix them
    adm = cls.unet_config["adm_in_channels"]
    cfg = _unet_cfg(in_channels=8, adm=adm, use_linear_in_transformer=True, use_temporal_attention=True,
                    use_temporal_resblock=True, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                    transformer_depth_middle=1, extra_ff_mix_layer=True, use_spatial_context=True,
                    merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
                    disable_temporal_crossattention=False, max_ddpm_temb_period=10000)
    m = build(cls, cfg, after=dict(num_heads=2, num_head_channels=-1))
    pos, neg = conds(64, tokens=1, concat_latent_image=coded(1, 4, 16, 16))
    lat = rand(3, 4, 16, 16, seed=5)        # 3 frames
    return Tiny(m, pos, neg, lat[:1], note="frames are the batch", extra={"frames_batch": 3})


# ---- Stable Cascade

@family("Stable_Cascade_C")
def _cascade_c(cls):
    cfg = dict(stable_cascade_stage="c", c_in=16, c_out=16, c_r=32, patch_size=1, c_cond=64, c_hidden=[32, 64],
               nhead=[2, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
               c_clip_text=64, c_clip_text_pooled=64, c_clip_img=768, c_clip_seq=2, self_attn=True,
               switch_level=[False])
    m = build(cls, cfg)
    pos, neg = conds(64, pooled=64)
    for c in (pos, neg):
        c[0][1]["pooled_output"] = c[0][1]["pooled_output"][:, None]
    return Tiny(m, pos, neg, latent(m.model.latent_format))


@family("Stable_Cascade_B")
def _cascade_b(cls):
    # stage B: 4x latents; 'effnet' is the stage-C latent, spatial at another scale (~1/10.7 of this latent)
    cfg = dict(stable_cascade_stage="b", c_in=4, c_out=4, c_r=32, patch_size=4, c_cond=64, c_hidden=[32, 64],
               nhead=[-1, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"],
               c_clip=64, c_clip_seq=2, c_effnet=16, c_pixels=3, self_attn=True)
    m = build(cls, cfg)
    prior = coded(1, 16, 6, 6)
    pos, neg = conds(64, pooled=64, stable_cascade_prior=prior)
    for c in (pos, neg):
        c[0][1]["pooled_output"] = c[0][1]["pooled_output"][:, None]
    return Tiny(m, pos, neg, latent(m.model.latent_format, 64, 64), patch=(4, 4), tile=32)


# ---- DiTs of the SD3 era

@family("AuraFlow")
def _auraflow(cls):
    cfg = dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2, n_double_layers=1, n_heads=2,
               global_conddim=64, cond_seq_dim=64, max_seq=64)
    m = build(cls, cfg)
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("PixArtAlpha", "PixArtSigma")
def _pixart(cls):
    alpha = cls.__name__ == "PixArtAlpha"
    # PixArt's positional embedding needs (h + w) / 2 >= 32 latent px (base size round(c_res / 64) * 64)
    # (alpha's micro-conditioning embeds size and aspect ratio in hidden_size / 3 each: 96)
    cfg = dict(image_model=cls.unet_config["image_model"], input_size=32, patch_size=2, in_channels=4,
               hidden_size=96, depth=1, num_heads=2, caption_channels=64, model_max_length=8, pe_interpolation=0.5,
               micro_condition=alpha)
    m = build(cls, cfg)
    extra = {"width": 512, "height": 512} if alpha else {}
    pos, neg = conds(64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, 64, 64), patch=(2, 2), tile=16)


@family("HunyuanDiT", "HunyuanDiT1")
def _hunyuan_dit(cls):
    v1 = cls.__name__ == "HunyuanDiT1"
    cfg = dict(image_model=cls.unet_config["image_model"], input_size=(32, 32), patch_size=2, in_channels=4,
               hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0, text_states_dim=64, text_states_dim_t5=48,
               text_len=8, text_len_t5=6, size_cond=v1, use_style_cond=v1)
    m = build(cls, cfg)
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     conditioning_mt5xl=lambda s: rand(1, 6, 48, seed=s + 40),
                     attention_mask_mt5xl=torch.ones(1, 6, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


# ---- video DiTs

@family("GenmoMochi")
def _mochi(cls):
    # Mochi asserts its MLP width (1536 * 8): hidden 64 x ratio 192
    cfg = dict(image_model="mochi_preview", depth=1, patch_size=2, num_heads=2, hidden_size_x=64, hidden_size_y=32,
               mlp_ratio_x=192.0, mlp_ratio_y=2.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
               out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
               timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=64,
               t5_token_length=8, rope_theta=10000.0)
    m = build(cls, cfg)
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(2, 2), frames=2)


@family("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V")
def _hunyuan_video(cls):
    in_ch = cls.unet_config.get("in_channels", 16)
    m = build(cls, _hunyuan_cfg(in_channels=in_ch, vec_in_dim=64))
    extra = {"guidance": 6.0}
    if in_ch > 16:      # image-to-video: the start image latent (and its mask), concatenated
        extra["concat_latent_image"] = coded(1, 16, 2, 16, 16)
    pos, neg = conds(64, pooled=64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(2, 2), frames=2)


@family("HunyuanVideo15", "HunyuanVideo15_SR_Distilled")
def _hunyuan_video15(cls):
    # 32 channels at 16x; concat image + mask (65 channels in, 98 for the super-resolution model)
    sr = cls.__name__.endswith("SR_Distilled")
    in_ch = 98 if sr else 65
    cfg = _hunyuan_cfg(in_channels=in_ch, out_channels=32, vec_in_dim=None, byt5=True, vision_in_dim=48, patch_size=[1, 1, 1],
                       use_cond_type_embedding=True, meanflow=sr)
    m = build(cls, cfg)
    pos, neg = conds(64, pooled=64, conditioning_byt5small=lambda s: rand(1, 4, 1472, seed=s + 30))
    if not sr:          # image-to-video: the start image latent and its mask, concatenated
        for c in (pos, neg):
            c[0][1].update(concat_latent_image=coded(1, 32, 2, 16, 16), concat_mask=place_mask(frames=2))
    if sr:
        for c in (pos, neg):
            c[0][1]["concat_latent_image"] = coded(1, 66, 2, 16, 16)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(1, 1), frames=2)


@family("HunyuanImage21Refiner")
def _hunyuan_image21_refiner(cls):
    # sampled on an empty latent (HunyuanRefinerLatent, 64 channels); the image being refined comes as
    # concat_latent_image, which the latent format packs 2 frames to 128 channels
    cfg = _hunyuan_cfg(in_channels=192, out_channels=64, vec_in_dim=None, patch_size=[1, 1, 1])
    m = build(cls, cfg)
    pos, neg = conds(64, pooled=64, concat_latent_image=coded(1, 64, 1, 16, 16))
    return Tiny(m, pos, neg, torch.zeros(1, 32, 1, 16, 16), patch=(1, 1), frames=1)


@family("CosmosT2V", "CosmosI2V")
def _cosmos1(cls):
    in_ch = cls.unet_config.get("in_channels", 16)
    cfg = dict(image_model="cosmos", max_img_h=240, max_img_w=240, max_frames=128, in_channels=in_ch,
               out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, block_config="FA-CA-MLP",
               num_blocks=1, num_heads=2, mlp_ratio=2.0, concat_padding_mask=True, crossattn_emb_channels=64,
               pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop", block_x_format="THWBD",
               affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=True,
               extra_per_block_abs_pos_emb_type="learnable")
    m = build(cls, cfg)
    extra = {"concat_mask": place_mask(frames=2)} if in_ch > 16 else {}       # I2V: the inverted mask, concatenated
    pos, neg = conds(64, frame_rate=24, attention_mask=torch.ones(1, 8, dtype=torch.long), **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(2, 2), frames=2)


@family("WAN21_I2V", "WAN21_FunControl2V", "WAN22_Camera", "WAN21_Camera")
def _wan_i2v(cls):
    in_dim = cls.unet_config["in_dim"]
    mt = cls.unet_config["model_type"]
    cfg = _wan_cfg(model_type=mt, in_dim=in_dim)
    if mt.startswith("camera"):
        cfg["in_dim_control_adapter"] = 24
    m = build(cls, cfg)
    # I2V / camera: start image latent (+ 4 mask channels the model adds); Fun-Control: control video + image
    extra = {"concat_latent_image": coded(1, 32 if in_dim == 48 else 16, 3, 16, 16)}
    if cls.__name__ == "WAN21_I2V":     # an inpainting mask and CLIP-vision image tokens (whole per tile)
        import types
        extra.update(concat_mask=place_mask(frames=3),
                     clip_vision_output=types.SimpleNamespace(penultimate_hidden_states=rand(1, 4, 1280, seed=6)))
    if mt.startswith("camera"):     # camera: Plucker embeddings per pixel (8x the latent), cropped per tile
        extra["camera_conditions"] = coded(1, 24, 3, 128, 128, seed=8, scale=0.1)
    pos, neg = conds(64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN21_Vace")
def _wan_vace(cls):
    cfg = _wan_cfg(model_type="vace", vace_layers=1, vace_in_dim=96)
    m = build(cls, cfg)
    # vace_frames: the control video (latent + mask), cropped per tile
    pos, neg = conds(64, vace_frames=[coded(1, 32, 3, 16, 16)], vace_mask=[torch.ones(1, 64, 3, 16, 16)],
                     vace_strength=[1.0])
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN21_HuMo")
def _wan_humo(cls):
    m = build(cls, _wan_cfg(model_type="humo", in_dim=36, audio_token_num=4))
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN22_S2V")
def _wan_s2v(cls):
    cfg = _wan_cfg(model_type="s2v", audio_dim=32, num_audio_token=2, enable_adain=True, cond_dim=16,
                   audio_inject_layers=[0], adain_mode="attn_norm", framepack_drop_mode="padd")
    m = build(cls, cfg)
    # control video (added after the patch embedding) and motion frames (FramePackMotioner), canvas-sized; tiles
    # on its 8-px grid (model_families.TILE_ALIGN: the motion frames' coarsest stream): a 32 x 32 canvas
    pos, neg = conds(64, reference_latents=[rand(1, 16, 1, 32, 32, seed=9)], control_video=coded(1, 16, 3, 32, 32),
                     reference_motion=coded(1, 16, 4, 32, 32, seed=8))
    return Tiny(m, pos, neg, latent(m.model.latent_format, 32, 32, frames=3), patch=(2, 2), frames=3, tile=16)


@family("WAN22_Animate")
def _wan_animate(cls):
    m = build(cls, _wan_cfg(model_type="animate", in_dim=36, motion_encoder_dim=32))
    # the start image and the pose video (full resolution, added to frames 1.. after the patch embedding)
    pos, neg = conds(64, concat_latent_image=coded(1, 16, 3, 16, 16), pose_video_latent=coded(1, 16, 2, 16, 16, seed=8))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("Omnigen2")
def _omnigen2(cls):
    cfg = dict(image_model="omnigen2", patch_size=2, in_channels=16, out_channels=None, hidden_size=64,
               num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
               ffn_dim_multiplier=None, axes_dim_rope=[8, 12, 12], axes_lens=[64, 64, 64], text_feat_dim=64,
               timestep_scale=1000.0)
    m = build(cls, cfg)
    # a reference of the canvas's size (cropped to each tile: test_reference_positions.py)
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     reference_latents=[rand(1, 16, 16, 16, seed=9)])
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


# ---- families of newer ComfyUI versions (each builder only runs where ComfyUI has the family)

@family("LongCatImage")
def _longcat(cls):
    # FLUX architecture with 3-axis text ids, no pooled vector, no guidance
    cfg = _flux_cfg(guidance_embed=False, vec_in_dim=None, context_in_dim=64, txt_ids_dims=[1, 2])
    m = build(cls, cfg)
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("Lens")
def _lens(cls):
    # Flux.2 latents (128 channels, the 2x2 patch packed in the channels); text features of 2 encoder layers
    cfg = dict(image_model="lens", patch_size=2, in_channels=128, out_channels=32, num_layers=1,
               attention_head_dim=32, num_attention_heads=2, enc_hidden_dim=32, axes_dims_rope=[8, 12, 12],
               multi_layer_encoder_feature=True, selected_layer_index=[0, 1])
    m = build(cls, cfg)
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(1, 1))


@family("ZImagePixelSpace")
def _zimage_pixel(cls):
    # Z-Image in pixel space (1x): 3 channels, 16 px patches decoded by a small per-pixel decoder
    cfg = dict(image_model="zimage_pixel", patch_size=16, in_channels=3, dim=256, n_layers=1, n_refiner_layers=1,
               n_heads=8, n_kv_heads=8, multiple_of=16, ffn_dim_multiplier=1.0, qk_norm=True, cap_feat_dim=64,
               axes_dims=[8, 12, 12], axes_lens=[64, 64, 64], rope_theta=256.0, z_image_modulation=True,
               time_scale=1000.0, pad_tokens_multiple=32, decoder_hidden_size=32, decoder_num_res_blocks=1,
               decoder_max_freqs=4, decoder_in_channels=3 * 16 * 16)
    m = build(cls, cfg)
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format, 96, 96), patch=(16, 16), tile=32)


def _pixeldit_cfg(**kw):
    cfg = dict(image_model="pixeldit_t2i", in_channels=3, num_groups=2, hidden_size=64, pixel_hidden_size=8,
               pixel_attn_hidden_size=32, pixel_num_groups=2, patch_depth=1, pixel_depth=1, patch_size=16,
               txt_embed_dim=64, txt_max_length=16)
    cfg.update(kw)
    return cfg


@family("PixelDiTT2I")
def _pixeldit(cls):
    m = build(cls, _pixeldit_cfg())
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format, 96, 96), patch=(16, 16), tile=32)


@family("PiD")
def _pid(cls):
    # PixelDiT super-resolution: the low-quality latent (1/32 of the pixels here) is spatial at another scale
    m = build(cls, dict(_pixeldit_cfg(image_model="pid"), lq_latent_channels=16, lq_hidden_dim=32,
                        lq_num_res_blocks=1, sr_scale=4, latent_spatial_down_factor=8))
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     lq_latent=coded(1, 16, 3, 3), degrade_sigma=torch.zeros(1))
    return Tiny(m, pos, neg, latent(m.model.latent_format, 96, 96), patch=(16, 16), tile=32)


@family("WAN21_CausalAR_T2V", "WAN21_FlowRVS")
def _wan_variants(cls):
    m = build(cls, _wan_cfg(model_type=cls.unet_config.get("model_type", "t2v")))
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN21_SCAIL", "WAN21_SCAIL2")
def _wan_scail(cls):
    scail2 = cls.__name__ == "WAN21_SCAIL2"
    cfg = _wan_cfg(model_type=cls.unet_config["model_type"], in_dim=20)
    if scail2:
        cfg["mask_in_dim"] = 28
    m = build(cls, cfg)
    # the pose video latent at half resolution, as WanSCAILToVideo encodes it (cropped per tile; one pose token
    # per 4 latent px), and a reference image (time-concatenated to the latent: cropped per tile)
    extra = {}
    if scail2:      # the identity masks: of the pose video (half resolution) and of reference + video frames
        extra = {"driving_mask_28ch": coded(1, 28, 3, 8, 8, seed=10).movedim(1, 2),
                 "ref_mask_28ch": coded(1, 28, 4, 16, 16, seed=11).movedim(1, 2)}
    pos, neg = conds(64, pose_video_latent=coded(1, 16, 3, 8, 8), reference_latents=[rand(1, 16, 1, 16, 16, seed=9)],
                     **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("WAN22_WanDancer")
def _wan_dancer(cls):
    cfg = _wan_cfg(model_type="wandancer", in_dim=36, audio_inject_layers=[0], music_dim=16, music_heads=2,
                   music_feature_dim=8, music_latent_dim=16)
    m = build(cls, cfg)
    pos, neg = conds(64, concat_latent_image=coded(1, 16, 3, 16, 16))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=3), patch=(2, 2), frames=3)


@family("SeedVR2")
def _seedvr2(cls):
    # video restoration: 'condition' (the degraded video's latent + a mask channel) is cropped per tile
    cfg = dict(image_model="seedvr2", norm_eps=1e-5, num_layers=2, mlp_type="swiglu", vid_in_channels=33,
               vid_out_channels=16, vid_dim=64, txt_in_dim=64, heads=2, head_dim=32, mm_layers=1, expand_ratio=2,
               patch_size=(1, 2, 2), rope_dim=16, vid_out_norm=True)
    sd = {"positive_conditioning": rand(8, 64, seed=1), "negative_conditioning": rand(8, 64, seed=2)}
    m = build(cls, cfg, state_dict=sd)
    pos, neg = conds(64, condition=coded(1, 17, 1, 16, 16))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=1), patch=(2, 2), frames=1)


@family("Boogu")
def _boogu(cls):
    cfg = dict(image_model="boogu", patch_size=2, in_channels=16, hidden_size=64, num_layers=2,
               num_double_stream_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2,
               multiple_of=16, axes_dim_rope=[8, 12, 12], axes_lens=[64, 64, 64], instruction_feat_dim=64)
    m = build(cls, cfg)
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     reference_latents=[rand(1, 16, 16, 16, seed=9)])
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(2, 2))


@family("JoyImage")
def _joyimage(cls):
    cfg = dict(image_model="joyimage", patch_size=[1, 2, 2], in_channels=16, hidden_size=64, num_attention_heads=2,
               text_dim=64, mlp_width_ratio=2.0, num_layers=1)
    m = build(cls, cfg, after=dict(rope_dim_list=[8, 12, 12], theta=10000))
    pos, neg = conds(64, reference_latents=[rand(1, 16, 1, 16, 16, seed=9)])
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=1), patch=(2, 2), frames=1)


@family("Ideogram4")
def _ideogram4(cls):
    # Flux.2 latents (128 channels = 32 x a 2x2 patch packed in the channels)
    m = build(cls, dict(image_model="ideogram4", in_channels=128, num_layers=1),
              after=dict(num_attention_heads=2, attention_head_dim=32, intermediate_size=128, adaln_dim=32,
                         llm_features_dim=64, mrope_section=[4, 6, 6]))
    pos, neg = conds(64, attention_mask=torch.ones(1, 8, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(1, 1))


@family("Krea2")
def _krea2(cls):
    cfg = dict(image_model="krea2", features=64, tdim=32, txtdim=64, heads=2, kvheads=2, multiplier=2, layers=1,
               patch=2, channels=16, txtlayers=1, txtheads=2, txtkvheads=2)
    m = build(cls, cfg)
    # Krea 2 reads its references only with a method set (its default is None)
    pos, neg = conds(64, reference_latents=[rand(1, 16, 1, 16, 16, seed=9)], reference_latents_method="index")
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=1), patch=(2, 2), frames=1)


@family("Kandinsky5", "Kandinsky5Image")
def _kandinsky5(cls):
    image = cls.__name__ == "Kandinsky5Image"
    cfg = dict(image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=64, in_text_dim2=64,
               time_dim=32, model_dim=64, ff_dim=128, visual_embed_dim=(16 if image else 33) * 4, patch_size=(1, 2, 2),
               num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12))
    m = build(cls, cfg)
    extra = {} if image else {"concat_mask": place_mask(frames=2), "time_dim_replace": coded(1, 16, 1, 16, 16)}
    pos, neg = conds(64, pooled=64, attention_mask=torch.ones(1, 8, dtype=torch.long), **extra)
    frames = 1 if image else 2
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=None if image else frames), patch=(2, 2),
                frames=None if image else frames)


@family("Anima")
def _anima(cls):
    # Cosmos Predict2 (patch_spatial 2) with an LLM adapter for its text
    cfg = dict(image_model="anima", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
               patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=1,
               num_heads=2, mlp_ratio=2.0, crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True,
               pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16,
               extra_per_block_abs_pos_emb=False, rope_enable_fps_modulation=False)
    m = build(cls, cfg, gain=0.5)
    pos, neg = conds(1024)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=1), patch=(2, 2), frames=1)


@family("ErnieImage")
def _ernie(cls):
    cfg = dict(image_model="ernie", hidden_size=64, num_attention_heads=2, num_layers=1, ffn_hidden_size=128,
               in_channels=128, out_channels=128, patch_size=1, text_in_dim=64, rope_axes_dim=(8, 12, 12))
    m = build(cls, cfg)
    pos, neg = conds(64)
    return Tiny(m, pos, neg, latent(m.model.latent_format), patch=(1, 1))


@family("CogVideoX_T2V", "CogVideoX_I2V", "CogVideoX_Inpaint")
def _cogvideox(cls):
    in_ch = cls.unet_config.get("in_channels", 16)
    cfg = dict(image_model="cogvideox", num_attention_heads=2, attention_head_dim=32, in_channels=in_ch,
               out_channels=16, time_embed_dim=32, text_embed_dim=64, num_layers=1, sample_width=16,
               sample_height=16, sample_frames=5, patch_size=2, max_text_seq_length=8,
               use_rotary_positional_embeddings=True)
    m = build(cls, cfg)
    extra = {"concat_latent_image": coded(1, 16, 2, 16, 16)} if in_ch > 16 else {}
    pos, neg = conds(64, **extra)
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(2, 2), frames=2)


@family("LTXAV")
def _ltxav(cls):
    # the audio-video model on a video latent (a joint audio-video latent is a packed 1-D sequence: refused)
    cfg = dict(image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=64,
               audio_cross_attention_dim=64, attention_head_dim=32, audio_attention_head_dim=16,
               num_attention_heads=2, audio_num_attention_heads=2, caption_channels=64, num_layers=1,
               connector_attention_head_dim=16, connector_num_attention_heads=2, connector_num_layers=1)
    m = build(cls, cfg)
    # text already through its connectors: video (64) + audio (64) features
    pos, neg = conds(128, frame_rate=25, attention_mask=torch.ones(1, 8, dtype=torch.long))
    return Tiny(m, pos, neg, latent(m.model.latent_format, frames=2), patch=(1, 1), frames=2)
