#!/usr/bin/env python
"""Reference images of edit models under tiling: what each reference mode costs and how far it lands
from untiled sampling, on tiny FLUX Kontext, Flux.2 and Qwen-Image-Edit models (ComfyUI's own
classes, seeded weights), through the real KSampler.

    .cache/venv/bin/python benchmarks/bench_references.py [--steps 4] [--json out.json]

For each family: an img2img edit (denoise 0.7, CFG 2) of a smooth latent with a reference of the
canvas's size (the usual edit-model upscale: the source image as reference), untiled, with one tile
over the canvas and with a 2 x 2 grid (Mixture of Diffusers, overlap a quarter of a tile), in both
reference modes.  Counted from the tokens the diffusion model embeds (a forward pre-hook on its
``img_in``): image tokens per step (canvas + reference, summed over rows and calls), the longest
sequence (what attention memory follows) and sum of L^2 over rows (what attention work follows).
Distance: mean |tiled - untiled| / std(untiled) of the sampled latent.  Counts, not times.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))

import benchlib  # noqa: E402

H, W = 32, 48          # latent px of the canvas (FLUX / Qwen-Image: 16 x 24 tokens; Flux.2: 32 x 48)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--pack", default=None, help="load the node pack from this folder (e.g. an earlier version "
                                                   "checked out elsewhere, to compare)")
    a = ap.parse_args(argv)

    fx, pack, comfy_path = benchlib.setup("cpu", threads=1, pack_dir=a.pack)
    pack_modes = getattr(getattr(pack, "reference_latents", None), "MODES", None) or ()
    modes = pack_modes or ("(pack without reference_mode)",)
    spec = importlib.util.spec_from_file_location("qtd_families", os.path.join(REPO, "tests", "families.py"))
    fam = importlib.util.module_from_spec(spec)
    sys.modules["qtd_families"] = fam
    spec.loader.exec_module(fam)
    import node_helpers
    import nodes as comfy_nodes
    import torch

    results = {"versions": benchlib.versions(comfy_path), "steps": a.steps, "canvas_latent": [H, W], "rows": []}
    for name in ("Flux", "Flux2", "QwenImage"):
        t = fam.tiny(name)
        five = name == "QwenImage"
        C = t.model.model.latent_format.latent_channels
        p = t.patch[0]
        shape = (1, C, 1, H, W) if five else (1, C, H, W)
        lat = fx.smooth_latent(C, H, W, seed=1).reshape(shape) if hasattr(fx, "smooth_latent") else torch.randn(shape)
        ref = fx.smooth_latent(C, H, W, seed=2).reshape(shape)
        extra = {"reference_latents": [ref]}
        pos = node_helpers.conditioning_set_values(t.positive, extra)
        neg = node_helpers.conditioning_set_values(t.negative, extra)
        dm = t.model.model.diffusion_model
        comp = pack.utils.latent_compression(t.model.model)

        def run(model):
            lengths = []
            hook = dm.img_in.register_forward_pre_hook(lambda m, args: lengths.append(tuple(args[0].shape[:2])))
            try:
                out = comfy_nodes.common_ksampler(model, 7, a.steps, 2.0, "euler", "simple", pos, neg,
                                                  {"samples": lat}, denoise=0.7)[0]["samples"]
            finally:
                hook.remove()
            return out, lengths

        base, base_len = run(t.model)
        std = base.std().item()
        canvas_tokens = (H // p) * (W // p)
        for layout, tile in (("one tile", (H, W)), ("2x2 grid", (H // 2 + H // 8, W // 2 + W // 8))):
            for mode in tuple(modes) + (None,):
                if mode is None:
                    model, label = t.model, "untiled"
                    if layout != "one tile":
                        continue
                else:
                    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
                    args.update(model=t.model, tile_batch_size=4, tile_width=tile[1] * comp, tile_height=tile[0] * comp,
                                tile_overlap=(tile[0] // 4) * comp)
                    if mode in pack_modes:
                        args["reference_mode"] = mode
                    model, label = fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0], mode
                try:
                    out, lengths = run(model)
                except RuntimeError as e:      # a mode this ComfyUI's model cannot place (no post_input hook)
                    results["rows"].append({"family": name, "layout": layout, "mode": label,
                                            "refused": str(e).split(";")[0]})
                    continue
                steps = a.steps
                row = {"family": name, "layout": layout if mode else "-", "mode": label,
                       "tokens_per_step": sum(b * L for b, L in lengths) // steps,
                       "longest_sequence": max(L for _, L in lengths),
                       "attention_L2_per_step": sum(b * L * L for b, L in lengths) // steps,
                       "canvas_tokens": canvas_tokens,
                       "distance": round((out - base).abs().mean().item() / std, 5)}
                results["rows"].append(row)
    headers = ["family", "layout", "mode", "tokens_per_step", "longest_sequence", "attention_L2_per_step", "distance"]
    print(benchlib.fmt_table(headers, [[r.get(h, "refused" if h == "distance" else "-") for h in headers]
                                       for r in results["rows"]]))
    if a.json:
        benchlib.write_json(a.json, results)


if __name__ == "__main__":
    main()
