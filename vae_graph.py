"""Which VAEs the exact tiled path can run, and their networks as stage lists (``vae_stages``).

The exact path takes ComfyUI's ``AutoencodingEngine`` family (``AutoencoderKL``: SD1.x/SD2, SDXL,
SD3, FLUX, the x4-upscaler VAE, the batch-norm-latent Flux2-style VAE) whose encoder/decoder are
exactly ComfyUI's 2-D ``Encoder`` / ``Decoder``. Everything is feature-detected from the module
tree (no version checks): a class or layer shape the stages do not reproduce exactly is reported as
the reason to fall back to ComfyUI's own tiled VAE.
"""
from __future__ import annotations

import torch

from . import self_check
from .vae_stages import Stage


def _model_module():
    import comfy.ldm.modules.diffusionmodules.model as m
    return m


def _conv_ok(conv, kernel: int, stride: int, padding: int) -> bool:
    """A plain 2-D convolution of this square kernel, stride and symmetric zero padding."""
    return (isinstance(conv, torch.nn.Conv2d) and tuple(conv.kernel_size) == (kernel, kernel)
            and tuple(conv.stride) == (stride, stride) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and getattr(conv, "padding_mode", "zeros") == "zeros"
            and tuple(conv.padding) == (padding, padding))


def _norm_ok(norm) -> bool:
    return isinstance(norm, torch.nn.GroupNorm) and norm.num_channels % norm.num_groups == 0


def _resblock_problem(block, m) -> str | None:
    if type(block) is not m.ResnetBlock:
        return f"a {type(block).__name__} block"
    if not (_norm_ok(block.norm1) and _norm_ok(block.norm2) and _conv_ok(block.conv1, 3, 1, 1)
            and _conv_ok(block.conv2, 3, 1, 1)):
        return "a residual block with other layers"
    if block.in_channels != block.out_channels:
        if getattr(block, "use_conv_shortcut", False):
            if not _conv_ok(getattr(block, "conv_shortcut", None), 3, 1, 1):
                return "a residual block with another shortcut"
        elif not _conv_ok(getattr(block, "nin_shortcut", None), 1, 1, 0):
            return "a residual block with another shortcut"
    return None


def _attn_problem(attn, m) -> str | None:
    if type(attn) is not m.AttnBlock:
        return f"a {type(attn).__name__} attention block"
    projections = [getattr(attn, k, None) for k in ("q", "k", "v", "proj_out")]
    if not (_norm_ok(attn.norm) and all(_conv_ok(p, 1, 1, 0) for p in projections)):
        return "an attention block with other layers"
    return None


def _levels_problem(levels, m, resample: str) -> str | None:
    for i, level in enumerate(levels):
        for block in level.block:
            bad = _resblock_problem(block, m)
            if bad:
                return bad
        if len(level.attn):
            return "attention inside the resolution levels"
        r = getattr(level, resample, None)
        if r is None:
            continue
        if resample == "downsample":
            if type(r) is not m.Downsample:
                return f"a {type(r).__name__} downsampler"
            if r.with_conv and not _conv_ok(r.conv, 3, 2, 0):
                return "a downsampler with another convolution"
        else:
            if type(r) is not m.Upsample:
                return f"a {type(r).__name__} upsampler"
            sf = r.scale_factor if isinstance(r.scale_factor, (tuple, list)) else (r.scale_factor,)
            if any(float(s) != 2.0 for s in sf) or (r.with_conv and not _conv_ok(r.conv, 3, 1, 1)):
                return "an upsampler of another factor or convolution"
    return None


def _common_problem(net, m, cls) -> str | None:
    if type(net) is not cls:
        return f"its {cls.__name__.lower()} is a {type(net).__name__}, not ComfyUI's 2-D {cls.__name__}"
    if getattr(net, "temb_ch", 0) or getattr(net, "carried", False) or getattr(net, "give_pre_end", False):
        return f"its {cls.__name__.lower()} uses time embeddings, carried state or give_pre_end"
    if not (_conv_ok(net.conv_in, 3, 1, 1) and _conv_ok(net.conv_out, 3, 1, 1) and _norm_ok(net.norm_out)):
        return f"its {cls.__name__.lower()} has 3-D or other input/output layers"
    for name in ("block_1", "block_2"):
        bad = _resblock_problem(getattr(net.mid, name), m)
        if bad:
            return f"its {cls.__name__.lower()} has {bad}"
    bad = _attn_problem(net.mid.attn_1, m)
    return f"its {cls.__name__.lower()} has {bad}" if bad else None


