"""Faithful fixtures of ComfyUI code added after 0.28 that no ComfyUI on this machine runs.

Written from ComfyUI's public source (Comfy-Org/ComfyUI, read file by file; see
/work/shared/design/comfyui-0.38-notes.md), keeping its behaviour line for line where the pack
depends on it, so the pack can be tested against what newer ComfyUI does:

* :func:`size_keyed_get_control` / :func:`make_size_keyed`: ``ControlNet.get_control`` with the
  prepared hint cached per latent size in ``cond_hints`` (at most 2 entries, first in first out,
  cached before the batch broadcast) and the ``cond_hints`` / ``control_inputs`` dicts that
  ``ControlBase.__init__`` creates and ``set_cond_hint`` / ``cleanup`` empty
  (``comfy/controlnet.py`` at 03b1ca67, upstream PR #15832);
* :class:`Uni3CPatch`: ``WanUni3CCnetPatch`` of ``comfy_extras/nodes_model_patch.py`` (at 08f68f09
  and 4f8cf3e2): the Wan Uni3C camera control, which encodes its whole ``render_video`` at the
  model input's size and builds its control input from the first cond chunk's rows;
* :class:`SpatialCrop`: ``spatial_crop_inputs(regions=, source_width=, source_height=,
  target_width=, target_height=)`` of ``DiffSynthCnetPatch`` / ``ZImageControlPatch`` (at 4f8cf3e2)
  with its helpers ``_spatial_crop_bounds``, ``_crop_bhwc_regions``, ``_crop_mask_regions``: an
  independent patch whose image (and mask) are each region's crop, resized (bilinear) to the target
  size, region-major.

Where the running ComfyUI has the real class (``nodes_model_patch.WanUni3CCnetPatch``, a patch
with ``spatial_crop_inputs``), the tests use it as well (:func:`real_uni3c`, :func:`real_crop_patch`).
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------- ControlNet hint cache (PR #15832)

def size_keyed_get_control(self, x_noisy, t, cond, batched_number, transformer_options):
    """``ControlNet.get_control`` of comfy/controlnet.py@03b1ca67 (the prepared hint cached per latent size)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.utils
    from comfy.controlnet import broadcast_image_to
    control_prev = None
    if self.previous_controlnet is not None:
        control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)

    if self.timestep_range is not None:
        if t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]:
            return control_prev

    dtype = self.control_model.dtype
    if self.manual_cast_dtype is not None:
        dtype = self.manual_cast_dtype

    cond_hint = self.cond_hints.get((x_noisy.shape[2], x_noisy.shape[3]))
    if cond_hint is None:
        compression_ratio = self.compression_ratio
        if self.vae is not None:
            compression_ratio *= self.vae.spacial_compression_encode()
        elif self.latent_format is not None:
            raise ValueError("This Controlnet needs a VAE but none was provided")
        cond_hint = comfy.utils.common_upscale(self.cond_hint_original, x_noisy.shape[-1] * compression_ratio,
                                               x_noisy.shape[-2] * compression_ratio, self.upscale_algorithm, "center")
        cond_hint = self.preprocess_image(cond_hint)
        if self.vae is not None:
            loaded_models = comfy.model_management.loaded_models(only_currently_used=True)
            cond_hint = self.vae.encode(cond_hint.movedim(1, -1))
            comfy.model_management.load_models_gpu(loaded_models)
        if self.latent_format is not None:
            cond_hint = self.latent_format.process_in(cond_hint)
        if len(self.extra_concat_orig) > 0:
            to_concat = []
            for c in self.extra_concat_orig:
                c = c.to(cond_hint.device)
                c = comfy.utils.common_upscale(c, cond_hint.shape[-1], cond_hint.shape[-2], self.upscale_algorithm,
                                               "center")
                if c.ndim < cond_hint.ndim:
                    c = c.unsqueeze(2)
                    c = comfy.utils.repeat_to_batch_size(c, cond_hint.shape[2], dim=2)
                to_concat.append(comfy.utils.repeat_to_batch_size(c, cond_hint.shape[0]))
            cond_hint = torch.cat([cond_hint] + to_concat, dim=1)
        cond_hint = cond_hint.to(device=x_noisy.device, dtype=dtype)
        while len(self.cond_hints) >= 2:
            self.cond_hints.pop(next(iter(self.cond_hints)))
        self.cond_hints[(x_noisy.shape[2], x_noisy.shape[3])] = cond_hint
    if x_noisy.shape[0] != cond_hint.shape[0]:
        cond_hint = broadcast_image_to(cond_hint, x_noisy.shape[0], batched_number)

    context = cond.get("crossattn_controlnet", cond["c_crossattn"])
    extra = self.extra_args.copy()
    for c in self.extra_conds:
        temp = cond.get(c, None)
        if temp is not None:
            extra[c] = comfy.model_base.convert_tensor(temp, dtype, x_noisy.device)

    timestep = self.model_sampling_current.timestep(t)
    x_noisy = self.model_sampling_current.calculate_input(t, x_noisy)
    control = self.control_model(x=x_noisy.to(dtype), hint=cond_hint, timesteps=timestep.to(dtype),
                                 context=comfy.model_management.cast_to_device(context, x_noisy.device, dtype), **extra)
    return self.control_merge(control, control_prev, output_dtype=None)


