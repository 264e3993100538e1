"""Measure SpotDiffusion's distance to the untiled sampler (numbers for the README's seam table).

    .cache/venv/bin/python scripts/measure_spot_seams.py [--schedules both,alternate] [--margins 0,8]
        [--edge-windows fixed,exact] [--pack PATH] [--seeds 0-7] [--json out.json]

The case of issue 15: ComfyUI's KSampler with the local fixture model (``fx.local_model(0)``,
receptive radius 3 latent px), a 64x96 latent (``randn * 2``, seed 3), 256-px grid tiles, 8 euler
steps at denoise 0.7, CFG 4.  For every shift method and shift seed it prints

    mean |tiled - untiled| / std(untiled)

the latent pixels evaluated per step relative to the canvas, and the distinct model input shapes
per run (mean over the seeds).  ``--pack`` measures another checkout of the pack (e.g. an export
of an older commit); ``--schedules``, ``--margins`` and ``--edge-windows`` set the SpotDiffusion
parameters' developer keys ``schedule``, ``context_margin`` (pixels) and ``edge_windows``; a pack
that does not know them ignores them.  It measures, it asserts nothing.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
METHODS = ("random", "sorted", "fibonacci")


def load_fixtures():
    """tests/fixtures.py with ComfyUI set up for the CPU (the benchmarks' loader)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import benchlib
    return benchlib.load_fixtures(setup_comfy=True)


def seed_range(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=REPO)
    ap.add_argument("--schedules", default="")
    ap.add_argument("--margins", default="0")
    ap.add_argument("--edge-windows", default="", help="comma list of edge_windows modes (fixed, exact)")
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--height", type=int, default=64, help="latent height")
    ap.add_argument("--width", type=int, default=96, help="latent width")
    ap.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    ap.add_argument("--source", default="randn", choices=("randn", "photo", "zeros"),
                    help="randn: randn * 2 (seed 3); photo: the fixture VAE's latent of the synthetic photo; "
                         "zeros: an empty latent")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    fx = load_fixtures()
    import torch
    pack = fx.load_pack(a.pack)
    spot_key = pack.utils.SPOT_KEY

    model = fx.local_model(0)
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    if a.source == "randn":
        lat = torch.randn(1, 4, a.height, a.width, generator=torch.Generator().manual_seed(3)) * 2.0
    elif a.source == "photo":
        lat = fx.FixtureVAE().encode(fx.synthetic_photo(a.width * 8, a.height * 8, seed=1))
    else:
        lat = torch.zeros(1, 4, a.height, a.width)
    run = dict(steps=8, cfg=4.0, sampler_name="euler", denoise=0.7)
    ref = fx.run_ksampler(model, pos, neg, lat, **run)
    std = float(ref.std())

    pixels, shapes = [], set()

    def counting(apply_model, args):
        pixels.append(args["input"].shape[0] // len(args["cond_or_uncond"]) * args["input"].shape[-1]
                      * args["input"].shape[-2])
        shapes.add(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    base = model.clone()
    base.set_model_unet_function_wrapper(counting)
    node = pack.nodes.QuadtreeDiffusion
    args = fx.node_input_defaults(node)
    args.update(model=base, method="SpotDiffusion", enable_overlap=False, tile_width=a.tile, tile_height=a.tile,
                tile_batch_size=8)
    tiled = fx.call_node(node, **args)[0]

    schedules = [s for s in a.schedules.split(",") if s] or [None]
    margins = [int(m) for m in a.margins.split(",")]
    edges = [e for e in a.edge_windows.split(",") if e] or [None]
    seeds = seed_range(a.seeds)
    rows = []
    for schedule in schedules:
        for margin in margins:
            for edge in edges:
                for method in a.methods.split(","):
                    errs, n_shapes = [], []
                    t0 = time.perf_counter()
                    pixels.clear()
                    for seed in seeds:
                        m = tiled.clone()
                        to = dict(m.model_options.get("transformer_options", {}))
                        params = {"shift_method": method, "seed": seed}
                        if schedule is not None:
                            params["schedule"] = schedule
                        if margin:
                            params["context_margin"] = margin
                        if edge is not None:
                            params["edge_windows"] = edge
                        to[spot_key] = params
                        m.model_options["transformer_options"] = to
                        shapes.clear()
                        out = fx.run_ksampler(m, pos, neg, lat, **run)
                        n_shapes.append(len(shapes))
                        errs.append(float((out - ref).abs().mean()) / std)
                    per_step = sum(pixels) / (len(seeds) * run["steps"] * a.height * a.width)
                    row = dict(schedule=schedule or "default", margin=margin, edge_windows=edge or "default",
                               method=method, errors=errs, mean=sum(errs) / len(errs), max=max(errs),
                               pixels_per_step=per_step, shapes_per_run=sum(n_shapes) / len(n_shapes),
                               seconds=time.perf_counter() - t0)
                    rows.append(row)
                    print(f"{row['schedule']:>14} margin {margin:>3}px {row['edge_windows']:>7} {method:>9}: "
                          f"mean {row['mean']:.4f} max {row['max']:.4f} (min {min(errs):.4f}) evaluated px/step "
                          f"{per_step:.2f}x canvas, {row['shapes_per_run']:.1f} input shapes per run  "
                          + " ".join(f"{e:.3f}" for e in errs), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(latent=[a.height, a.width], tile_px=a.tile, run=run, std=std, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
