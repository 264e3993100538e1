#!/usr/bin/env python
"""Large canvases: planning time, step time and engine overhead against the number of tiles.

    .cache/venv/bin/python benchmarks/bench_scale.py [--counts 100,1000,3000,10000] [--json out.json]
    .cache/venv/bin/python benchmarks/bench_scale.py --small          # CI size (seconds)

The local fixture model through ComfyUI's real KSampler (euler, CFG 1: one cond chunk per call),
64-px tiles (8 latent px), 16-px overlap, tile batch 16, ``variable_denoise`` off, on canvases
sized so the plan has about each requested number of tiles: a grid of Mixture of Diffusers, and a
quadtree of three tile sizes (64, 128, 256 px, seeded) with Mixture of Diffusers. Per row:

* ``plan ms``: building the engine's plan (``tile_plan.plan_for``) alone, the thread's CPU time
  (median of 3), and ``plan / step``: that time over one steady sampler step of the same run;
* ``start -> 1st call``: from the KSampler call to the model's first call (ComfyUI's own setup, the
  engine's memory planning and plan, the first tile batch's inputs), next to the untiled canvas's;
* ``s/step``: a steady step (median of the steps after the first), the thread's CPU time;
* ``bare s/step``: the bare ``apply_model`` replaying the very tile batches of one step;
* ``overhead`` = s/step / bare s/step (1.0: the engine and ComfyUI cost nothing beyond the model),
  each tiled run's step next to the bare replay right after it, the median over ``--repeats`` runs
  (the row's other times are that run's);
* the model's calls per step, rows per call and distinct input shapes per run (the engine's run
  summary).

Torch is pinned to one thread; every number is a ratio or count measured in this one run. Nothing
here is asserted about time (``tests/test_benchmarks_smoke.py`` runs ``--small``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import benchlib

TILE_PX, OVERLAP_PX, BATCH = 64, 16, 16
CALLS_RE = re.compile(r"the model: (\d+) calls, ([\d.]+) rows per call \(at most (\d+)\), (\d+) distinct input shapes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="100,1000,3000,10000", help="tile counts to plan for (about)")
    p.add_argument("--kinds", default="grid,quadtree")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="tiled runs per row; the fastest steady step is kept")
    p.add_argument("--small", action="store_true", help="CI size: 100 and 400 tiles, 2 steps")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--md", metavar="PATH", help="write the table as markdown")
    p.add_argument("--pack", help="benchmark the node pack in this folder instead of the checkout")
    return p.parse_args(argv)


class FirstCall(benchlib.ModelMeter):
    """ModelMeter that also stamps (thread CPU time) its first call."""

    def reset(self):
        super().reset()
        self.first = None

    def __call__(self, apply_model, args):
        if self.first is None:
            self.first = time.thread_time()
        return super().__call__(apply_model, args)


def grid_side(n: int) -> int:
    """Latent side of a square canvas whose grid of 8-px windows at stride 6 has about n windows."""
    per_axis = max(1, round(math.sqrt(n)))
    return 6 * (per_axis - 1) + 8


def quadtree_layout(qt, n: int, seed: int = 0):
    """A square layout of about n tiles of 64, 128 and 256 px: 256-px blocks, each kept, split into
    four 128s, or into 128s of which some split into four 64s (seeded)."""
    import torch
    blocks = max(1, round(math.sqrt(n / 5.5)))        # ~5.5 tiles per block on average
    g = torch.Generator().manual_seed(seed)
    tiles = []
    for by in range(blocks):
        for bx in range(blocks):
            x0, y0 = bx * 256, by * 256
            r = float(torch.rand(1, generator=g))
            if r < 0.25:
                tiles.append(qt.Tile(x0, y0, 256, 256, 1.0, 0))
                continue
            for qy in (0, 128):
                for qx in (0, 128):
                    if r < 0.6 or float(torch.rand(1, generator=g)) < 0.5:
                        tiles.append(qt.Tile(x0 + qx, y0 + qy, 128, 128, 1.0, 1))
                    else:
                        tiles += [qt.Tile(x0 + qx + sx, y0 + qy + sy, 64, 64, 1.0, 2) for sy in (0, 64)
                                  for sx in (0, 64)]
    tiles.sort(key=lambda t: (t.y, t.x))
    return qt.Layout(blocks * 256, blocks * 256, tuple(tiles), "quadtree", {})


class Bench:
    def __init__(self, args):
        self.args = args
        self.fx, self.pack, self.comfy_path = benchlib.setup("cpu", 1, pack_dir=args.pack)
        import importlib

        import torch
        self.torch = torch
        self.qt = importlib.import_module(self.pack.__name__ + ".quadtree")
        self.tp = importlib.import_module(self.pack.__name__ + ".tile_plan")
        self.model = self.fx.local_model(seed=0)
        self.pos = self.fx.tiny_conditioning("a photo of a landscape")
        self.neg = self.fx.tiny_conditioning("")
        self.log = benchlib.RunSummaryLog()
        self.steps = 2 if args.small else args.steps
        self.ratios: dict = {}

    def settings(self, layout):
        return dict(method="Mixture of Diffusers", tile_width=TILE_PX, tile_height=TILE_PX, tile_overlap=OVERLAP_PX,
                    tile_batch_size=BATCH, variable_denoise="off", quadtree=layout)

    def plan_ms(self, kw, H, W) -> tuple[float, int]:
        cfg = benchlib.engine_config(self.pack, **kw)
        times, n = [], 0
        for _ in range(3):
            t0 = time.thread_time()
            plan = self.tp.plan_for(cfg, H, W, 8, 1, "cpu", self.torch.float32)
            plan.level_maps          # what a run with variable denoise or skip builds too
            times.append(time.thread_time() - t0)
            n = len(plan.set) if hasattr(plan, "set") else len(plan.windows)
        return statistics.median(times) * 1000, n

    def run(self, kw, H, W, record=True):
        m, meter, clock = benchlib.instrument(self.model, "cpu")
        meter.__class__ = FirstCall
        meter.first = None
        meter.record_step = 1 if record else None
        if kw is not None:
            m = benchlib.tile_model(self.pack, m, **kw)
        latent = {"samples": self.torch.zeros(1, 4, H, W)}
        with self.log.attached(self.pack.__name__):
            n_before = len(self.log.lines)
            t0 = time.thread_time()
            self.fx.run_ksampler(m, self.pos, self.neg, latent, seed=1, steps=self.steps, cfg=1.0,
                                 sampler_name="euler", scheduler="normal", denoise=1.0)
            lines = self.log.lines[n_before:]
        calls = next((CALLS_RE.search(ln) for ln in lines if CALLS_RE.search(ln)), None)
        out = {"start_to_first_s": meter.first - t0, "step_s": clock.steady_step_time(),
               "calls_per_step": meter.calls / self.steps, "rows_per_call": meter.rows / max(1, meter.calls),
               "calls": meter.calls, "shapes": len(meter.shapes), "recorded": meter.recorded}
        if calls is not None:
            out["engine"] = dict(zip(("calls", "rows_per_call", "max_rows", "shapes"),
                                     (int(calls[1]), float(calls[2]), int(calls[3]), int(calls[4]))))
        return out

    def rows(self):
        counts = [100, 400] if self.args.small else [int(c) for c in self.args.counts.split(",")]
        self.run(None, 16, 16, record=False)           # warm-up: ComfyUI's first sampling run
        out = []
        for kind in self.args.kinds.split(","):
            for n in counts:
                if kind == "grid":
                    layout, H = None, grid_side(n)
                else:
                    layout = quadtree_layout(self.qt, n)
                    H = layout.height // 8
                kw = self.settings(layout)
                plan_ms, tiles = self.plan_ms(kw, H, H)
                untiled = self.run(None, H, H, record=False)
                reps = 1 if self.args.small else max(1, self.args.repeats)
                runs = []
                for _ in range(reps):      # each tiled run next to the bare model on its own tile batches
                    r = self.run(kw, H, H)
                    r["bare_s"] = benchlib.replay_time(self.model.model, r.pop("recorded"), "cpu", repeats=1)
                    r["overhead"] = r["step_s"] / r["bare_s"]
                    runs.append(r)
                tiled = sorted(runs, key=lambda r: r["overhead"])[len(runs) // 2]      # the median ratio
                bare = tiled["bare_s"]
                row = dict(kind=kind, tiles=tiles, latent=H, px=H * 8, plan_ms=plan_ms,
                           plan_per_step=plan_ms / 1000 / tiled["step_s"],
                           start_to_first_s=tiled["start_to_first_s"],
                           untiled_start_to_first_s=untiled["start_to_first_s"], step_s=tiled["step_s"],
                           bare_step_s=bare, overhead=tiled["overhead"], overheads=[r["overhead"] for r in runs],
                           calls_per_step=tiled["calls_per_step"], rows_per_call=tiled["rows_per_call"],
                           calls=tiled["calls"], shapes=tiled["shapes"], engine=tiled.get("engine"))
                out.append(row)
                print(f"{kind:8} {tiles:6d} tiles {H * 8:5d}px: plan {plan_ms:8.1f} ms ({row['plan_per_step']:.3f} "
                      f"of a step), start->1st call {row['start_to_first_s']:.2f} s (untiled "
                      f"{row['untiled_start_to_first_s']:.2f}), {row['step_s']:.2f} s/step, bare {bare:.2f}, "
                      f"overhead {row['overhead']:.3f}, {row['calls_per_step']:.0f} calls/step x "
                      f"{row['rows_per_call']:.1f} rows, {row['shapes']} shapes", flush=True)
        return out


def table(rows) -> str:
    head = ["layout", "tiles", "canvas px", "plan ms", "plan / step", "start -> 1st call s (untiled)", "s/step",
            "bare s/step", "overhead", "calls/step", "rows/call", "shapes/run"]
    body = [[r["kind"], r["tiles"], f"{r['px']}²", f"{r['plan_ms']:.1f}", f"{r['plan_per_step']:.4f}",
             f"{r['start_to_first_s']:.2f} ({r['untiled_start_to_first_s']:.2f})", f"{r['step_s']:.3f}",
             f"{r['bare_step_s']:.3f}", f"{r['overhead']:.3f}", f"{r['calls_per_step']:.0f}",
             f"{r['rows_per_call']:.1f}", r["shapes"]] for r in rows]
    return benchlib.fmt_table(head, body)


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    rows = bench.rows()
    md = table(rows)
    print()
    print(md)
    by_kind: dict = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    print("\noverhead_growth = overhead at the most tiles / at the fewest; plan_per_step = plan time / one step")
    print("\nratios:")
    for kind, rs in by_kind.items():
        print(f"overhead_growth[{kind}] = {rs[-1]['overhead'] / rs[0]['overhead']:.4f}")
        print(f"plan_per_step[{kind}@{rs[-1]['tiles']}] = {rs[-1]['plan_per_step']:.4f}")
    if args.json:
        benchlib.write_json(args.json, {"versions": benchlib.versions(bench.comfy_path), "rows": rows,
                                        "settings": dict(tile_px=TILE_PX, overlap_px=OVERLAP_PX, batch=BATCH,
                                                         steps=bench.steps, cfg=1.0)})
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return rows


if __name__ == "__main__":
    main()