def unsupported_reason(vae, which: str) -> str | None:
    """Why ``vae`` cannot be tiled exactly for ``which`` ("encode" / "decode"), or None if it can: the
    startup self-check found ComfyUI's VAE code changed (``self_check``: ``vae_<which>``), or the VAE's
    structure is not one the stages reproduce exactly -- including an attribute or method that is not
    where it is expected (never an error: the caller falls back to ComfyUI's tiled VAE)."""
    changed = self_check.missing_reason(f"vae_{which}")
    if changed is not None:
        return f"ComfyUI's VAE code is not what the exact path knows ({changed})"
    try:
        return _structure_problem(vae, which)
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        return f"its structure is not one the exact path knows ({type(e).__name__}: {e})"


def _structure_problem(vae, which: str) -> str | None:
    from comfy.ldm.models import autoencoder as ae
    m = _model_module()
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None or not isinstance(fsm, ae.AutoencodingEngine):
        return f"its model ({type(fsm).__name__}) is not ComfyUI's AutoencoderKL-style Encoder/Decoder"
    if getattr(vae, "latent_dim", 2) != 2 or getattr(vae, "extra_1d_channel", None) is not None:
        return "it is a video/audio VAE"
    method = getattr(type(fsm), which, None)
    known = [vars(c).get(which) for c in (ae.AutoencodingEngine, ae.AutoencodingEngineLegacy)]
    if method is None or method not in known:
        return f"its model ({type(fsm).__name__}) has its own {which}()"
    for name in ("quant_conv", "post_quant_conv"):
        conv = getattr(fsm, name, None)
        if conv is not None and not _conv_ok(conv, 1, 1, 0):
            return f"its {name} is not a 1x1 convolution"
    bn = getattr(fsm, "bn", None)
    if bn is not None and (not isinstance(bn, torch.nn.BatchNorm2d) or list(getattr(fsm, "ps", [])) != [2, 2]):
        return "its latent batch norm is not the 2x2 one"
    if which == "decode":
        net = getattr(fsm, "decoder", None)
        bad = _common_problem(net, m, m.Decoder) or _levels_problem(net.up, m, "upsample")
    else:
        reg = getattr(fsm, "regularization", None)
        if not (isinstance(reg, ae.EmptyRegularizer)
                or (isinstance(reg, ae.DiagonalGaussianRegularizer) and not reg.sample)):
            return f"its regulariser is a {type(reg).__name__} (sampling or unknown)"
        net = getattr(fsm, "encoder", None)
        bad = _common_problem(net, m, m.Encoder) or _levels_problem(net.down, m, "downsample")
    return bad


def spatial_factor(fsm) -> int:
    """Image pixels per latent pixel: 2^(levels - 1), x2 for the batch-norm latent's 2x2 packing."""
    net = fsm.decoder if hasattr(fsm, "decoder") else fsm.encoder
    return 2 ** (net.num_resolutions - 1) * (2 if getattr(fsm, "bn", None) is not None else 1)


# ---------------------------------------------------------------------------------------------
# Stage lists

def _shortcut(block):
    if block.in_channels == block.out_channels:
        return lambda x: x
    return block.conv_shortcut if getattr(block, "use_conv_shortcut", False) else block.nin_shortcut


def resblock_stages(block, x: str, prefix: str, level: int) -> list[Stage]:
    """ResnetBlock: h = conv1(silu(norm1(x))); out = shortcut(x) + conv2(silu(norm2(h)))."""
    cin, cout = block.in_channels, block.out_channels
    shortcut = _shortcut(block)
    a = Stage(prefix + ".a", (x,), prefix + ".h", cout, lambda ins, n: block.conv1(n), norm=block.norm1,
              channels=max(cin, cout), level=level)
    b = Stage(prefix + ".b", (prefix + ".h", x), prefix, cout, lambda ins, n: shortcut(ins[1]) + block.conv2(n),
              norm=block.norm2, channels=max(cin, cout), level=level)
    return [a, b]


def attn_stage(block, x: str, name: str, level: int) -> Stage:
    """AttnBlock: out = x + proj_out(attention(q, k, v)) of norm(x) over the whole map."""
    c = block.in_channels
    return Stage(name, (x,), name, c, None, kind="attention", radius=0, norm=block.norm, act=False,
                 channels=c, attn=block, level=level)


