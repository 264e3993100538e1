#!/usr/bin/env python
"""Model work of regional prompts under tiling: model pixels per step with one small area prompt
(or one plain mask prompt) versus without, and against ComfyUI's untiled sampling, through the
real KSampler; and the model's calls per step with two regional prompts.

    .cache/venv/bin/python benchmarks/bench_regional.py [--canvas 1024] [--region 256] [--pack DIR]

Counts (not times): the latent pixels x batch rows the model receives, summed over one run, from
a unet wrapper placed under the tile engine. A regional prompt should cost model work only on the
tiles its area touches, so the extra work is about (area + one tile's context) / canvas of the
global prompt's, never a canvas-sized call. A plain mask prompt (``ConditioningSetMask`` without
``mask bounds``) is a canvas-sized call for ComfyUI; tiled, it costs the windows its mask touches.
Calls: two area prompts of one size at two places (ComfyUI puts them in one call), and two plain
mask prompts, each with the canvas prompt: model calls per step, rows per call, distinct input
shapes (``--pack`` measures another checkout of the pack, e.g. an older commit, side by side).
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--canvas", type=int, default=1024, help="canvas side in px (default 1024)")
    p.add_argument("--region", type=int, default=256, help="side of the area prompt's square in px (default 256)")
    p.add_argument("--tile", type=int, default=384, help="grid tile side in px (default 384)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pack", default=None, help="the node pack to measure (default: this checkout)")
    a = p.parse_args(argv)

    import fixtures as fx
    fx.setup_comfy()
    import torch
    import nodes as comfy_nodes
    pack = fx.load_pack(os.path.realpath(a.pack) if a.pack else REPO)

    model = fx.local_model(0)
    work = {"pixels": 0, "largest": 0, "calls": 0, "rows": 0, "shapes": set()}

    def count(apply_model, args):
        x = args["input"]
        px = x.shape[0] * x.shape[-2] * x.shape[-1]
        work["pixels"] += px
        work["largest"] = max(work["largest"], x.shape[-2] * x.shape[-1])
        work["calls"] += 1
        work["rows"] += x.shape[0]
        work["shapes"].add(tuple(x.shape))
        return apply_model(x, args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(count)
    base, neg = fx.tiny_conditioning("a landscape"), fx.tiny_conditioning("blurry")
    r, c = a.region, a.canvas
    area = comfy_nodes.ConditioningSetArea().append(fx.tiny_conditioning("a red barn"), r, r, (c - r) // 2,
                                                    (c - r) // 2, 1.0)[0]
    regional = comfy_nodes.ConditioningCombine().combine(base, area)[0]
    mask = torch.zeros(1, c, c)
    mask[:, (c - r) // 2:(c + r) // 2, (c - r) // 2:(c + r) // 2] = 1.0
    masked = comfy_nodes.ConditioningSetMask().append(fx.tiny_conditioning("a red barn"), mask, "default", 1.0)[0]
    mask_regional = comfy_nodes.ConditioningCombine().combine(base, masked)[0]
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=model, tile_width=a.tile, tile_height=a.tile, tile_overlap=64, tile_batch_size=4)
    tiled = fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0]
    lat = torch.randn(1, 4, c // 8, c // 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, m in (("untiled", model), ("tiled", tiled)):
        for label, pos in (("global prompt", base), ("+ one area prompt", regional),
                           ("+ one mask prompt", mask_regional)):
            work.update(pixels=0, largest=0)
            fx.run_ksampler(m, pos, neg, lat, steps=a.steps, denoise=0.8)
            rows.append((name, label, work["pixels"] / a.steps, work["largest"]))
    print(f"canvas {c}x{c}px, area (or mask) prompt {r}x{r}px at the centre, grid tiles {a.tile}px, overlap 64px, "
          f"{a.steps} steps (latent px x rows per step; largest model input in latent px)")
    print(f"{'':10} {'prompts':20} {'model px/step':>14} {'largest input':>14}")
    for name, label, px, largest in rows:
        print(f"{name:10} {label:20} {px:14.0f} {largest:14d}")
    for name in ("untiled", "tiled"):
        g, ra, rm = [px for n, _, px, _ in rows if n == name]
        print(f"{name}: the area prompt adds {ra / g - 1:.1%} model work, the mask prompt {rm / g - 1:.1%} "
              f"(its area is {(r * r) / (c * c):.1%} of the canvas)")

    # two regional prompts: calls per step
    def area(text, x, y):
        return comfy_nodes.ConditioningSetArea().append(fx.tiny_conditioning(text), r, r, x, y, 1.0)[0]

    def masked(text, x, y):
        m = torch.zeros(1, c, c)
        m[:, y:y + r, x:x + r] = 1.0
        return comfy_nodes.ConditioningSetMask().append(fx.tiny_conditioning(text), m, "default", 1.0)[0]

    combine = comfy_nodes.ConditioningCombine().combine
    cases = {"2 area prompts (one size)": combine(combine(base, area("a red barn", 64, 64))[0],
                                                  area("a blue lake", c - r - 64, c - r - 64))[0],
             "2 mask prompts": combine(combine(base, masked("a red barn", 64, 64))[0],
                                       masked("a blue lake", c - r - 64, c - r - 64))[0]}
    print(f"\n{'prompts':28} {'calls/step':>10} {'rows/call':>10} {'input shapes':>13}   (tiled, tile batch 4)")
    for label, pos in cases.items():
        work.update(pixels=0, largest=0, calls=0, rows=0, shapes=set())
        fx.run_ksampler(tiled, pos, neg, lat, steps=a.steps, denoise=0.8)
        print(f"{label:28} {work['calls'] / a.steps:10.1f} {work['rows'] / work['calls']:10.2f} "
              f"{len(work['shapes']):13d}")


if __name__ == "__main__":
    main()
