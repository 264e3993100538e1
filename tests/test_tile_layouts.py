"""What a person sees of a layout and how per-tile workflows address tiles (issue 13): tile crops
in tile order, tile indices drawn on the preview, a grid as a QUADTREE layout."""
import pytest
import torch

import qtd_fixtures as fx


def visualize(pack, image, **kw):
    """Quadtree Visualizer (``fx.visualize``) with this file's settings, ``kw`` on top."""
    return fx.visualize(pack, image, **{**dict(content_threshold=20.0, min_tile_size=32, line_thickness=0,
                                               max_tile_size=128), **kw})


@pytest.fixture(scope="module")
def photo():
    return fx.synthetic_photo(256, 192, seed=4)


def test_tile_crops_are_the_tiles_in_tile_order(pack, photo):
    _, layout = visualize(pack, photo)
    (crops,) = fx.call_node(pack.nodes.QuadtreeTileCrops, image=photo, quadtree=layout)
    assert isinstance(crops, list) and len(crops) == len(layout.tiles) > 4
    covered = torch.zeros(192, 256, dtype=torch.int32)
    for crop, t in zip(crops, layout.tiles):
        assert torch.equal(crop, photo[:, t.y:t.y + t.h, t.x:t.x + t.w])
        covered[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    assert bool((covered == 1).all()), "the crops are not a partition of the image"


def test_tile_crops_of_an_upscaled_image_follow_the_scaled_layout(pack, photo):
    _, layout = visualize(pack, photo)
    big = torch.nn.functional.interpolate(photo.movedim(-1, 1), scale_factor=2, mode="nearest").movedim(1, -1)
    (crops,) = fx.call_node(pack.nodes.QuadtreeTileCrops, image=big, quadtree=layout)
    assert [c.shape[1:3] for c in crops] == [(2 * t.h, 2 * t.w) for t in layout.tiles]


@pytest.mark.parametrize("bad, message", [
    ("aspect", "quadtree: built for a 256x192px image but the image is 256x256px"),
    ("per_image", "quadtree: one layout per image (2 images with different layouts)"),
    ("not_a_layout", "quadtree: expected the QUADTREE output"),
])
def test_tile_crops_refuse_what_they_cannot_cut(pack, photo, bad, message):
    _, layout = visualize(pack, photo)
    image, quadtree = photo, layout
    if bad == "aspect":
        image = fx.synthetic_photo(256, 256, seed=1)
    elif bad == "per_image":
        quadtree = (layout, layout)
    else:
        quadtree = "tiles"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fx.call_node(pack.nodes.QuadtreeTileCrops, image=image, quadtree=quadtree)


def test_text_mask_draws_digits(pack):
    tp = pack.tile_preview
    one = tp.text_mask("1", 1)
    assert one.shape == (5, 3) and one[:, 1].all() and not one[0, 0]
    ten = tp.text_mask("10", 2)
    assert ten.shape == (10, 14)                       # (4 * 2 - 1) * 2 wide
    assert torch.equal(ten[::2, 8::2], tp.text_mask("0", 1))   # the second digit after a 1-px gap
    assert not ten[:, 6:8].any()


def test_visualizer_draws_each_tiles_index_at_its_corner(pack, photo):
    tp = pack.tile_preview
    plain, layout = visualize(pack, photo)
    drawn, same = visualize(pack, photo, draw_indices=True)
    assert same.tiles == layout.tiles
    changed = (drawn != plain).any(-1)[0]
    for i, t in enumerate(layout.tiles):
        s = tp.index_scale(t, len(str(i)))
        mask = tp.text_mask(str(i), s)
        label = drawn[0, t.y + s:t.y + s + mask.shape[0], t.x + s:t.x + s + mask.shape[1]]
        assert bool((label[mask] == 1.0).all()) and bool((label[~mask] == 0.0).all()), i
        # nothing drawn outside the tiles' label boxes
        changed[max(0, t.y):t.y + mask.shape[0] + 2 * s, max(0, t.x):t.x + mask.shape[1] + 2 * s] = False
    assert not changed.any()


def test_grid_layout_is_a_row_major_partition(pack):
    (layout,) = fx.call_node(pack.nodes.QuadtreeGridLayout, width=1000, height=600, tile_width=400,
                             tile_height=256, denoise=0.7)
    assert (layout.width, layout.height, layout.kind) == (1000, 600, "grid")
    assert [(t.x, t.y, t.w, t.h) for t in layout.tiles[:4]] == [(0, 0, 400, 256), (400, 0, 400, 256),
                                                                (800, 0, 200, 256), (0, 256, 400, 256)]
    assert len(layout.tiles) == 3 * 3 and {t.denoise for t in layout.tiles} == {0.7}
    assert bool((pack.quadtree.coverage(layout) == 1).all())


def test_grid_layout_samples_as_a_quadtree(pack):
    """A grid layout drives Quadtree Diffusion like a quadtree: every cell (with its overlap margin)
    is evaluated, in batches of same-size windows."""
    model, log = fx.logged(fx.local_model(0))
    (layout,) = fx.call_node(pack.nodes.QuadtreeGridLayout, width=256, height=192, tile_width=128,
                             tile_height=96, denoise=1.0)
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=model, quadtree=layout, tile_overlap=16, tile_batch_size=1, method="MultiDiffusion")
    (m,) = fx.call_node(pack.nodes.QuadtreeDiffusion, **args)
    g = torch.Generator().manual_seed(0)
    out = fx.run_ksampler(m, fx.tiny_conditioning("a"), fx.tiny_conditioning("b"),
                          torch.randn(1, 4, 24, 32, generator=g), steps=2, denoise=0.5)
    seen = [s[-2:] for s in log.shapes]
    assert len(seen) == 4 * 2 and set(seen) == {(14, 18)}       # 12x16 cells + 1 latent px margin a side
    # the quadtree of a flat image split to the same four cells samples to the same latent
    (_, quad) = fx.visualize(pack, torch.full((1, 192, 256, 3), 0.5), max_tile_size=128, min_denoise=1.0,
                             max_denoise=1.0)
    assert [(t.x, t.y, t.w, t.h) for t in quad.tiles] == [(t.x, t.y, t.w, t.h) for t in layout.tiles]
    args.update(quadtree=quad)
    g = torch.Generator().manual_seed(0)
    same = fx.run_ksampler(fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0], fx.tiny_conditioning("a"),
                           fx.tiny_conditioning("b"), torch.randn(1, 4, 24, 32, generator=g), steps=2, denoise=0.5)
    assert torch.equal(out, same)
