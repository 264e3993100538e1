"""Pure tests of the layouts in quadtree.py (issues 3 and 6): quadtree, grid, scaling to latent units.

Everything here runs without a model: layouts are plain data, the metric is checked against an
independent per-crop computation (torch.std over the crop, population std, 0-255 units).
"""
import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def qt(pack):
    return importlib.import_module(pack.__name__ + ".quadtree")


# --------------------------------------------------------------------------- images

def flat(h, w, value=0.5):
    return torch.full((h, w, 3), value, dtype=torch.float32)


def make_image(h, w, kind, seed):
    """Small test images with structure at several scales ([H, W, 3] in 0..1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return flat(h, w, float(torch.rand(1, generator=g)))
    if kind == "noise":
        return torch.rand(h, w, 3, generator=g)
    if kind == "patch":   # flat background, one noisy rectangle
        img = flat(h, w, 0.4)
        y0, x0 = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        y1 = y0 + int(torch.randint(1, h - y0 + 1, (1,), generator=g))
        x1 = x0 + int(torch.randint(1, w - x0 + 1, (1,), generator=g))
        img[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, 3, generator=g)
        return img
    # "blocks": piecewise-constant cells of a random size, amplitude random
    cell = int(torch.randint(4, 64, (1,), generator=g))
    amp = float(torch.rand(1, generator=g))
    small = torch.rand(-(-h // cell), -(-w // cell), 3, generator=g) * amp
    return small.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:h, :w].contiguous()


def crop_metric(image, x, y, w, h):
    """||per-channel population std||_2 of the RGB crop in 0-255 units (independent of the pack)."""
    crop = image[y:y + h, x:x + w, :3].to(torch.float64) * 255.0
    return float(crop.reshape(-1, 3).std(dim=0, unbiased=False).norm())


def assert_partition(qt, layout):
    cov = qt.coverage(layout)
    assert cov.shape == (layout.height, layout.width)
    assert int(cov.min()) == 1 and int(cov.max()) == 1, (
        f"not a partition: {int((cov == 0).sum())} uncovered, {int((cov > 1).sum())} overlapped pixels")
    assert sum(t.area for t in layout.tiles) == layout.width * layout.height


images = st.tuples(st.integers(8, 300), st.integers(8, 300),
                   st.sampled_from(["flat", "noise", "patch", "blocks"]), st.integers(0, 2**31 - 1))


# --------------------------------------------------------------------------- quadtree properties

@settings(max_examples=40, **SETTINGS)
@given(img=images, threshold=st.floats(0.0, 120.0), min_tile=st.integers(1, 160),
       max_tile=st.sampled_from([8, 16, 24, 64, 96, 128, 256, 1024]),
       dn=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_quadtree_properties(qt, img, threshold, min_tile, max_tile, dn):
    h, w, kind, seed = img
    image = make_image(h, w, kind, seed)
    min_d, max_d = min(dn), max(dn)
    lay = qt.build_quadtree(image, threshold, min_tile, max_tile, min_d, max_d)

    # root = the image cropped to the 8-px grid; the leaves partition it
    assert (lay.width, lay.height) == (w // 8 * 8, h // 8 * 8)
    assert lay.kind == "quadtree"
    assert_partition(qt, lay)

    min_side = max(min_tile, 8)
    forced_lb = max(8, (max_tile + 1) // 2 - 7)   # a forced split of a side > max_tile leaves halves >= this
    for t in lay.tiles:
        # aligned to the 8-px latent grid, inside the canvas
        assert t.x % 8 == 0 and t.y % 8 == 0 and t.w % 8 == 0 and t.h % 8 == 0, t
        assert 0 <= t.x and t.x + t.w <= lay.width and 0 <= t.y and t.y + t.h <= lay.height, t
        # no leaf exceeds max_tile_size
        assert t.w <= max_tile and t.h <= max_tile, (t, max_tile)
        # content splits never go below max(min_tile_size, 8); only a forced split may
        for side, root in ((t.w, lay.width), (t.h, lay.height)):
            assert side == root or side >= min(min_side, forced_lb), (t, min_side, max_tile)
            if max_tile >= max(lay.width, lay.height):       # no forced split possible
                assert side == root or side >= min_side, (t, min_side)
        # a leaf whose halves would still be >= min_side is flat enough (otherwise it should have split)
        hx, hy = max(8, t.w // 2 // 8 * 8), max(8, t.h // 2 // 8 * 8)
        splittable = min(hx, t.w - hx) >= min_side and min(hy, t.h - hy) >= min_side
        if splittable:
            m = crop_metric(image, t.x, t.y, t.w, t.h)
            assert m <= threshold + 1e-6 * max(1.0, threshold), (t, m, threshold)
        assert min_d - 1e-12 <= t.denoise <= max_d + 1e-12

    # denoise: monotone in area, largest -> min_denoise, smallest -> max_denoise, one size -> min_denoise
    areas = [t.area for t in lay.tiles]
    big = [t for t in lay.tiles if t.area == max(areas)]
    small = [t for t in lay.tiles if t.area == min(areas)]
    assert all(t.denoise == pytest.approx(min_d, abs=1e-9) for t in big)
    if max(areas) == min(areas):
        assert all(t.denoise == pytest.approx(min_d, abs=1e-9) for t in lay.tiles)
    else:
        assert all(t.denoise == pytest.approx(max_d, abs=1e-9) for t in small)
    by_area = sorted(lay.tiles, key=lambda t: t.area)
    for a, b in zip(by_area, by_area[1:]):
        assert b.denoise <= a.denoise + 1e-12, (a, b)
        if b.area > a.area and max_d - min_d > 1e-6:
            assert b.denoise < a.denoise, ("distinct sizes must get distinct denoise", a, b)


@settings(max_examples=15, **SETTINGS)
@given(img=images, threshold=st.floats(0.0, 60.0), small=st.integers(1, 7))
def test_min_tile_size_below_8_acts_as_8(qt, img, threshold, small):
    h, w, kind, seed = img
    image = make_image(h, w, kind, seed)
    a = qt.build_quadtree(image, threshold, small, 64, 0.2, 0.8)
    b = qt.build_quadtree(image, threshold, 8, 64, 0.2, 0.8)
    assert a.tiles == b.tiles


def test_noise_with_zero_threshold_stops_at_8px(qt):
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    lay = qt.build_quadtree(image, 0.0, 1, 1024, 0.2, 0.8)
    assert_partition(qt, lay)
    assert {(t.w, t.h) for t in lay.tiles} == {(8, 8)} and len(lay.tiles) == 64
    # 48 px wide = 24 + 24 = (8 + 16) + ...: an 8-wide x 16-high node cannot split into four >= 8-px children
    lay = qt.build_quadtree(image[:, :48], 0.0, 1, 1024, 0.2, 0.8)
    assert_partition(qt, lay)
    assert {(t.w, t.h) for t in lay.tiles} == {(8, 8), (8, 16)}


def test_each_depth_gets_a_distinct_denoise(qt):
    # 256x256: the top-left quadrant is noise (splits down to 32 px, depth 3), the top-right quadrant
    # is four flat 64-px cells of different colours (splits once, to 64 px, depth 2), the bottom half
    # is flat (128-px leaves, depth 1).
    g = torch.Generator().manual_seed(0)
    image = flat(256, 256, 0.5)
    image[:128, :128] = torch.rand(128, 128, 3, generator=g)
    for k, (y, x) in enumerate([(0, 128), (0, 192), (64, 128), (64, 192)]):
        image[y:y + 64, x:x + 64] = 0.2 * k
    lay = qt.build_quadtree(image, 10.0, 32, 1024, 0.2, 0.8)
    assert_partition(qt, lay)
    by_depth = {}
    for t in lay.tiles:
        by_depth.setdefault(t.depth, set()).add(round(t.denoise, 12))
    assert all(len(v) == 1 for v in by_depth.values()), by_depth
    values = [next(iter(v)) for _, v in sorted(by_depth.items())]
    assert len(by_depth) >= 3, by_depth
    assert len(set(values)) == len(values), by_depth
    assert values == sorted(values), "deeper (smaller) tiles must get higher denoise"
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(0.8)
    # log2(area) interpolation: equal steps per depth (area / 4 per level)
    depths = sorted(by_depth)
    span = depths[-1] - depths[0]
    for dpt, v in zip(depths, values):
        assert v == pytest.approx(0.2 + 0.6 * (dpt - depths[0]) / span)


# --------------------------------------------------------------------------- the metric

def test_flat_image_gives_one_tile(qt):
    lay = qt.build_quadtree(flat(384, 512, 0.3), 0.0 + 1e-9, 8, 1024, 0.2, 0.8)
    assert [(t.x, t.y, t.w, t.h) for t in lay.tiles] == [(0, 0, 512, 384)]
    assert lay.tiles[0].denoise == pytest.approx(0.2)


def test_flat_image_larger_than_max_tile_is_split_to_max(qt):
    lay = qt.build_quadtree(flat(512, 512), 25.0, 8, 128, 0.2, 0.8)
    assert_partition(qt, lay)
    assert {(t.w, t.h) for t in lay.tiles} == {(128, 128)} and len(lay.tiles) == 16
    assert all(t.denoise == pytest.approx(0.2) for t in lay.tiles)    # one size -> all min_denoise


def test_noisy_region_splits_flat_region_does_not(qt):
    image = flat(256, 256, 0.5)
    image[:128, :128] = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(3))
    lay = qt.build_quadtree(image, 20.0, 32, 1024, 0.2, 0.8)
    assert_partition(qt, lay)
    noisy = [t for t in lay.tiles if t.x < 128 and t.y < 128]
    rest = [t for t in lay.tiles if not (t.x < 128 and t.y < 128)]
    assert {(t.w, t.h) for t in noisy} == {(32, 32)} and len(noisy) == 16
    assert sorted((t.x, t.y, t.w, t.h) for t in rest) == [(0, 128, 128, 128), (128, 0, 128, 128),
                                                          (128, 128, 128, 128)]
    assert all(t.denoise == pytest.approx(0.8) for t in noisy)
    assert all(t.denoise == pytest.approx(0.2) for t in rest)


def checker_image(h, w, amps):
    """0.5 +- amp_c/255 on a pixel checkerboard: every even-sized aligned crop has std amp_c (0-255)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    sign = ((yy + xx) % 2 * 2 - 1).to(torch.float64)
    img = torch.stack([0.5 + sign * a / 255.0 for a in amps], dim=-1)
    return img.to(torch.float32)