def make_size_keyed(control):
    """``control`` (a ``comfy.controlnet.ControlNet``) as PR #15832's: its class's ``get_control`` is
    :func:`size_keyed_get_control`, ``cleanup`` also empties the caches, and it holds the (empty) cache dicts."""
    base = type(control)

    class SizeKeyedControlNet(base):
        get_control = size_keyed_get_control

        def cleanup(self):
            base.cleanup(self)
            self.cond_hints.clear()
            self.control_inputs.clear()

    control.__class__ = SizeKeyedControlNet
    control.cond_hints = {}
    control.control_inputs = {}
    return control


def install_size_keyed(cn) -> None:
    """Turn the running ComfyUI's ``comfy.controlnet`` (module ``cn``) into PR #15832's for a drift test (in a
    subprocess of its own): ``ControlBase`` objects get the two cache dicts, ``set_cond_hint`` and ``cleanup``
    empty them, ``ControlNet.get_control`` caches per size."""
    init, set_hint, cleanup = cn.ControlBase.__init__, cn.ControlBase.set_cond_hint, cn.ControlBase.cleanup

    def __init__(self, *a, **kw):
        init(self, *a, **kw)
        self.cond_hints = {}
        self.control_inputs = {}

    def set_cond_hint(self, *a, **kw):
        out = set_hint(self, *a, **kw)
        self.cond_hints.clear()
        self.control_inputs.clear()
        return out

    def cleanup_(self):
        cleanup(self)
        self.cond_hints.clear()
        self.control_inputs.clear()

    cn.ControlBase.__init__ = __init__
    cn.ControlBase.set_cond_hint = set_cond_hint
    cn.ControlBase.cleanup = cleanup_
    cn.ControlNet.get_control = size_keyed_get_control


# --------------------------------------------------------------------------- Wan Uni3C model patch

