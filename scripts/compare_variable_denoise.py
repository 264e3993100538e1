"""Measure `schedule` vs `scale` variable denoise on a fixed img2img case (numbers for the README).

    .cache/venv/bin/python scripts/compare_variable_denoise.py [--steps 20] [--denoise 0.8]

Runs ComfyUI's real KSampler (euler, CFG 7) with the local fixture model on the fixture VAE's
latent of the synthetic photo, tiled by its quadtree (min_denoise 0.2, max_denoise 0.8), in the
modes off / scale / schedule, and reports per tile class (preserved = the largest tiles, d = 0.2;
regenerated = the smallest, d = 0.8):

* distance from the source: mean |out - src| over the tiles' interiors;
* residual noise: std of the high-pass (out - 3x3 box blur of out) minus that of the source,
  over the same interiors (how much unresolved high-frequency energy the tiles keep);
* tile evaluations made.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def load_fixtures():
    """tests/fixtures.py with ComfyUI set up for the CPU (the benchmarks' loader)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import benchlib
    return benchlib.load_fixtures(setup_comfy=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--denoise", type=float, default=0.8)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    fx = load_fixtures()
    import torch
    pack = fx.load_pack(REPO)

    photo = fx.synthetic_photo(a.size, a.size, seed=1)
    src = fx.FixtureVAE().encode(photo)
    _, layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=photo, content_threshold=25.0, min_tile_size=64,
                             min_denoise=0.2, max_denoise=0.8, line_thickness=1, max_tile_size=1024)
    model = fx.local_model(0)
    pos, neg = fx.tiny_conditioning("a photo"), fx.tiny_conditioning("blurry")
    lo = min(t.denoise for t in layout.tiles)
    hi = max(t.denoise for t in layout.tiles)

    def interiors(pred):
        m = torch.zeros(src.shape[-2:], dtype=torch.bool)
        for t in layout.tiles:
            if pred(t):
                m[t.y // 8 + 1:(t.y + t.h) // 8 - 1, t.x // 8 + 1:(t.x + t.w) // 8 - 1] = True
        return m

    classes = {"preserved (d=%.1f)" % lo: interiors(lambda t: t.denoise == lo),
               "regenerated (d=%.1f)" % hi: interiors(lambda t: t.denoise == hi)}

    def highpass_std(z, mask):
        blur = torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
        return float((z - blur)[..., mask].std())

    rows = []
    for mode in ("off", "scale", "schedule"):
        calls = []

        def counting(apply_model, args, calls=calls):
            calls.append(args["input"].shape[0] // len(args["cond_or_uncond"]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        base = model.clone()
        base.set_model_unet_function_wrapper(counting)
        node = pack.nodes.QuadtreeDiffusion
        args = fx.node_input_defaults(node)
        args.update(model=base, quadtree=layout, variable_denoise=mode, tile_batch_size=8)
        tiled = fx.call_node(node, **args)[0]
        out = fx.run_ksampler(tiled, pos, neg, src, steps=a.steps, cfg=7.0, denoise=a.denoise, seed=11)
        row = {"mode": mode, "tile_evaluations": sum(calls)}
        for name, mask in classes.items():
            row[f"{name}: distance from source"] = float((out - src)[..., mask].abs().mean())
            row[f"{name}: residual noise"] = highpass_std(out, mask) - highpass_std(src, mask)
        rows.append(row)

    keys = list(rows[0].keys())
    print(f"img2img {a.size}x{a.size}px, {a.steps} euler steps, denoise {a.denoise}, {len(layout.tiles)} tiles "
          f"{layout.size_histogram()}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
