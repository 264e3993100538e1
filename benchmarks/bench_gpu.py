#!/usr/bin/env python
"""GPU benchmark: an SD1.5-sized UNet through ComfyUI's KSampler, untiled vs grid vs quadtree tiling.

One prepared script for a GPU machine (an H100/H200 runs the default in about 5-6 minutes;
``--budget-s`` skips what would not fit and says so):

    python3 benchmarks/bench_gpu.py --out OUT_DIR             # 20 steps, 1024/2048/4096 px
    python3 benchmarks/bench_gpu.py --quick --out OUT_DIR     # 6 steps
    python benchmarks/bench_gpu.py --device cpu --tiny        # smoke test on the CPU (seconds)

Model: ``comfy.supported_models.SD15`` with the full SD1.5 UNet config (model_channels 320,
channel_mult 1/2/4/4, 860M parameters), random weights filled from a seeded generator, fp16,
EPS; conditioning random [1, 77, 768]. ``--tiny``: the fixtures' shrunk SD15 UNet (fp32).
Sampling: KSampler (``nodes.common_ksampler``; see ``benchlib.ksampler`` for the fallback on a
machine without PyAV), euler, normal, CFG 7 (cond and uncond batched by ComfyUI), denoise 1.0,
from a seeded random source latent (an img2img stand-in, so ``schedule`` has a source).

For every canvas (1024², 2048², 4096² px by default): untiled (where it fits; out-of-memory is
caught and reported), grid tiling (768 px tiles, 64 px overlap, Mixture of Diffusers) and
quadtree tiling (the demo photo upscaled to the canvas, min/max tile 256/1024 px, denoise
0.2..0.8, ``variable_denoise`` schedule; plus one run with it off) at tile batch 1/4/8 and auto (0).

Measured per run: seconds per step (callback stamps after a device synchronise; mean of the
steps after the first), peak VRAM (``torch.cuda.max_memory_allocated``, weights included), model
calls and tile evaluations; then the bare model's time for the very same calls (every call's
shape is recorded, each distinct shape timed on the bare ``apply_model``): ``at limit`` =
KSampler s/step / raw-model s/step. GPU time inside the model calls (CUDA events) gives the
share of each step spent outside the model. Writes ``bench_gpu.json`` and ``bench_gpu.md``.
Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import benchlib

SD15_UNET = {  # ComfyUI's model_detection SD15 config (what a real SD1.5 checkpoint is detected as)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 128/256px canvases, 2 steps (CPU smoke test)")
    p.add_argument("--quick", action="store_true", help="6 steps instead of 20")
    p.add_argument("--steps", type=int, help="sampler steps (default 20; --quick 6; --tiny 2)")
    p.add_argument("--canvases", help="comma-separated canvas sides in px (default 1024,2048,4096; tiny 128,256)")
    p.add_argument("--batches", help="comma-separated tile batch sizes, 0 = auto (default 1,4,8,0; tiny 1,0)")
    p.add_argument("--tile", type=int, help="grid tile side px (default 768; tiny 64)")
    p.add_argument("--overlap", type=int, help="tile overlap px (default 64; tiny 16)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the runs that start after this many seconds (default 420)")
    p.add_argument("--no-untiled", action="store_true", help="leave out the untiled runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_gpu_out", help="output folder")
    return p.parse_args(argv)


class GpuBench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        tiny = args.tiny
        self.fx, self.pack, self.comfy_path = benchlib.setup(args.device, threads=1 if args.device == "cpu" else None)
        import comfy.model_management as mm
        import torch
        self.torch, self.mm = torch, mm
        self.device = mm.get_torch_device()
        if args.device != "cpu" and self.device.type != "cuda":
            raise SystemExit(f"bench_gpu: ComfyUI picked {self.device}, not a GPU; use --device cpu --tiny")
        self.cuda = self.device.type == "cuda"
        self.steps = args.steps or (2 if tiny else 6 if args.quick else 20)
        self.canvases = [int(v) for v in (args.canvases or ("128,256" if tiny else "1024,2048,4096")).split(",")]
        self.batches = [int(v) for v in (args.batches or ("1,0" if tiny else "1,4,8,0")).split(",")]
        self.tile = args.tile or (64 if tiny else 768)
        self.overlap = args.overlap or (16 if tiny else 64)
        self.qt_min, self.qt_max = (32, 128) if tiny else (256, 1024)
        self.context_dim = 64 if tiny else 768
        self.model = self._model()
        self.base = self.model.model
        self.pos = self.fx.tiny_conditioning("a photo of a house by a lake", dim=self.context_dim)
        self.neg = self.fx.tiny_conditioning("", dim=self.context_dim)
        self.photo = benchlib.demo_photo_maker()
        self.rows: list[dict] = []
        self.engine_rows: list[dict] = []
        self.ksampler_path = None
        self.info = benchlib.versions(self.comfy_path)
        self.info.update(device=str(self.device), steps=self.steps, canvases=self.canvases, batches=self.batches,
                         tile_px=self.tile, overlap_px=self.overlap, quadtree_tile_px=(self.qt_min, self.qt_max),
                         model="fixtures.tiny_sd15 (fp32)" if tiny else "SD15 UNet, random weights, fp16",
                         params=sum(p.numel() for p in self.base.diffusion_model.parameters()))

    # ---- setup
    def _model(self):
        torch = self.torch
        if self.args.tiny:
            m = self.fx.tiny_sd15(seed=0)
            return m
        import comfy.model_base
        import comfy.model_patcher
        import comfy.supported_models
        config = comfy.supported_models.SD15(dict(SD15_UNET))
        dtype = torch.float16 if self.cuda else torch.float32
        config.set_inference_dtype(dtype, None)
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=self.device)
        self._fill(base.diffusion_model, seed=0)
        base.eval()
        return comfy.model_patcher.ModelPatcher(base, load_device=self.device,
                                                offload_device=self.mm.unet_offload_device())

    def _fill(self, module, seed: int):
        """Seeded random weights on the device: norms 1/0, weights N(0, 1/fan_in), biases 0."""
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
        with torch.no_grad():
            done = set()
            for mod in module.modules():
                if isinstance(mod, norms):
                    for name, val in (("weight", 1.0), ("bias", 0.0)):
                        p = getattr(mod, name, None)
                        if p is not None:
                            p.fill_(val)
                            done.add(id(p))
            for name, p in module.named_parameters():
                if id(p) in done:
                    continue
                if name.endswith("bias") or p.ndim < 2:
                    p.zero_()
                else:
                    std = 1.0 / max(1, p[0].numel()) ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen, device=self.device, dtype=torch.float32) * std)
            module.out[-1].weight.mul_(0.3)

    def image(self, canvas: int):
        torch = self.torch
        import numpy as np
        if self.photo is not None:
            img = self.photo(min(canvas, 1024)).convert("RGB").resize((canvas, canvas))
            return torch.from_numpy(np.asarray(img).astype("float32") / 255.0)[None]
        return self.fx.synthetic_photo(canvas, canvas, seed=0)

    def quadtree(self, canvas: int):
        node = benchlib.node_class(self.pack, "QuadtreeVisualizer")
        _, layout = self.fx.call_node(node, image=self.image(canvas), content_threshold=25.0, min_tile_size=self.qt_min,
                                      min_denoise=0.2, max_denoise=0.8, line_thickness=0, max_tile_size=self.qt_max)
        return layout

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    # ---- one run
    def run(self, canvas: int, name: str, tiled: dict | None, latent: dict, batch=None):
        torch, mm = self.torch, self.mm
        row = {"canvas": canvas, "config": name, "tile_batch": batch}
        if self.elapsed() > self.args.budget_s:
            row["status"] = f"skipped (time budget {self.args.budget_s:.0f} s spent)"
            self.rows.append(row)
            print(f"  {canvas}px {name} batch {batch}: {row['status']}", flush=True)
            return row
        m, meter, clock = benchlib.instrument(self.model, self.device)
        meter.cuda_events = self.cuda
        if tiled is not None:
            m = benchlib.tile_model(self.pack, m, **tiled)
        gc.collect()
        if self.cuda:
            mm.soft_empty_cache(True)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                _, self.ksampler_path = benchlib.ksampler(m, self.pos, self.neg, latent, seed=1, steps=self.steps,
                                                          cfg=7.0, sampler_name="euler", scheduler="normal")
        except Exception as e:  # noqa: BLE001  out of memory (untiled at large canvases) or anything else: report it
            oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
            oom = (oom_type is not None and isinstance(e, oom_type)) or "out of memory" in str(e).lower()
            row["status"] = "out of memory" if oom else f"error: {type(e).__name__}: {e}"
            self.rows.append(row)
            print(f"  {canvas}px {name} batch {batch}: {row['status']}", flush=True)
            del m, meter, clock
            gc.collect()
            if self.cuda:
                mm.soft_empty_cache(True)
            return row
        wall = time.perf_counter() - t0
        steps_t = clock.step_times
        timed = steps_t[1:] if len(steps_t) > 1 else steps_t
        row.update(status="ok", wall_s=wall, step_times=steps_t, s_per_step=statistics.fmean(timed),
                   calls=meter.calls, tiles=meter.tiles, tiles_per_step=meter.tiles / self.steps,
                   max_tiles_per_call=max((s[0] for s in meter.shapes), default=0) // 2)
        if self.cuda:
            row["peak_vram_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2 ** 30
            torch.cuda.synchronize(self.device)
            inside = sum(e0.elapsed_time(e1) for e0, e1, st in meter.events if st >= 1) / 1e3
            row["model_gpu_s_per_step"] = inside / max(1, len(timed))
            row["outside_model_share"] = 1.0 - row["model_gpu_s_per_step"] / row["s_per_step"]
        # the bare model on the same calls (steps after the first), timed per distinct shape
        counts: dict = {}
        for (st, sig), n in meter.signatures.items():
            if st >= 1 or len(steps_t) <= 1:
                counts[sig] = counts.get(sig, 0) + n
        meter.events.clear()
        del m
        per_call = benchlib.replay_signatures(self.base, counts, self.device, repeats=1 if self.args.tiny else 3)
        raw = sum(per_call[s] * n for s, n in counts.items()) / max(1, len(timed))
        row["raw_s_per_step"] = raw
        row["at_limit"] = row["s_per_step"] / raw if raw > 0 else float("nan")
        row["call_shapes"] = {"x".join(map(str, s[0])): n for s, n in counts.items()}
        self.rows.append(row)
        vram = f", peak {row['peak_vram_gib']:.2f} GiB" if self.cuda else ""
        print(f"  {canvas}px {name} batch {batch}: {row['s_per_step']:.3f} s/step, raw {raw:.3f} s/step "
              f"(at limit {row['at_limit']:.3f}), {row['tiles_per_step']:.1f} tiles/step, up to "
              f"{row['max_tiles_per_call']} per call{vram}  [{self.elapsed():.0f} s]", flush=True)
        return row

    def engine_alone(self, canvas: int, name: str, cfg: dict):
        torch = self.torch
        H = W = canvas // 8
        r = benchlib.engine_only(self.pack, H, W, cfg, steps=min(self.steps, 8), device=self.device,
                                 dtype=torch.float32, context_dim=self.context_dim)
        r.update(canvas=canvas, config=name)
        self.engine_rows.append(r)

    # ---- all runs
    def main(self):
        torch = self.torch
        print(f"bench_gpu: {self.info.get('gpu', self.info['cpu'])} ({self.device}), torch {self.info['torch']}, "
              f"ComfyUI {self.info['comfyui']}, {self.info['model']} ({self.info['params'] / 1e6:.0f}M params), "
              f"{self.steps} steps, budget {self.args.budget_s:.0f} s", flush=True)
        gen = torch.Generator().manual_seed(3)
        # warm-up: kernels, cuDNN, ComfyUI's first model load (not measured)
        warm = {"samples": torch.randn((1, 4, 16, 16) if self.args.tiny else (1, 4, 64, 64), generator=gen)}
        benchlib.ksampler(self.model, self.pos, self.neg, warm, steps=2, cfg=7.0)
        for canvas in self.canvases:
            lat = {"samples": torch.randn((1, 4, canvas // 8, canvas // 8), generator=gen)}
            grid = {"method": "Mixture of Diffusers", "tile_width": self.tile, "tile_height": self.tile,
                    "tile_overlap": self.overlap, "variable_denoise": "off"}
            t0 = time.perf_counter()
            layout = self.quadtree(canvas)
            qt_build = time.perf_counter() - t0
            quad = {"method": "Mixture of Diffusers", "tile_overlap": self.overlap, "variable_denoise": "schedule",
                    "quadtree": layout}
            print(f"{canvas}px: quadtree of {len(layout.tiles)} tiles {layout.size_histogram()} "
                  f"(built in {qt_build:.1f} s)", flush=True)
            self.info.setdefault("quadtrees", {})[canvas] = {"tiles": len(layout.tiles),
                                                             "histogram": layout.size_histogram(),
                                                             "build_s": qt_build}
            if not self.args.no_untiled:
                self.run(canvas, "untiled", None, lat)
            # auto first, then the fixed batches from large to small: if the time budget runs out,
            # what goes is tile batch 1 at the largest canvas (the slowest and least telling run)
            for k in sorted(self.batches, key=lambda b: (b != 0, -b)):
                self.run(canvas, "grid", dict(grid, tile_batch_size=k), lat, batch=k)
                self.run(canvas, "quadtree schedule", dict(quad, tile_batch_size=k), lat, batch=k)
                if k == 0:
                    self.run(canvas, "quadtree off", dict(quad, variable_denoise="off", tile_batch_size=0), lat,
                             batch=0)
            if self.elapsed() <= self.args.budget_s:
                self.engine_alone(canvas, "grid", dict(grid, tile_batch_size=8))
                self.engine_alone(canvas, "quadtree schedule", dict(quad, tile_batch_size=8))
        self.report()

    # ---- output
    def summaries(self) -> dict:
        out = {}
        ok = [r for r in self.rows if r.get("status") == "ok"]
        for canvas in self.canvases:
            for cfg in ("grid", "quadtree schedule"):
                rs = {r["tile_batch"]: r for r in ok if r["canvas"] == canvas and r["config"] == cfg}
                fixed = [r["s_per_step"] for k, r in rs.items() if k]
                if 0 in rs and fixed:
                    out[f"auto_vs_best_fixed[{cfg}@{canvas}]"] = rs[0]["s_per_step"] / min(fixed)
            grid = {r["tile_batch"]: r for r in ok if r["canvas"] == canvas and r["config"] == "grid"}
            qs = {r["tile_batch"]: r for r in ok if r["canvas"] == canvas and r["config"] == "quadtree schedule"}
            qo = [r for r in ok if r["canvas"] == canvas and r["config"] == "quadtree off"]
            if qo and qs.get(0):
                out[f"schedule_tiles_vs_off[{canvas}]"] = qs[0]["tiles"] / max(1, qo[0]["tiles"])
                out[f"schedule_time_vs_off[{canvas}]"] = qs[0]["s_per_step"] / qo[0]["s_per_step"]
            if grid.get(0) and qs.get(0):
                out[f"quadtree_vs_grid_time[{canvas}]"] = qs[0]["s_per_step"] / grid[0]["s_per_step"]
        for cfg in ("grid", "quadtree schedule"):
            for k in self.batches:
                if not k:
                    continue
                v = [r["peak_vram_gib"] for r in ok if r["config"] == cfg and r["tile_batch"] == k
                     and "peak_vram_gib" in r]
                if len(v) > 1:
                    out[f"vram_spread[{cfg} batch {k}]"] = max(v) / min(v) - 1.0
        lim = [r["at_limit"] for r in ok if r["config"] != "untiled"]
        if lim:
            out["at_limit_worst_tiled"] = max(lim)
            out["at_limit_best_tiled"] = min(lim)
        return out

    def report(self):
        os.makedirs(self.args.out, exist_ok=True)
        summary = self.summaries()
        self.info["ksampler_path"] = self.ksampler_path
        self.info["wall_s"] = self.elapsed()
        headers = ["canvas", "configuration", "tile batch", "tiles/call (max)", "tile evals/step", "s/step",
                   "raw model s/step", "at limit", "outside model", "peak VRAM GiB"]
        table = []
        for r in self.rows:
            k = r.get("tile_batch")
            kb = "-" if k is None else "auto" if k == 0 else k
            if r.get("status") != "ok":
                table.append((f"{r['canvas']}²", r["config"], kb, "", "", r.get("status"), "", "", "", ""))
                continue
            table.append((f"{r['canvas']}²", r["config"], kb, r["max_tiles_per_call"], f"{r['tiles_per_step']:.1f}",
                          f"{r['s_per_step']:.3f}", f"{r['raw_s_per_step']:.3f}", f"{r['at_limit']:.3f}",
                          f"{r['outside_model_share']:.1%}" if "outside_model_share" in r else "-",
                          f"{r['peak_vram_gib']:.2f}" if "peak_vram_gib" in r else "-"))
        eng = [(f"{r['canvas']}²", r["config"], f"{r['tiles_per_call']:.0f}", f"{r['s_per_call'] * 1e3:.2f}",
                f"{r['s_per_tile'] * 1e6:.0f}") for r in self.engine_rows]
        md = [f"# bench_gpu: {self.info.get('gpu', self.info['cpu'])}",
              "",
              (f"torch {self.info['torch']}, ComfyUI {self.info['comfyui']}, {self.info['model']}, "
               f"{self.steps} euler steps, CFG 7, grid {self.tile}px tiles / {self.overlap}px overlap, quadtree "
               f"{self.qt_min}-{self.qt_max}px tiles (denoise 0.2-0.8), date {self.info['date']}; KSampler path: "
               f"{self.ksampler_path}; command: `{self.info['command']}`"),
              "",
              benchlib.fmt_table(headers, table),
              "",
              "Engine alone (identity model, tile batch 8): ms per model call / us per tile",
              "",
              benchlib.fmt_table(["canvas", "configuration", "tiles per call", "ms per call", "us per tile"], eng),
              "",
              "Ratios:",
              ""] + [f"- {k} = {v:.3f}" for k, v in summary.items()]
        md_text = "\n".join(md) + "\n"
        with open(os.path.join(self.args.out, "bench_gpu.md"), "w") as f:
            f.write(md_text)
        benchlib.write_json(os.path.join(self.args.out, "bench_gpu.json"),
                            {"info": self.info, "runs": self.rows, "engine_alone": self.engine_rows,
                             "ratios": summary})
        print("\n" + md_text)
        print("ratios:")
        for k, v in summary.items():
            print(f"  {k} = {v:.3f}")
        print(f"wrote {os.path.join(self.args.out, 'bench_gpu.json')} and bench_gpu.md "
              f"(wall {self.elapsed():.0f} s)")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        print("bench_gpu: an SD1.5-sized UNet on the CPU takes hours; add --tiny", file=sys.stderr)
    GpuBench(args).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
