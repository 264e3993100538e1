"""Tiles inside ComfyUI's temporal context windows (``comfy/context_windows.py``).

With Context Windows on a video model, ComfyUI's context handler evaluates each step window by
window along the frame axis: every call it makes to the model holds only that window's frames,
and before each call it puts the window in ``transformer_options["context_window"]``.  The engine
tiles such a call like any other (every model input is one temporal window x one tile batch).

Per-tile denoise and skip need the sampler's source latent *at the call's frames*: the window
object itself cuts it, with ComfyUI's own ``window.get_tensor`` -- the same method the handler
used to cut the latent for this call (with its causal anchor frame, where ComfyUI adds one, and the
handler's ``latent_retain_index_list``).  Nothing is patched and no frame index is recomputed here.
"""
from __future__ import annotations

import inspect

import torch


def window_frames(to: dict, source: torch.Tensor | None, handler=None) -> torch.Tensor | None:
    """The source latent restricted to the temporal context window of this call, or None when the
    call has no context window (or the window cannot cut the source as it cut the latent)."""
    window = (to or {}).get("context_window")
    get_tensor = getattr(window, "get_tensor", None)
    if source is None or get_tensor is None:
        return None
    retain = list(getattr(handler, "latent_retain_index_list", None) or [])
    try:
        if not retain:
            return get_tensor(source)
        if "retain_index_list" not in inspect.signature(get_tensor).parameters:
            return None
        return get_tensor(source, retain_index_list=retain)
    except (IndexError, RuntimeError, TypeError):    # a source of another length: not this call's frames
        return None
