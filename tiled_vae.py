"""Quadtree VAE Encode / Decode: a tiled VAE that equals the untiled one.

``decode`` / ``encode`` take a ComfyUI ``comfy.sd.VAE``. For ComfyUI's Encoder/Decoder family
(``vae_graph.unsupported_reason`` is None) they run the network tile by tile (``vae_executor``):

* exact (``fast=False``): every stage re-cut with its own halo, GroupNorm statistics pooled over
  the whole image, attention over the whole latent: equal to ``VAEDecode`` / ``VAEEncode`` to
  float tolerance; the device holds one tile, the host the whole feature maps.
* fast: the expensive full-resolution part runs once per tile, end to end, with GroupNorm
  statistics estimated from an untiled pass on a downscaled copy (never an upscaled one); the
  decoder's latent-resolution middle (with attention) stays exact, and so, with ``color_fix``, do
  the encoder's first-level GroupNorms. An image that fits one tile is decoded exactly.

Any other VAE goes to ComfyUI's own tiled encode/decode, with one log line saying why.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F

from . import self_check
from .vae_executor import TileRunner, Variant
from .vae_graph import decoder_stages, encoder_stages, spatial_factor, unsupported_reason
from .vae_stages import Moments, group_moments

log = logging.getLogger(__name__)

MIN_TILE = 128          # the nodes' lower bound (the engine accepts less, for tests)
MAX_TILE = 8192
TILE_STEP = 16
TAG = "[Quadtree VAE]"


def default_tile_size(kind: str) -> int:
    """The nodes' default tile side in pixels for this machine's torch device: 512 on the CPU,
    else ``tile_size_for_memory`` of the device's total memory."""
    try:
        import comfy.model_management as mm
        dev = mm.get_torch_device()
        if getattr(dev, "type", "cpu") == "cpu":
            return 512
        return tile_size_for_memory(mm.get_total_memory(dev), kind)
    except Exception:
        return 512


def tile_size_for_memory(total_bytes: float, kind: str) -> int:
    """The largest multiple of 64 in 256..4096 whose exact-mode tile of an SD-shaped fp16 VAE
    (256 channels at full resolution for decode, 128 for encode; ``tile_bytes``) takes at most a
    fifth of ``total_bytes``."""
    ch = 256 if kind == "decode" else 128
    best = 256
    for t in range(256, 4097, 64):
        if tile_bytes(t * t * ch, 2) <= total_bytes / 5:
            best = t
    return best


def tile_bytes(budget: int, dtype_size: int) -> int:
    """Device bytes of one tile whose conv inputs hold ``budget`` elements: the input tiles, the
    float32 normalised copy, the activation, the conv output and the float32 statistics copy,
    about budget x (8 + 6 x dtype size)."""
    return int(budget * (8 + 6 * dtype_size))


# ---------------------------------------------------------------------------------------------
# helpers

def _device_context(device):
    import comfy.model_management as mm
    ctx = getattr(mm, "cuda_device_context", None)
    return ctx(device) if ctx is not None else contextlib.nullcontext()


def _output_dtype(vae):
    f = getattr(vae, "vae_output_dtype", None)
    return f() if callable(f) else torch.float32


def _budget(stages, tile_size: int) -> int:
    """Conv input elements per tile: tile_size^2 x the widest full-resolution stage's elements per
    image pixel (channels x cost x 4^-level, maximised over the stages)."""
    per_px = max(s.channels * s.cost * 4.0 ** (-s.level) for s in stages)
    return max(1, int(tile_size * tile_size * per_px))