def test_threshold_is_magnitude_of_per_channel_std_in_255_units(qt):
    # sigma_R = 30, sigma_G = 40, sigma_B = 0  ->  ||sigma|| = 50 (not 70 = sum, not 23.3 = mean,
    # not 0.196 = 0-1 units)
    image = checker_image(64, 64, (30.0, 40.0, 0.0))
    expected = crop_metric(image, 0, 0, 64, 64)
    assert expected == pytest.approx(50.0, abs=1e-3)
    split = qt.build_quadtree(image, expected - 0.05, 16, 1024, 0.2, 0.8)
    whole = qt.build_quadtree(image, expected + 0.05, 16, 1024, 0.2, 0.8)
    assert len(whole.tiles) == 1
    assert {(t.w, t.h) for t in split.tiles} == {(16, 16)}   # every crop has the same std: splits to min
    # channel permutation does not matter (magnitude), and sigma in one channel alone counts fully
    single = checker_image(64, 64, (0.0, 0.0, 50.0))
    assert len(qt.build_quadtree(single, 49.9, 16, 1024, 0.2, 0.8).tiles) == 16
    assert len(qt.build_quadtree(single, 50.1, 16, 1024, 0.2, 0.8).tiles) == 1


def test_metric_is_not_fooled_by_a_large_mean_and_ignores_alpha(qt):
    # a bright flat image (large mean, zero std) with huge noise only in an alpha channel
    rgb = flat(128, 128, 0.99)
    alpha = torch.rand(128, 128, 1, generator=torch.Generator().manual_seed(0))
    lay = qt.build_quadtree(torch.cat([rgb, alpha], dim=-1), 1.0, 16, 1024, 0.2, 0.8)
    assert len(lay.tiles) == 1


