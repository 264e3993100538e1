"""Pixel sizes mean the same on a 16x, 32x or 1x model as on an 8x one (issue 11).

ComfyUI declares a latent format's compression (``spacial_downscale_ratio``) since 0.11; on
older versions the pack's own table (``utils.KNOWN_COMPRESSION``) stands in.  The models are the
local fixture model with the channel count and latent format of real ComfyUI families, sampled
through KSampler; the tile windows the model sees, in pixels, must be the same at every ratio.
"""
import pytest
import torch

W_PX, H_PX = 512, 384
# latent format -> image pixels per latent pixel, as ComfyUI 0.28 declares them
EXPECTED = {"SD15": 8, "SDXL": 8, "Flux": 8, "Wan21": 8, "Flux2": 16, "Wan22": 16, "HunyuanVideo15": 16,
            "LTXV": 32, "HunyuanImage21": 32, "SC_Prior": 42, "SC_B": 4, "ChromaRadiance": 1}
FORMATS = ["SD15", "Flux2", "HunyuanImage21", "ChromaRadiance"]     # 8x, 16x, 32x, 1x (all 2-D)


def latent_format(name):
    import comfy.latent_formats as lf
    if not hasattr(lf, name):
        pytest.skip(f"this ComfyUI has no latent format {name}")
    return getattr(lf, name)()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_compression_of_each_latent_format(pack, name):
    """The ratio the engine uses for each family: ComfyUI's own where declared, else the table."""
    class Base:      # latent_compression reads the model's latent_format only
        pass

    base = Base()
    base.latent_format = latent_format(name)
    assert pack.utils.latent_compression(base) == EXPECTED[name]
    declared = getattr(base.latent_format, "spacial_downscale_ratio", None)
    assert declared in (None, EXPECTED[name]), "the pack's table disagrees with this ComfyUI"


def tile_calls(pack, fx, name, **node):
    """(ratio, [(h, w) in pixels of every tile row the model saw], output) of one tiled KSampler run
    (rows, not calls: ComfyUI may batch cond and uncond or not, depending on the canvas size)."""
    fmt = latent_format(name)
    model, log = fx.logged(fx.local_model_for_format(fmt, seed=0))
    ratio = pack.utils.latent_compression(model.model)
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=model, tile_width=256, tile_height=256, tile_overlap=64, tile_batch_size=1,
                method="MultiDiffusion")
    args.update(node)
    tiled = fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0]
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, fmt.latent_channels, H_PX // ratio, W_PX // ratio, generator=g)
    out = fx.run_ksampler(tiled, fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry"), lat, steps=2,
                          cfg=3.0, denoise=0.5)
    seen = [(s[-2] * ratio, s[-1] * ratio) for s in log.shapes for _ in range(s[0])]
    return ratio, seen, out


@pytest.mark.parametrize("name", FORMATS[1:])
def test_grid_tiles_and_overlap_in_pixels_at_any_compression(pack, fx, name):
    """A 256-px grid with a 64-px overlap on a 512x384-px image: 3x2 windows of 256 px at 128-px
    steps, whatever the model's compression."""
    _, ref, _ = tile_calls(pack, fx, "SD15")
    ratio, seen, out = tile_calls(pack, fx, name)
    assert ratio == EXPECTED[name]
    assert torch.isfinite(out).all()
    assert ref == [(256, 256)] * (3 * 2 * 2 * 2) and seen == ref    # 6 tiles x (cond, uncond) x 2 steps


@pytest.mark.parametrize("name", FORMATS[1:])
def test_quadtree_and_skip_in_pixels_at_any_compression(pack, fx, name):
    """A quadtree built on the 512x384-px image (flat left half: large tiles; detailed right half:
    small ones) and a 100-px skip threshold: the same tiles (in pixels) are evaluated and skipped
    on every model."""
    img = fx.synthetic_photo(W_PX, H_PX, seed=1)
    img[:, :, :W_PX // 2] = 0.5
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=img, content_threshold=20.0, min_tile_size=64,
                             min_denoise=1.0, max_denoise=1.0, line_thickness=0, max_tile_size=256)
    sizes = sorted({(t.h, t.w) for t in layout.tiles})
    assert len(sizes) > 1, "the layout should mix tile sizes"
    kw = dict(quadtree=layout, tile_overlap=0, skip_diffusion_below=100, variable_denoise="off")
    _, ref, _ = tile_calls(pack, fx, "SD15", **kw)
    ratio, seen, out = tile_calls(pack, fx, name, **kw)
    assert torch.isfinite(out).all()
    assert sorted(seen) == sorted(ref) and all(min(s) >= 100 for s in seen)
    assert 0 < len(ref) == 2 * 2 * sum(1 for t in layout.tiles if min(t.w, t.h) >= 100) < 4 * len(layout.tiles)