def _load(vae, stages, tile_size: int, latent_px: int) -> int:
    """Loads the VAE as ``comfy.sd.VAE.decode`` does, asking for one tile's memory (and the
    attention's keys and values); returns the budget, reduced (logged) if the device's free
    memory cannot hold it."""
    import comfy.model_management as mm
    ds = torch.empty((), dtype=vae.vae_dtype).element_size()
    budget = _budget(stages, tile_size)
    attn = sum(2 * s.channels * latent_px * ds for s in stages if s.kind == "attention")
    mm.load_models_gpu([vae.patcher], memory_required=tile_bytes(budget, ds) + attn,
                       force_full_load=getattr(vae, "disable_offload", False))
    free = mm.get_free_memory(vae.device)
    need = tile_bytes(budget, ds) + attn
    if need > 0.9 * free and free > 0:
        scale = max(0.05, (0.9 * free - attn) / max(1, tile_bytes(budget, ds)))
        new = max(32, int(tile_size * math.sqrt(scale)) // TILE_STEP * TILE_STEP)
        if new < tile_size:
            log.warning("%s tile_size %d px does not fit the free memory of %s (%.2f GB): using %d px",
                        TAG, tile_size, vae.device, free / 2 ** 30, new)
            budget = _budget(stages, new)
    return budget


def _is_oom(e: BaseException) -> bool:
    """ComfyUI's own out-of-memory test where it has one (``model_management.is_oom``), else the
    CUDA out-of-memory error."""
    import comfy.model_management as mm
    test = getattr(mm, "is_oom", None)
    if test is not None:
        return bool(test(e))
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


def _segments(stages, fast: bool, start: int, end: int):
    """Exact: one segment per stage. Fast: stages[start:end] as one chain."""
    if not fast or end - start < 1:
        return [[s] for s in stages]
    return [[s] for s in stages[:start]] + [stages[start:end]] + [[s] for s in stages[end:]]


def decimate(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x [B, C, H, W] sampled at height x width pixel centres (nearest-exact):
    out[i, j] = x[floor((i + 1/2) H / height), floor((j + 1/2) W / width)]. Unlike an area average it
    keeps the per-pixel distribution that GroupNorm statistics measure (averaging smooths texture
    away and underestimates every variance downstream); only the small result is allocated."""
    _, _, h, w = x.shape
    iy = ((torch.arange(height, dtype=torch.float64) + 0.5) * (h / height)).floor().long().clamp_(max=h - 1)
    ix = ((torch.arange(width, dtype=torch.float64) + 0.5) * (w / width)).floor().long().clamp_(max=w - 1)
    return x.index_select(2, iy.to(x.device)).index_select(3, ix.to(x.device))


def _estimate(runner: TileRunner, seg) -> None:
    """Fast mode: GroupNorm statistics of the chain's maps from one exact pass over the chain on
    the chain input decimated by s = min(1, sqrt(budget / (cost per input px x area))), so the
    pass fits one tile (s = 1 never happens here: such an image is decoded exactly). The chain's
    final map keeps exact pooled statistics."""
    produced = {s.output for s in seg}
    (src,) = {m for s in seg for m in s.inputs if m not in produced}
    x = runner.maps[src]
    _, _, h, w = x.shape
    lv = runner.input_level(src)
    per_px = max(s.channels * s.cost * 4.0 ** (lv - s.level) for s in seg)
    s = min(1.0, math.sqrt(runner.budget / (per_px * h * w)))
    small = x if s >= 1.0 else decimate(x, max(1, round(h * s)), max(1, round(w * s)))
    fixed = {}
    if src in runner.groups:
        mom = Moments()
        mom.add(*group_moments(small, runner.groups[src]))
        fixed[src] = mom.mean_var()
    est = TileRunner(seg, {src: small}, runner.device, runner.dtype, runner.store, runner.budget,
                     out_dtype=runner.dtype, fixed_stats=fixed)
    est.run([[st] for st in seg])
    runner.fixed.update({m: st.mean_var() for m, st in est.stats.items() if m != seg[-1].output})


def _tiled(vae, stages, items, tile_size: int, fast: bool, chain: tuple[int, int], latent_px: int, what: str,
           variant=None, host_budget: float | None = None):
    """Runs ``stages`` on every batch item (``items``: a list of {input name: [1, C, H, W]}) one
    after another, exact or (``fast``) with stages[chain[0]:chain[1]] as one chain per tile, and
    returns the final maps. Exact mode switches to fast (logged) when its whole feature maps need
    more than ``host_budget`` bytes (default: 90 % of the host's free memory); an image that fits
    one tile is always run exactly. Out of device memory, an image is retried with tiles of half
    the side (twice, logged)."""
    import comfy.model_management as mm
    import comfy.utils
    dtype, store = vae.vae_dtype, mm.intermediate_device()
    t0 = time.perf_counter()
    outs, pbar, tiles, peak, mode = [], None, 0, 0, "fast" if fast else "exact"
    with _device_context(vae.device), torch.no_grad():
        budget = _load(vae, stages, tile_size, latent_px)
        for item in items:
            for attempt in range(3):
                runner = TileRunner(stages, {k: v.to(store) for k, v in item.items()}, vae.device, dtype, store,
                                    budget, variant=variant)
                one_tile = len(runner.grid(stages[chain[0]:chain[1]])) <= 1
                segs = _segments(stages, fast and not one_tile, *chain)
                if not fast and not one_tile and pbar is None:
                    need = runner.plan_host_peak(segs)
                    limit = 0.9 * mm.get_free_memory(store) if host_budget is None else host_budget
                    if need > limit:
                        log.warning("%s exact %s needs %.2f GB for whole feature maps but %.2f GB are available "
                                    "on %s: running in fast mode", TAG, what, need / 2 ** 30, limit / 2 ** 30, store)
                        fast, mode = True, "fast (RAM)"
                        segs = _segments(stages, True, *chain)
                if pbar is None:
                    pbar = comfy.utils.ProgressBar(len(items) * runner.count_tiles(segs))
                runner.pbar = pbar
                try:
                    runner.run(segs, before_chain=lambda seg, r=runner: _estimate(r, seg))
                    break
                except Exception as e:
                    if attempt == 2 or not _is_oom(e):
                        raise
                del runner
                mm.soft_empty_cache()
                budget = max(1, budget // 4)
                log.warning("%s out of device memory: %s again with tiles of half the side", TAG, what)
            outs.append(runner.maps[stages[-1].output])
            tiles, peak = tiles + runner.tiles_run, max(peak, runner.host_peak)
    log.info("%s %s %s of %d image(s): tile_size %d px, %d tile runs, host maps up to %.0f MB, %.2f s",
             TAG, mode, what, len(items), tile_size, tiles, peak / 2 ** 20, time.perf_counter() - t0)
    return outs


# ---------------------------------------------------------------------------------------------
# decode

def _latent_tensor(samples):
    if isinstance(samples, dict):
        samples = samples.get("samples")
    if not torch.is_tensor(samples):
        raise ValueError(f"samples: expected a LATENT (a dict with a 'samples' tensor), got {type(samples).__name__}")
    if getattr(samples, "is_nested", False):
        samples = samples.unbind()[0]
    return samples


def _fallback_decode(vae, latent, tile_size, reason):
    import nodes as comfy_nodes
    self_check.require("Quadtree VAE Decode", "vae_fallback")
    tile = min(4096, tile_size)
    overlap = min(64, tile // 4)
    log.info("%s %s: ComfyUI's own tiled VAE decode is used (tile %d px, overlap %d px; not exact)",
             TAG, reason, tile, overlap)
    (images,) = comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": latent}, tile, overlap)
    return images


def decode(vae, samples, tile_size: int, fast: bool = False, variant: Variant | None = None,
           host_budget: float | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, C] of the latent ``samples``, tiled with ``tile_size``-px tiles (see
    ``_tiled`` for ``host_budget``)."""
    import comfy.model_management as mm
    latent = _latent_tensor(samples)
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    reason = unsupported_reason(vae, "decode")
    if reason is not None:
        return _fallback_decode(vae, latent, int(tile_size), f"{type(vae).__name__}: {reason}")
    if latent.ndim == 5 and latent.shape[2] == 1:
        latent = latent[:, :, 0]
    if latent.ndim != 4:
        raise ValueError(f"samples: a latent of shape {list(latent.shape)}, but this is an image VAE: it decodes "
                         f"[batch, channels, height, width] latents")
    fsm = vae.first_stage_model
    pq = getattr(fsm, "post_quant_conv", None)
    bn = getattr(fsm, "bn", None)
    want = (pq.in_channels if pq is not None else fsm.decoder.conv_in.in_channels) * (4 if bn is not None else 1)
    if latent.shape[1] != want:
        raise ValueError(f"samples: {latent.shape[1]} channels but this VAE decodes {want}-channel latents: "
                         f"decode the latent with the VAE of the model that made it")
    dtype = vae.vae_dtype
    items = []
    for i in range(latent.shape[0]):
        z = latent[i:i + 1].to(dtype)
        if bn is not None:   # AutoencodingEngineLegacy.decode: the latent batch norm undone, 2x2 unpacked
            var = mm.cast_to(bn.running_var, dtype=dtype, device=z.device).view(1, -1, 1, 1)
            mean = mm.cast_to(bn.running_mean, dtype=dtype, device=z.device).view(1, -1, 1, 1)
            z = F.pixel_shuffle(z * torch.sqrt(var + fsm.bn_eps) + mean, 2)
        items.append({"z": z})
    stages = decoder_stages(fsm)
    start = next(i for i, s in enumerate(stages) if s.name.startswith("up."))
    outs = _tiled(vae, stages, items, int(tile_size), fast, (start, len(stages)),
                  items[0]["z"].shape[2] * items[0]["z"].shape[3], "decode", variant, host_budget)
    return torch.cat([vae.process_output(o).to(vae.output_device, _output_dtype(vae)).movedim(1, -1)
                      for o in outs])


# ---------------------------------------------------------------------------------------------
# encode

def _fallback_encode(vae, pixels, tile_size, reason):
    import nodes as comfy_nodes
    self_check.require("Quadtree VAE Encode", "vae_fallback")
    tile = min(4096, tile_size)
    overlap = min(64, tile // 4)
    log.info("%s %s: ComfyUI's own tiled VAE encode is used (tile %d px, overlap %d px; not exact)",
             TAG, reason, tile, overlap)
    (out,) = comfy_nodes.VAEEncodeTiled().encode(vae, pixels, tile, overlap)
    return out["samples"]


def encode(vae, pixels, tile_size: int, fast: bool = False, color_fix: bool = True,
           variant: Variant | None = None, host_budget: float | None = None) -> torch.Tensor:
    """Latent [B, C, h, w] of the IMAGE ``pixels`` [B, H, W, C], tiled with ``tile_size``-px tiles
    (see ``_tiled`` for ``host_budget``)."""
    import comfy.model_management as mm
    if not torch.is_tensor(pixels) or pixels.ndim != 4:
        shape = list(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
        raise ValueError(f"pixels: expected an IMAGE [batch, height, width, channels], got {shape}")
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    reason = unsupported_reason(vae, "encode")
    if reason is not None:
        return _fallback_encode(vae, pixels, int(tile_size), f"{type(vae).__name__}: {reason}")
    fsm = vae.first_stage_model
    factor = spatial_factor(fsm)
    if pixels.shape[1] < factor or pixels.shape[2] < factor:
        raise ValueError(f"pixels: {pixels.shape[2]}x{pixels.shape[1]} px is smaller than one latent pixel of this "
                         f"VAE ({factor} px); use an image of at least {factor}x{factor} px")
    cin = fsm.encoder.conv_in.in_channels
    px = vae.vae_encode_crop_pixels(pixels)
    if px.shape[-1] < cin:
        raise ValueError(f"pixels: {px.shape[-1]} channels but this VAE encodes {cin}-channel images")
    px = px[..., :cin]
    dtype = vae.vae_dtype

    def prepare(t):   # what comfy.sd.VAE.encode does to the pixels, on a copy of the tile
        return vae.process_input(t.clone()).to(dtype)

    stages = encoder_stages(fsm, prepare)
    start = next(i for i, s in enumerate(stages) if s.level >= 1) if color_fix else 0
    end = next(i for i, s in enumerate(stages) if s.name.startswith("mid."))
    bn = getattr(fsm, "bn", None)
    mid_px = px.shape[1] * px.shape[2] // (factor // (2 if bn is not None else 1)) ** 2
    outs = _tiled(vae, stages, [{"pixels": px[i:i + 1].movedim(-1, 1)} for i in range(px.shape[0])],
                  int(tile_size), fast, (start, end), mid_px, "encode", variant, host_budget)
    latents = []
    for moments in outs:
        z = fsm.regularization(moments)[0]
        if bn is not None:   # AutoencodingEngineLegacy.encode: 2x2 packing and the latent batch norm
            z = F.batch_norm(F.pixel_unshuffle(z, 2), mm.cast_to(bn.running_mean, dtype=z.dtype, device=z.device),
                             mm.cast_to(bn.running_var, dtype=z.dtype, device=z.device), eps=fsm.bn_eps)
        latents.append(z.to(vae.output_device, _output_dtype(vae)))
    return torch.cat(latents)
