"""Video: spatial tiles x ComfyUI's temporal Context Windows (issue 21), through ComfyUI's real KSampler.

A tiny Wan 2.1 (tests/families.py) on a 9-frame latent with ComfyUI's own ``ContextWindowsManual``
node (4-frame windows on the frame axis, overlap 1) and Quadtree Diffusion: every model input is one
temporal window x one tile batch; one tile is Context Windows alone, bit for bit; per-tile denoise
and skip work inside the windows (the window's frames of the source latent, cut by ComfyUI's own
window object).  Skipped where the running ComfyUI has no Context Windows.
"""
import logging

import pytest
import torch

import qtd_families as fam
import qtd_fixtures as fx

FRAMES, H_PX, W_PX = 9, 128, 128         # latent [1, 16, 9, 16, 16]
CONTEXT = 4


def context_node():
    try:
        import comfy_extras.nodes_context_windows as ncw
    except ImportError as e:
        pytest.skip(f"this ComfyUI has no Context Windows (comfy_extras.nodes_context_windows: {e})")
    node = getattr(ncw, "ContextWindowsManualNode", None)
    if node is None:
        pytest.skip("this ComfyUI has no ContextWindowsManual node")
    return node


def with_context(model, length=CONTEXT, overlap=1):
    node = context_node()
    args = fx.node_input_defaults(node)
    args.update(model=model, context_length=length, context_overlap=overlap, dim=2)
    return fx.call_node(node, **args)[0]


def tiled(pack, model, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{**dict(tile_width=64, tile_height=64, tile_overlap=32, tile_batch_size=4), **kw})


@pytest.fixture(scope="module")
def wan():
    context_node()
    return fam.tiny("WAN21_T2V")


@pytest.fixture(scope="module")
def source():
    return torch.randn(1, 16, FRAMES, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(0))


def test_every_model_input_is_one_temporal_window_by_one_tile_batch(pack, wan, source):
    model, log = fx.logged(wan.model)
    out = fx.run_ksampler(with_context(tiled(pack, model)), wan.positive, wan.negative, source, steps=2, denoise=0.8)
    assert torch.isfinite(out).all()
    frames = {s[2] for s in log.shapes}
    # 4 frames a window (ComfyUI 0.28 adds one causal anchor frame before a window that does not start at 0)
    assert frames and max(frames) <= CONTEXT + 1 < FRAMES, log.shapes
    assert all(s[-2:] == (8, 8) and s[0] <= 2 * 4 for s in log.shapes), log.shapes      # 8x8 latent tiles, <= 4 a call


def test_one_tile_with_context_windows_equals_context_windows_alone(pack, wan, source):
    alone = fx.run_ksampler(with_context(wan.model), wan.positive, wan.negative, source, steps=2, denoise=0.8)
    one = fx.run_ksampler(with_context(tiled(pack, wan.model, tile_width=W_PX, tile_height=H_PX)), wan.positive,
                          wan.negative, source, steps=2, denoise=0.8)
    assert torch.equal(one, alone)
    untiled = fx.run_ksampler(wan.model, wan.positive, wan.negative, source, steps=2, denoise=0.8)
    assert not torch.equal(alone, untiled)            # the windows do change the result: the test can fail


def interiors(layout, pred):
    return [(t.y // 8, (t.y + t.h) // 8, t.x // 8, (t.x + t.w) // 8) for t in layout.tiles if pred(t)]


@pytest.mark.parametrize("mode", ["schedule", "scale"])
def test_per_tile_denoise_and_skip_inside_temporal_windows(pack, wan, source, mode, caplog):
    """A quadtree with d = 0 tiles and skipped tiles: inside every temporal window skipped tiles (and, in
    schedule mode, d = 0 tiles) keep the source latent exactly, in every frame; the other tiles change;
    the engine never says the source did not match the model input."""
    photo = fx.synthetic_photo(W_PX, H_PX, seed=1)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=photo, content_threshold=25.0, min_tile_size=16,
                             min_denoise=0.0, max_denoise=0.9, line_thickness=0, max_tile_size=64)
    sizes = sorted({t.min_side for t in layout.tiles})
    skip_below = sizes[1] if len(sizes) > 2 else 0
    zero = interiors(layout, lambda t: t.denoise == 0.0)
    skipped = interiors(layout, lambda t: t.min_side < skip_below)
    changed = interiors(layout, lambda t: t.denoise > 0.0 and t.min_side >= skip_below)
    assert zero and skipped and changed
    m = with_context(tiled(pack, wan.model, quadtree=layout, tile_overlap=0, skip_diffusion_below=skip_below,
                           variable_denoise=mode))
    with caplog.at_level(logging.INFO):
        out = fx.run_ksampler(m, wan.positive, wan.negative, source, steps=4, denoise=0.9)
    assert "does not match the model input" not in caplog.text
    assert "Context window" in caplog.text or "context windows" in caplog.text.lower()
    for y0, y1, x0, x1 in (zero if mode == "schedule" else []) + skipped:
        torch.testing.assert_close(out[..., y0:y1, x0:x1], source[..., y0:y1, x0:x1], atol=1e-5, rtol=0)
    assert all(float((out - source)[..., a:b, c:d].abs().mean()) > 1e-2 for a, b, c, d in changed)
