#!/usr/bin/env python
"""CPU benchmark of the tile engine with the local fixture model, through ComfyUI's real KSampler.

    .cache/venv/bin/python benchmarks/bench_cpu.py            # default size (a few minutes on 1 thread)
    .cache/venv/bin/python benchmarks/bench_cpu.py --small    # CI size (seconds)
    .cache/venv/bin/python benchmarks/bench_cpu.py --json out.json

Everything is a ratio of two times (or counts) measured side by side in this one run; nothing is
asserted about time. Sections:

A. engine overhead = (tiled s/step / untiled s/step) / (sum of tile-window areas / canvas area),
   per method (window areas from the engine's own ``Plan``). 1.0 = the engine costs exactly the
   extra model work its overlap asks for; > 1 = time lost in the engine (or worse model
   throughput on small tiles); < 1 = the model runs faster on tiles than on the whole canvas.
B. at the limit = tiled KSampler s/step / the bare ``apply_model`` replaying the very same tile
   batches (recorded from step 1 of that run). The untiled row is ComfyUI's own baseline.
C. model work saved by ``variable_denoise`` ``schedule``/``scale`` and by ``skip_diffusion_below``
   on a quadtree with mixed denoise (min 0.2, max 0.8), img2img, versus ``variable_denoise`` off:
   tile evaluations counted by a model wrapper (cross-checked with the engine's run summary).
D. tile batch sweep incl. auto (``tile_batch_size`` 0): s/step relative to the best fixed batch.
E. ``torch.profiler`` of one tiled step: share of the step's time outside the model calls, the
   largest ops outside the model, and host syncs (``aten::item``/``_local_scalar_dense``).
F. the engine alone: its wrapper timed around a model that returns its input (no model cost), per
   model call and per tile, for the configurations of A.

Timing: each step is time-stamped by the sampler callback with the thread's CPU time (torch is
pinned to ``--threads`` 1, so CPU time is the work done, steady on a shared machine; wall-clock
step times are kept in the JSON); a run's s/step is the median of its steps after the first;
each configuration is run ``--repeats`` times (interleaved) and the fastest is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import benchlib

METHODS = ("MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI size: a 512px canvas, 3 steps, one repeat")
    p.add_argument("--json", metavar="PATH", help="write all measurements as JSON")
    p.add_argument("--steps", type=int, help="sampler steps (default 10, small 3)")
    p.add_argument("--repeats", type=int, help="runs per timed configuration (default 3, small 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    p.add_argument("--canvas", type=int, help="canvas side in px (default 1024, small 512)")
    p.add_argument("--image", help="photo for the quadtree (default: the demo photo of "
                   "scripts/make_sample_photo.py at the canvas size, else tests/fixtures.synthetic_photo)")
    p.add_argument("--pack", help="benchmark the node pack in this folder instead of the checkout "
                   "(to measure a prototype copy of the engine)")
    p.add_argument("--skip-profile", action="store_true", help="leave out section E")
    p.add_argument("--sections", default="ABCDEF", help="which sections to run (default ABCDEF)")
    p.add_argument("--compare-pack", metavar="DIR",
                   help="also time section F (engine alone) with the node pack in DIR (a prototype copy), "
                        "side by side with the checkout's, and print the ratio")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        small = args.small
        self.canvas = args.canvas or (512 if small else 1024)
        self.tile = self.canvas // 2
        self.overlap = 32 if small else 64
        self.steps = args.steps or (3 if small else 10)
        self.repeats = args.repeats or (1 if small else 3)
        self.fx, self.pack, self.comfy_path = benchlib.setup("cpu", args.threads, pack_dir=args.pack)
        import torch
        self.torch = torch
        self.model = self.fx.local_model(seed=0)
        self.base = self.model.model
        self.pos = self.fx.tiny_conditioning("a photo of a landscape")
        self.neg = self.fx.tiny_conditioning("")
        self.H = self.W = self.canvas // 8
        self.empty = self.fx.empty_latent(self.canvas, self.canvas)
        self.image = self._image()
        self.log = benchlib.RunSummaryLog()
        self.results: dict = {"versions": benchlib.versions(self.comfy_path),
                              "settings": {"canvas_px": self.canvas, "tile_px": self.tile,
                                           "overlap_px": self.overlap, "steps": self.steps,
                                           "repeats": self.repeats, "cfg": 7.0, "sampler": "euler",
                                           "model": "tests/fixtures.local_model (3 convs, hidden 32)",
                                           "small": bool(small)}}
        self.ratios: dict = {}

    def _image(self):
        import numpy as np
        img = None
        if self.args.image:
            from PIL import Image
            img, self.image_source = Image.open(self.args.image), self.args.image
        else:
            maker = benchlib.demo_photo_maker()
            if maker is not None:
                img, self.image_source = maker(self.canvas), "scripts/make_sample_photo.py (demo photo)"
        if img is None:
            self.image_source = "tests/fixtures.synthetic_photo"
            return self.fx.synthetic_photo(self.canvas, self.canvas, seed=0)
        img = img.convert("RGB").resize((self.canvas, self.canvas))
        return self.torch.from_numpy(np.asarray(img).astype("float32") / 255.0)[None]

    def quadtree(self, min_denoise=0.2, max_denoise=0.8):
        node = benchlib.node_class(self.pack, "QuadtreeVisualizer")
        min_tile = max(32, self.canvas // 8)
        _, layout = self.fx.call_node(node, image=self.image, content_threshold=25.0, min_tile_size=min_tile,
                                      min_denoise=min_denoise, max_denoise=max_denoise, line_thickness=0,
                                      max_tile_size=self.canvas // 2)
        return layout

    # ---- one KSampler run
    def run(self, tiled: dict | None, latent=None, denoise=1.0, steps=None, record_step=None, profiler=None):
        m, meter, clock = benchlib.instrument(self.model, "cpu", profile_ranges=profiler is not None)
        meter.record_step = record_step
        if tiled is not None:
            m = benchlib.tile_model(self.pack, m, **tiled)
        latent = latent or self.empty
        t0 = time.perf_counter()
        with self.log.attached(self.pack.__name__):      # the engine's modules log under the package
            n_before = len(self.log.summaries)
            self.fx.run_ksampler(m, self.pos, self.neg, latent, seed=1, steps=steps or self.steps, cfg=7.0,
                                 sampler_name="euler", scheduler="normal", denoise=denoise)
        wall = time.perf_counter() - t0
        summary = self.log.summaries[-1] if len(self.log.summaries) > n_before else None
        return {"wall_s": wall, "step_s": clock.steady_step_time(), "step_times": clock.step_times,
                "wall_step_times": clock.wall_step_times,
                "calls": meter.calls, "tiles": meter.tiles, "pixels": meter.pixels,
                "max_rows": max(s[0] for s in meter.shapes) if meter.shapes else 0,
                "shapes": {"x".join(map(str, k)): v for k, v in meter.shapes.items()},
                "engine_summary": summary, "recorded": meter.recorded}

    # ---- A + B
    def overhead_configs(self):
        th = {"tile_width": self.tile, "tile_height": self.tile, "tile_overlap": self.overlap,
              "tile_batch_size": 4, "variable_denoise": "off"}
        configs = [("untiled", None)]
        for method in METHODS:
            configs.append((f"{method} / grid", dict(th, method=method)))
        configs.append(("Mixture of Diffusers / quadtree", dict(th, method="Mixture of Diffusers",
                                                                quadtree=self.quadtree())))
        return configs

    def section_overhead(self):
        configs = self.configs
        best: dict = {}
        for _ in range(self.repeats):
            for name, cfg in configs:
                r = self.run(cfg, record_step=1)
                raw = benchlib.replay_time(self.base, r.pop("recorded"), "cpu", repeats=3)
                prev = best.get(name)
                r["raw_step_s"] = raw
                if prev is None:
                    best[name] = r
                else:   # keep the fastest of each measured quantity
                    prev["step_s"] = min(prev["step_s"], r["step_s"])
                    prev["raw_step_s"] = min(prev["raw_step_s"], raw)
        untiled = best["untiled"]
        comfy_own = untiled["step_s"] - untiled["raw_step_s"]     # ComfyUI's own per-step work
        rows = []
        for name, cfg in configs:
            r = best[name]
            area = 1.0
            n_tiles = 1
            if cfg is not None:
                area, plan = benchlib.window_area_ratio(self.pack, self.base, self.H, self.W, **cfg)
                n_tiles = len(plan.windows)
            rel = r["step_s"] / untiled["step_s"]
            overhead = rel / area
            limit = r["step_s"] / r["raw_step_s"]
            engine = r["step_s"] - r["raw_step_s"] - comfy_own
            r.update(area_ratio=area, n_tiles=n_tiles, time_ratio=rel, overhead=overhead, at_limit=limit,
                     engine_s_per_step=engine, config=None if cfg is None else
                     {k: v for k, v in cfg.items() if k != "quadtree"})
            rows.append((name, n_tiles, f"{area:.3f}", f"{r['step_s'] * 1e3:.1f}", f"{rel:.3f}",
                         f"{overhead:.3f}" if cfg is not None else "-", f"{r['raw_step_s'] * 1e3:.1f}",
                         f"{limit:.3f}", f"{engine * 1e3:+.1f}" if cfg is not None else "-"))
            key = name.replace(" / ", "/").replace(" ", "_")
            if cfg is not None:
                self.ratios[f"overhead[{key}]"] = overhead
            self.ratios[f"at_limit[{key}]"] = limit
        self.results["overhead"] = best
        print(f"\nA/B. Engine overhead and distance to the raw model ({self.canvas}x{self.canvas}px canvas, "
              f"{self.tile}px tiles, overlap {self.overlap}px, tile batch 4, {self.steps} euler steps, CFG 7; "
              f"CPU ms of one thread, best of {self.repeats})")
        print(benchlib.fmt_table(
            ["configuration", "tiles", "window area / canvas", "ms/step", "tiled/untiled", "overhead",
             "raw model ms/step", "at limit (step/raw)", "engine ms/step*"], rows))
        print("* step - raw model - (untiled step - untiled raw model): what tiling adds beyond ComfyUI's own "
              "per-step work; +-1 ms is within this machine's noise")

    # ---- F
    def section_engine_alone(self):
        other = None
        if self.args.compare_pack:
            other = self.fx.load_pack(os.path.realpath(self.args.compare_pack), name="qtd_compare")
        rows = []
        out = {}
        for name, cfg in self.configs:
            if cfg is None:
                continue
            best: dict = {}
            for _ in range(self.repeats):      # interleaved, fastest kept
                for label, pk in (("checkout", self.pack), ("compare", other)):
                    if pk is None:
                        continue
                    r = benchlib.engine_only(pk, self.H, self.W, cfg, steps=self.steps)
                    if label not in best or r["s_per_call"] < best[label]["s_per_call"]:
                        best[label] = r
            r = best["checkout"]
            out[name] = r
            row = [name, f"{r['tiles_per_call']:.0f}", f"{r['s_per_call'] * 1e3:.2f}", f"{r['s_per_tile'] * 1e6:.0f}"]
            key = name.replace(" / ", "/").replace(" ", "_")
            self.ratios[f"engine_us_per_tile[{key}]"] = r["s_per_tile"] * 1e6
            if other is not None:
                o = best["compare"]
                out[name + " (compare)"] = o
                row += [f"{o['s_per_call'] * 1e3:.2f}", f"{o['s_per_call'] / r['s_per_call']:.3f}"]
                self.ratios[f"compare_engine_time[{key}]"] = o["s_per_call"] / r["s_per_call"]
            rows.append(row)
        self.results["engine_alone"] = out
        print("\nF. The engine alone: its wrapper around a model that returns its input (no model cost), "
              "as KSampler drives it (cond+uncond per call)"
              + (f"; compared with {self.args.compare_pack}" if other is not None else ""))
        headers = ["configuration", "tiles per call", "engine ms per call", "engine us per tile"]
        if other is not None:
            headers += ["compare: ms per call", "compare / checkout"]
        print(benchlib.fmt_table(headers, rows))

    # ---- C
    def section_model_work(self):
        layout = self.quadtree(0.2, 0.8)
        import comfy.utils  # noqa: F401
        latent = {"samples": self.fx.FixtureVAE().encode(self.image)}
        steps = self.args.steps or (4 if self.args.small else 20)
        sizes = sorted({min(t.w, t.h) for t in layout.tiles})
        skip_px = sizes[0] * 2 if len(sizes) > 1 else 0
        base = {"method": "Mixture of Diffusers", "tile_overlap": self.overlap, "tile_batch_size": 4,
                "quadtree": layout}
        modes = [("off", dict(base, variable_denoise="off")),
                 ("schedule", dict(base, variable_denoise="schedule")),
                 ("scale", dict(base, variable_denoise="scale")),
                 (f"off + skip <{skip_px}px", dict(base, variable_denoise="off", skip_diffusion_below=skip_px)),
                 (f"schedule + skip <{skip_px}px", dict(base, variable_denoise="schedule",
                                                        skip_diffusion_below=skip_px))]
        out = {}
        rows = []
        for name, cfg in modes:
            r = self.run(cfg, latent=latent, steps=steps)
            r.pop("recorded")
            out[name] = r
        off = out["off"]
        hist = {}
        for t in layout.tiles:
            hist[f"{t.w}x{t.h} d={t.denoise:.2f}"] = hist.get(f"{t.w}x{t.h} d={t.denoise:.2f}", 0) + 1
        expected = self.pack.variable_denoise.schedule_model_calls([t.denoise for t in layout.tiles], steps)
        for name, r in out.items():
            s = r["engine_summary"] or {}
            r["tiles_ratio"] = r["tiles"] / off["tiles"]
            r["pixels_ratio"] = r["pixels"] / off["pixels"]
            r["time_ratio"] = sum(r["step_times"]) / sum(off["step_times"])
            rows.append((name, r["calls"], r["tiles"], s.get("tiles", "-"), f"{r['tiles_ratio']:.3f}",
                         f"{r['pixels_ratio']:.3f}", f"{sum(r['step_times']):.2f}", f"{r['time_ratio']:.3f}"))
        self.ratios["schedule_tiles_ratio"] = out["schedule"]["tiles_ratio"]
        self.ratios["schedule_time_ratio"] = out["schedule"]["time_ratio"]
        skey = f"schedule + skip <{skip_px}px"
        self.ratios["schedule_skip_tiles_ratio"] = out[skey]["tiles_ratio"]
        self.ratios["skip_tiles_ratio"] = out[f"off + skip <{skip_px}px"]["tiles_ratio"]
        self.results["model_work"] = {"layout_tiles": len(layout.tiles), "layout_histogram": hist,
                                      "steps": steps, "skip_below_px": skip_px,
                                      "expected_schedule_tiles": expected,
                                      "runs": {k: {kk: vv for kk, vv in v.items()} for k, v in out.items()}}
        self.results["model_work"]["image"] = self.image_source
        print(f"\nC. Model work on the quadtree of {self.image_source} ({len(layout.tiles)} tiles: "
              + ", ".join(f"{n}x {k}" for k, n in hist.items())
              + f"), img2img, {steps} steps, MoD, tile batch 4; expected schedule evaluations "
              f"sum round(d*n) = {expected} of {len(layout.tiles) * steps}")
        print(benchlib.fmt_table(["variable_denoise", "model calls", "tile evaluations", "engine summary",
                                  "evaluations vs off", "latent px vs off", "sampling s", "time vs off"], rows))

    # ---- D
    def section_batch(self):
        batches = (1, 4, 0) if self.args.small else (1, 2, 4, 8, 16, 0)
        cfg = {"method": "Mixture of Diffusers", "tile_width": self.tile // 2, "tile_height": self.tile // 2,
               "tile_overlap": self.overlap, "variable_denoise": "off"}
        best: dict = {}
        for _ in range(self.repeats):
            for k in batches:
                r = self.run(dict(cfg, tile_batch_size=k))
                r.pop("recorded")
                if k not in best or r["step_s"] < best[k]["step_s"]:
                    best[k] = r
        fixed = min(best[k]["step_s"] for k in batches if k)
        rows = []
        _, plan = benchlib.window_area_ratio(self.pack, self.base, self.H, self.W, **cfg)
        for k in batches:
            r = best[k]
            chunks = 2
            r["tiles_per_call"] = r["max_rows"] // chunks
            r["vs_best_fixed"] = r["step_s"] / fixed
            rows.append(("auto (0)" if k == 0 else k, r["tiles_per_call"], r["calls"],
                         f"{r['step_s'] * 1e3:.1f}", f"{r['vs_best_fixed']:.3f}"))
        self.ratios["auto_vs_best_fixed"] = best[0]["vs_best_fixed"]
        self.results["batch_sweep"] = {str(k): {kk: vv for kk, vv in v.items()} for k, v in best.items()}
        print(f"\nD. Tile batch sweep (grid {self.tile // 2}px tiles, {len(plan.windows)} tiles, MoD, overlap "
              f"{self.overlap}px)")
        print(benchlib.fmt_table(["tile_batch_size", "tiles per call (max)", "model calls", "ms/step",
                                  "vs best fixed"], rows))

    # ---- E
    def section_profile(self):
        torch = self.torch
        cfg = {"method": "Mixture of Diffusers", "tile_width": self.tile, "tile_height": self.tile,
               "tile_overlap": self.overlap, "tile_batch_size": 4, "variable_denoise": "off"}
        self.run(cfg, steps=2)    # warm
        best = None
        for _ in range(1 if self.args.small else 2):   # the profiler's clock is wall time: keep the calmer one
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                self.run(cfg, steps=3, profiler=True)
            ev = prof.events()
            step = [e for e in ev if e.name == "qtd_bench::step1"]
            if step and (best is None or step[0].time_range.elapsed_us() < best[1][0].time_range.elapsed_us()):
                best = (ev, step)
        if best is None:
            print("\nE. profile: no step range recorded")
            return
        ev, step = best
        s0, s1 = step[0].time_range.start, step[0].time_range.end
        models = [e for e in ev if e.name == "qtd_bench::model" and s0 <= e.time_range.start < s1]
        in_model = sum(e.time_range.end - e.time_range.start for e in models)
        total = s1 - s0
        ranges = [(e.time_range.start, e.time_range.end) for e in models]

        def outside(e):
            a = e.time_range.start
            return s0 <= a < s1 and not any(r0 <= a < r1 for r0, r1 in ranges)

        agg: dict = {}
        syncs_out = syncs_all = 0
        for e in ev:
            if not (s0 <= e.time_range.start < s1) or e.name.startswith("qtd_bench::"):
                continue
            if e.name in ("aten::item", "aten::_local_scalar_dense"):
                syncs_all += e.name == "aten::_local_scalar_dense"
                if outside(e):
                    syncs_out += e.name == "aten::_local_scalar_dense"
            if outside(e):
                a = agg.setdefault(e.name, [0.0, 0])
                a[0] += e.self_cpu_time_total
                a[1] += 1
        share = 1.0 - in_model / total if total > 0 else float("nan")
        top = sorted(agg.items(), key=lambda kv: -kv[1][0])[:10]
        self.ratios["outside_model_share"] = share
        self.results["profile"] = {"step_us": total, "model_us": in_model, "outside_share": share,
                                   "model_calls_in_step": len(models), "host_syncs_outside_model": syncs_out,
                                   "host_syncs_in_step": syncs_all,
                                   "top_outside_ops": [{"op": k, "self_us": v[0], "count": v[1]} for k, v in top]}
        print(f"\nE. torch.profiler, one tiled step (step 1 of 3; MoD grid, {self.tile}px tiles, batch 4): "
              f"{total / 1e3:.1f} ms, {len(models)} model calls = {in_model / 1e3:.1f} ms; outside the model "
              f"{share:.1%}; host syncs (_local_scalar_dense) in the step: {syncs_all} ({syncs_out} outside "
              f"the model)")
        print(benchlib.fmt_table(["op outside the model calls", "self ms", "count"],
                                 [(k, f"{v[0] / 1e3:.2f}", v[1]) for k, v in top]))

    def main(self):
        v = self.results["versions"]
        print(f"bench_cpu: {v['cpu']} ({v['torch_threads']} torch threads), torch {v['torch']}, ComfyUI "
              f"{v['comfyui']}, date {v['date']}")
        t0 = time.perf_counter()
        self.configs = self.overhead_configs()
        sections = self.args.sections.upper()
        if "A" in sections or "B" in sections:
            self.section_overhead()
        if "C" in sections:
            self.section_model_work()
        if "D" in sections:
            self.section_batch()
        if "F" in sections:
            self.section_engine_alone()
        if "E" in sections and not self.args.skip_profile:
            self.section_profile()
        self.results["ratios"] = self.ratios
        self.results["wall_s"] = time.perf_counter() - t0
        print("\nratios:")
        for k, val in self.ratios.items():
            print(f"  {k} = {val:.3f}")
        print(f"(bench wall time {self.results['wall_s']:.1f} s)")
        if self.args.json:
            benchlib.write_json(self.args.json, self.results)
            print(f"wrote {self.args.json}")


def main(argv=None):
    Bench(parse_args(argv)).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