# --------------------------------------------------------------------------- sizes and errors

def test_non_square_not_multiple_of_8_root_is_cropped(qt):
    image = torch.rand(61, 100, 3, generator=torch.Generator().manual_seed(5))
    lay = qt.build_quadtree(image, 5.0, 8, 1024, 0.2, 0.8)
    assert (lay.width, lay.height) == (96, 56)
    assert_partition(qt, lay)
    assert all(t.w % 8 == 0 and t.h % 8 == 0 for t in lay.tiles)


def test_tiny_8x8_image(qt):
    noisy = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0))
    for image in (flat(8, 8), noisy, torch.rand(15, 9, 3)):
        lay = qt.build_quadtree(image, 0.0, 1, 1024, 0.2, 0.8)
        assert (lay.width, lay.height) == (8, 8)
        assert [(t.x, t.y, t.w, t.h) for t in lay.tiles] == [(0, 0, 8, 8)]
        assert lay.tiles[0].denoise == pytest.approx(0.2)


@pytest.mark.parametrize("shape", [(7, 7, 3), (4, 100, 3), (100, 5, 3), (0, 0, 3)])
def test_image_smaller_than_8_px_is_a_clear_error(qt, shape):
    with pytest.raises(ValueError, match="image") as e:
        qt.build_quadtree(torch.zeros(shape), 25.0, 128, 1024, 0.2, 0.8)
    assert "8" in str(e.value)


@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (64, 64), (64, 64, 1)])
def test_image_of_wrong_shape_is_a_clear_error(qt, shape):
    with pytest.raises(ValueError, match="image"):
        qt.build_quadtree(torch.zeros(shape), 25.0, 128, 1024, 0.2, 0.8)


# --------------------------------------------------------------------------- grid