def _mid_stages(net, x: str, level: int) -> tuple[list[Stage], str]:
    stages = resblock_stages(net.mid.block_1, x, "mid.block_1", level)
    stages.append(attn_stage(net.mid.attn_1, "mid.block_1", "mid.attn_1", level))
    stages += resblock_stages(net.mid.block_2, "mid.attn_1", "mid.block_2", level)
    return stages, "mid.block_2"


def decoder_stages(fsm) -> list[Stage]:
    """Decoder: [post_quant_conv ->] conv_in, mid (res, attn, res), up levels (res blocks,
    nearest x2 + conv), norm_out -> silu -> conv_out [-> tanh]. Input map "z", output "image"."""
    dec = fsm.decoder
    top = dec.num_resolutions - 1
    pq = getattr(fsm, "post_quant_conv", None)
    c_mid = dec.conv_in.out_channels

    def conv_in(ins, n):
        return dec.conv_in(ins[0] if pq is None else pq(ins[0]))

    stages = [Stage("conv_in", ("z",), "conv_in", c_mid, conv_in, norm=None,
                    channels=max(c_mid, dec.conv_in.in_channels), level=top)]
    mid, cur = _mid_stages(dec, "conv_in", top)
    stages += mid
    for i_level in reversed(range(dec.num_resolutions)):
        up = dec.up[i_level]
        for i_block, block in enumerate(up.block):
            stages += resblock_stages(block, cur, f"up.{i_level}.block.{i_block}", i_level)
            cur = f"up.{i_level}.block.{i_block}"
        if i_level != 0:
            c = up.block[-1].out_channels
            stages.append(Stage(f"up.{i_level}.upsample", (cur,), f"up.{i_level}.upsample", c,
                                lambda ins, n, u=up.upsample: u(ins[0]), kind="up", channels=c, level=i_level - 1))
            cur = f"up.{i_level}.upsample"
    tanh = getattr(dec, "tanh_out", False)

    def out(ins, n):
        y = dec.conv_out(n)
        return torch.tanh(y) if tanh else y

    c_out = dec.conv_out.out_channels
    stages.append(Stage("conv_out", (cur,), "image", c_out, out, norm=dec.norm_out,
                        channels=max(c_out, dec.conv_out.in_channels), level=0))
    return stages


def encoder_stages(fsm, prepare) -> list[Stage]:
    """Encoder: conv_in(prepare(pixels)), down levels (res blocks, stride-2 conv or 2x2 pool),
    mid (res, attn, res), norm_out -> silu -> conv_out [-> quant_conv]. Input map "pixels"
    (``prepare`` = the VAE's process_input and cast), output "moments"."""
    enc = fsm.encoder
    c0 = enc.conv_in.out_channels
    stages = [Stage("conv_in", ("pixels",), "conv_in", c0, lambda ins, n: enc.conv_in(prepare(ins[0])),
                    channels=max(c0, enc.conv_in.in_channels), level=0)]
    cur = "conv_in"
    for i_level in range(enc.num_resolutions):
        down = enc.down[i_level]
        for i_block, block in enumerate(down.block):
            stages += resblock_stages(block, cur, f"down.{i_level}.block.{i_block}", i_level)
            cur = f"down.{i_level}.block.{i_block}"
        if i_level != enc.num_resolutions - 1:
            c = down.block[-1].out_channels if len(down.block) else stages[-1].out_channels
            ds = down.downsample
            stages.append(Stage(f"down.{i_level}.downsample", (cur,), f"down.{i_level}.downsample", c,
                                lambda ins, n, d=ds: d(ins[0]), kind="down" if ds.with_conv else "pool",
                                channels=c, cost=4, level=i_level + 1))
            cur = f"down.{i_level}.downsample"
    top = enc.num_resolutions - 1
    mid, cur = _mid_stages(enc, cur, top)
    stages += mid
    qc = getattr(fsm, "quant_conv", None)

    def out(ins, n):
        y = enc.conv_out(n)
        return y if qc is None else qc(y)

    c_out = enc.conv_out.out_channels if qc is None else qc.out_channels
    stages.append(Stage("conv_out", (cur,), "moments", c_out, out, norm=enc.norm_out,
                        channels=max(c_out, enc.conv_out.in_channels), level=top))
    return stages