class Uni3CPatch:
    """``WanUni3CCnetPatch`` (nodes_model_patch.py@08f68f09 / 4f8cf3e2)."""

    def __init__(self, model_patch, render_video, vae, latent_format, strength, sigma_start, sigma_end):
        self.model_patch = model_patch
        self.render_video = render_video
        self.vae = vae
        self.latent_format = latent_format
        self.strength = strength
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.prepared_render = None
        self.temp_data = None

    def encode_render_video(self, target_latent_shape):
        import comfy.model_management
        import comfy.utils
        t_len, h_len, w_len = target_latent_shape
        temporal_compression = self.vae.temporal_compression_decode() or 1
        spatial_compression = self.vae.spacial_compression_encode()
        target_frames = (t_len - 1) * temporal_compression + 1
        target_height = h_len * spatial_compression
        target_width = w_len * spatial_compression

        frames = self.render_video
        if frames.shape[0] > target_frames:
            frames = frames[:target_frames]
        elif frames.shape[0] < target_frames:
            last_frame = frames[-1:].expand(target_frames - frames.shape[0], -1, -1, -1)
            frames = torch.cat([frames, last_frame], dim=0)

        if frames.shape[1] != target_height or frames.shape[2] != target_width:
            frames = comfy.utils.common_upscale(frames.movedim(-1, 1), target_width, target_height, "bilinear",
                                                "center").movedim(1, -1)

        loaded_models = comfy.model_management.loaded_models(only_currently_used=True)
        render_latent = self.vae.encode(frames)
        comfy.model_management.load_models_gpu(loaded_models)
        return self.latent_format.process_in(render_latent)

    def build_controlnet_input(self, x, dtype, samples_per_cond):
        hidden = x[:samples_per_cond, :20].to(dtype)
        if hidden.shape[1] < 20:
            pad_shape = list(hidden.shape)
            pad_shape[1] = 20 - hidden.shape[1]
            hidden = torch.cat([hidden, torch.zeros(pad_shape, dtype=hidden.dtype, device=hidden.device)], dim=1)

        render = self.prepared_render
        if render is None or render.shape[2:] != hidden.shape[2:]:
            render = self.encode_render_video(hidden.shape[2:])
        render = render.to(device=hidden.device, dtype=dtype)
        self.prepared_render = render
        if render.shape[0] != hidden.shape[0]:
            render = render.expand(hidden.shape[0], -1, -1, -1, -1)
        return torch.cat([hidden, render], dim=1)

    def __call__(self, kwargs):
        img = kwargs.get("img")
        block_index = kwargs.get("block_index")
        transformer_options = kwargs.get("transformer_options", {})

        if block_index == 0:
            self.temp_data = None
            active = True
            sigmas = transformer_options.get("sigmas", None)
            if sigmas is not None:
                sigma = sigmas[0].item()
                if sigma > self.sigma_start or sigma < self.sigma_end:
                    active = False
            if active:
                x = kwargs.get("x")
                num_conds = len(transformer_options.get("cond_or_uncond", [0]))
                samples_per_cond = x.shape[0]
                if num_conds > 0 and x.shape[0] % num_conds == 0:
                    samples_per_cond = x.shape[0] // num_conds
                temb = kwargs.get("vec")[:samples_per_cond]
                if temb.ndim == 3:
                    temb = temb[:, 0]
                model = self.model_patch.model
                controlnet_input = self.build_controlnet_input(x, img.dtype, samples_per_cond)
                hidden, freqs = model.process_input(controlnet_input)
                self.temp_data = (hidden, temb.to(img.dtype), freqs)

        num_layers = self.model_patch.model.num_layers
        if self.temp_data is not None and block_index < num_layers:
            hidden, temb, freqs = self.temp_data
            hidden, residual = self.model_patch.model.forward_block(block_index, hidden, temb, freqs)
            residual = residual.to(img.dtype) * self.strength
            if residual.shape[0] != img.shape[0]:
                residual = residual.repeat(img.shape[0] // residual.shape[0], 1, 1)
            img_offset = kwargs.get("img_offset", 0)
            img[:, img_offset:img_offset + residual.shape[1]] += residual
            if block_index >= num_layers - 1:
                self.temp_data = None
            else:
                self.temp_data = (hidden, temb, freqs)
        return kwargs

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, torch.device):
            if self.prepared_render is not None:
                self.prepared_render = self.prepared_render.to(device_or_dtype)
            self.temp_data = None
        return self

    def models(self):
        return [self.model_patch]


def real_uni3c():
    """The running ComfyUI's ``WanUni3CCnetPatch``, or None."""
    import comfy_extras.nodes_model_patch as nmp
    return getattr(nmp, "WanUni3CCnetPatch", None)


