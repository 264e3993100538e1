"""A prompt per tile (issue 13) through ComfyUI's real KSampler: each tile's model calls use its
own prompt, tiles with different prompts share model calls, the negative keeps its own."""
from collections import Counter

import pytest
import torch

import qtd_fixtures as fx

W_PX, H_PX = 256, 192          # 32 x 24 latent; a 2 x 2 grid of 128 x 96 px cells


def grid(pack, tiles=(2, 2)):
    (layout,) = fx.call_node(pack.nodes.QuadtreeGridLayout, width=W_PX, height=H_PX, tile_width=W_PX // tiles[0],
                             tile_height=H_PX // tiles[1], denoise=1.0)
    return layout


def tile_conditioning(pack, base, layout, prompts):
    (out,) = fx.call_node(pack.nodes.QuadtreeTileConditioning, conditioning=[base], quadtree=[layout],
                          tile_conditioning=list(prompts))
    return out


def tiled(pack, model, layout, **kw):
    """Quadtree Diffusion (``fx.tiled``) with this file's settings, ``kw`` on top."""
    return fx.tiled(pack, model, **{
        **dict(quadtree=layout, method="MultiDiffusion", tile_overlap=0, tile_batch_size=4, variable_denoise="off"),
        **kw})


def source(seed=3):
    return torch.randn(1, 4, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.fixture(scope="module")
def local():
    return fx.local_model(0)


@pytest.fixture(scope="module")
def prompts():
    """Four tile prompts, two of them with twice the tokens (padded per call as ComfyUI pads)."""
    return [fx.tiny_conditioning(f"tile {i}", tokens=77 * (1 + i % 2)) for i in range(4)]


def run(model, pos, neg=None, steps=3):
    return fx.run_ksampler(model, pos, neg or fx.tiny_conditioning("blurry"), source(), steps=steps, cfg=5.0,
                           denoise=0.8)


def test_one_tile_samples_with_its_prompt_exactly_as_untiled(pack, local):
    base, own = fx.tiny_conditioning("base"), fx.tiny_conditioning("the tile's own", tokens=154)
    layout = grid(pack, (1, 1))
    out = run(tiled(pack, local, layout), tile_conditioning(pack, base, layout, [own]))
    assert torch.equal(out, run(local, own))
    assert not torch.allclose(out, run(local, base), atol=1e-3), "the prompt has no visible effect"


def test_each_tile_samples_as_if_the_whole_canvas_had_its_prompt(pack, local, prompts):
    """No overlap: every tile is independent, so tile i of the mixed run equals tile i of a run in which
    every tile has prompt i, although one model call holds all four tiles' different prompts."""
    layout = grid(pack)
    base = fx.tiny_conditioning("base")
    model = tiled(pack, local, layout)
    mixed = run(model, tile_conditioning(pack, base, layout, prompts))
    for i, t in enumerate(layout.tiles):
        alone = run(model, tile_conditioning(pack, base, layout, [prompts[i]] * 4))
        core = (..., slice(t.y // 8, (t.y + t.h) // 8), slice(t.x // 8, (t.x + t.w) // 8))
        torch.testing.assert_close(mixed[core], alone[core], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed, run(model, base), atol=1e-3)


def test_each_prompt_reaches_exactly_its_tiles_evaluations(pack, prompts):
    """Recorded at the model: per call, the cond rows carry the tiles' own contexts (4 different ones
    in one call at tile batch 4), each tile prompt once per step, the negative rows the negative."""
    model, log = fx.logged(fx.local_model(0))
    neg = fx.tiny_conditioning("blurry")
    layout = grid(pack)
    steps = 3
    run(tiled(pack, model, layout), tile_conditioning(pack, fx.tiny_conditioning("base"), layout, prompts),
        neg, steps=steps)

    def which(row):
        for name, ctx in [(f"tile {i}", p[0][0][0]) for i, p in enumerate(prompts)] + [("neg", neg[0][0][0])]:
            reps = row.shape[0] // ctx.shape[0]
            if row.shape[0] % ctx.shape[0] == 0 and torch.equal(row, ctx.repeat(reps, 1)):
                return name
        return None

    seen = Counter()
    for call in log.calls:
        for kind, ctx in call.chunks():
            names = [which(r) for r in ctx]
            if kind == 1:
                assert names == ["neg"] * len(ctx)
            else:
                assert len(set(names)) == len(ctx) == 4, names  # four different tile prompts in one call
                seen.update(names)
    assert seen == Counter({f"tile {i}": steps for i in range(4)})


def test_wrong_number_of_tile_prompts_is_refused(pack, prompts):
    layout = grid(pack)
    with pytest.raises(ValueError, match=r"tile_conditioning: 3 prompts for the 4 tiles of the quadtree"):
        tile_conditioning(pack, fx.tiny_conditioning("base"), layout, prompts[:3])


def test_tile_prompts_under_an_area_follow_the_canvas_tiles(pack, prompts):
    """Tile prompts set to an area (Tile Conditioning -> ConditioningSetArea): the area's calls are
    evaluated on the canvas windows that touch it, and each takes the prompt of the canvas tile
    under its core, not of the tile at the same place within the area."""
    import nodes as comfy_nodes
    model, log = fx.logged(fx.local_model(0))
    layout = grid(pack, (4, 1))                         # four 64-px columns
    base = fx.tiny_conditioning("base")
    right = comfy_nodes.ConditioningSetArea().append(tile_conditioning(pack, base, layout, prompts), W_PX // 2, H_PX,
                                                     W_PX // 2, 0, 1.0)[0]
    pos = comfy_nodes.ConditioningCombine().combine(base, right)[0]
    steps = 2
    run(tiled(pack, model, layout), pos, steps=steps)

    seen = Counter()                                    # tile prompts only reach the area's evaluations
    for call in log.calls:
        for kind, ctx in call.chunks():
            for r in ctx:
                seen.update(i for i, p in enumerate(prompts) if torch.equal(r[:77], p[0][0][0][:77]) and kind == 0)
    assert seen == Counter({2: steps, 3: steps}), seen  # the right half's tiles, each once per step


def test_each_tile_prompt_is_evaluated_exactly_in_its_tiles_active_steps(pack):
    """A quadtree with per-tile denoise (schedule): tile i's prompt reaches the model exactly
    round(d_i * n) times, once per step in which tile i is active, and never otherwise."""
    vd = pack.variable_denoise
    model, log = fx.logged(fx.local_model(0))
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=fx.synthetic_photo(W_PX, H_PX, seed=1),
                             content_threshold=25.0, min_tile_size=32, min_denoise=0.25, max_denoise=1.0,
                             line_thickness=0, max_tile_size=128)
    denoise = [t.denoise for t in layout.tiles]
    assert len({vd.active_steps(d, 4) for d in denoise}) >= 2, denoise     # tiles active in different steps
    prompts = [fx.tiny_conditioning(f"tile prompt {i}") for i in range(len(layout.tiles))]
    steps = 4
    run(tiled(pack, model, layout, variable_denoise="schedule"),
        tile_conditioning(pack, fx.tiny_conditioning("base"), layout, prompts), steps=steps)

    contexts = [p[0][0][0] for p in prompts]
    seen = Counter()
    for call in log.calls:
        for kind, ctx in call.chunks():
            for r in ctx:
                hits = [i for i, c in enumerate(contexts) if torch.equal(r, c)]
                assert kind == 0 or not hits, "a tile prompt in the negative's rows"
                seen.update(hits)
    assert seen == Counter({i: vd.active_steps(d, steps) for i, d in enumerate(denoise) if vd.active_steps(d, steps)})