@settings(max_examples=60, **SETTINGS)
@given(W=st.integers(1, 300), H=st.integers(1, 300), tw=st.integers(1, 400), th=st.integers(1, 400))
def test_grid_layout_partition(qt, W, H, tw, th):
    lay = qt.grid_layout(W, H, tw, th)
    assert (lay.width, lay.height, lay.kind) == (W, H, "grid")
    assert_partition(qt, lay)
    ctw, cth = min(tw, W), min(th, H)          # tiles larger than the canvas are clamped
    assert len(lay.tiles) == math.ceil(W / ctw) * math.ceil(H / cth)
    for t in lay.tiles:
        assert t.denoise == 1.0
        assert 1 <= t.w <= ctw and 1 <= t.h <= cth
        # only the last column / row may be narrower: it is the leftover strip, flush with the edge
        assert t.w == ctw or t.x + t.w == W
        assert t.h == cth or t.y + t.h == H
    assert max(t.x + t.w for t in lay.tiles) == W and max(t.y + t.h for t in lay.tiles) == H


@settings(max_examples=80, **SETTINGS)
@given(length=st.integers(1, 400), tile=st.integers(1, 500), overlap=st.integers(0, 500))
def test_grid_starts_cover_and_end_flush(qt, length, tile, overlap):
    starts = qt.grid_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length          # last window flush with the edge
    assert starts == sorted(set(starts))
    assert all(0 <= s <= length - size for s in starts)
    # the fewest windows whose neighbours share >= overlap px (when the overlap leaves a stride)
    stride = max(1, size - overlap)
    assert len(starts) == math.ceil((length - size) / stride) + 1
    for a, b in zip(starts, starts[1:]):
        assert b - a <= stride, (starts, size, overlap)


def test_grid_one_pixel_leftover_strip(qt):
    lay = qt.grid_layout(17, 9, 8, 8)
    assert_partition(qt, lay)
    assert sorted({t.w for t in lay.tiles}) == [1, 8] and sorted({t.h for t in lay.tiles}) == [1, 8]
    starts = qt.grid_starts(17, 8, 0)
    assert len(starts) == 3 and starts[0] == 0 and starts[-1] == 9


# --------------------------------------------------------------------------- scaling to latent units

layouts = st.one_of(
    st.tuples(st.just("quadtree"), images, st.floats(0.0, 60.0), st.integers(8, 64)),
    st.tuples(st.just("grid"), st.integers(8, 300), st.integers(8, 300), st.integers(1, 200), st.integers(1, 200)),
)


def build(qt, spec):
    if spec[0] == "quadtree":
        (h, w, kind, seed), thr, mn = spec[1:]
        return qt.build_quadtree(make_image(h, w, kind, seed), thr, mn, 128, 0.1, 0.9)
    _, W, H, tw, th = spec
    return qt.grid_layout(W, H, tw, th)


@settings(max_examples=40, **SETTINGS)
@given(spec=layouts, W=st.integers(1, 120), H=st.integers(1, 120), align=st.sampled_from([1, 2]))
def test_scale_layout_is_a_partition(qt, spec, W, H, align):
    lay = build(qt, spec)
    scaled = qt.scale_layout(lay, W, H, align)
    assert (scaled.width, scaled.height, scaled.kind) == (W, H, lay.kind)
    assert_partition(qt, scaled)
    originals = {(t.depth, t.denoise) for t in lay.tiles}
    for t in scaled.tiles:
        assert (t.depth, t.denoise) in originals
        if align > 1:   # interior edges on the patch grid (canvas edges stay where they are)
            for edge, end in ((t.x, W), (t.x + t.w, W), (t.y, H), (t.y + t.h, H)):
                assert edge in (0, end) or edge % align == 0, (t, W, H, align)


def test_scale_layout_pixel_to_latent_is_exact(qt):
    image = torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(2))
    image[:, 128:] = 0.5
    lay = qt.build_quadtree(image, 20.0, 16, 1024, 0.2, 0.8)
    assert len({t.area for t in lay.tiles}) > 1
    lat = qt.scale_layout(lay, 32, 32)
    assert_partition(qt, lat)
    assert [(t.x * 8, t.y * 8, t.w * 8, t.h * 8, t.denoise) for t in lat.tiles] == \
           [(t.x, t.y, t.w, t.h, t.denoise) for t in lay.tiles]
    # patch alignment on a layout whose latent edges are already even changes nothing
    assert qt.scale_layout(lay, 32, 32, 2).tiles == lat.tiles


def test_scale_layout_odd_latent_with_patch_alignment(qt):
    lay = qt.grid_layout(25, 25, 1, 1)                        # 1-latent-px cells
    scaled = qt.scale_layout(lay, 25, 25, 2)
    assert_partition(qt, scaled)
    for t in scaled.tiles:
        for edge in (t.x, t.x + t.w, t.y, t.y + t.h):
            assert edge in (0, 25) or edge % 2 == 0, t
    # the odd canvas keeps its last 1-px strip: its edges are the canvas end and an even interior edge
    assert any(t.x == 24 and t.w == 1 for t in scaled.tiles)