# --------------------------------------------------------------------------- spatial_crop_inputs

def spatial_crop_bounds(region, source_width, source_height, width, height):
    """``_spatial_crop_bounds``: a source-space (left, top, right, bottom) region on a width x height tensor."""
    left, top, right, bottom = region
    x1 = max(0, min(width - 1, left * width // source_width))
    y1 = max(0, min(height - 1, top * height // source_height))
    x2 = max(x1 + 1, min(width, (right * width + source_width - 1) // source_width))
    y2 = max(y1 + 1, min(height, (bottom * height + source_height - 1) // source_height))
    return x1, y1, x2, y2


def resize_spatial_tensor(value, target_width, target_height):
    """``_resize_spatial_tensor``: bilinear over the last two axes, any leading axes."""
    original_dtype = value.dtype
    leading = value.shape[:-2]
    flat = value.reshape(-1, 1, value.shape[-2], value.shape[-1]).float()
    resized = torch.nn.functional.interpolate(flat, size=(target_height, target_width), mode="bilinear",
                                              align_corners=False).reshape(*leading, target_height, target_width)
    if original_dtype == torch.bool:
        return resized >= 0.5
    return resized.to(dtype=original_dtype)


def crop_bhwc_regions(value, regions, source_width, source_height, target_width, target_height):
    """``_crop_bhwc_regions``: each region's crop of an IMAGE, resized to the target size, region-major."""
    if value is None:
        return None
    if value.ndim != 4:
        raise ValueError("model spatial images must use BHWC layout")
    height, width = value.shape[1:3]
    cropped = []
    for region in regions:
        x1, y1, x2, y2 = spatial_crop_bounds(region, source_width, source_height, width, height)
        tile = value[:, y1:y2, x1:x2, :].movedim(-1, 1)
        tile = torch.nn.functional.interpolate(tile, size=(target_height, target_width), mode="bilinear",
                                               align_corners=False).movedim(1, -1)
        cropped.append(tile)
    return torch.cat(cropped, dim=0)


def crop_mask_regions(value, regions, source_width, source_height, target_width, target_height):
    """``_crop_mask_regions``: the same for a mask (any leading axes)."""
    if value is None:
        return None
    if value.ndim < 3:
        raise ValueError("model spatial masks must have at least three axes")
    height, width = value.shape[-2:]
    cropped = []
    for region in regions:
        x1, y1, x2, y2 = spatial_crop_bounds(region, source_width, source_height, width, height)
        cropped.append(resize_spatial_tensor(value[..., y1:y2, x1:x2], target_width, target_height))
    return torch.cat(cropped, dim=0)


class SpatialCrop:
    """``DiffSynthCnetPatch.spatial_crop_inputs`` (nodes_model_patch.py@4f8cf3e2), to mix into a DiffSynth
    patch class of a ComfyUI that has none; ``crop_calls`` records the keyword arguments of each call."""

    crop_calls: list = []

    def spatial_crop_inputs(self, *, regions, source_width, source_height, target_width, target_height):
        type(self).crop_calls.append(dict(regions=list(regions), source_width=source_width,
                                          source_height=source_height, target_width=target_width,
                                          target_height=target_height))
        return type(self)(self.model_patch, self.vae,
                          crop_bhwc_regions(self.image, regions, source_width, source_height, target_width,
                                            target_height),
                          self.strength,
                          mask=crop_mask_regions(self.mask, regions, source_width, source_height, target_width,
                                                 target_height))


def real_crop_patch():
    """The running ComfyUI's ``DiffSynthCnetPatch`` if it has ``spatial_crop_inputs``, else None."""
    import comfy_extras.nodes_model_patch as nmp
    cls = getattr(nmp, "DiffSynthCnetPatch", None)
    return cls if callable(getattr(cls, "spatial_crop_inputs", None)) else None
