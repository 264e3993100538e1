#!/usr/bin/env python
"""Multi-GPU benchmark (issue 24): s/step of one tiled model on one GPU against all of them.

One prepared script for a machine with several GPUs and ComfyUI 0.23+ (``comfy/multigpu.py``):

    python3 benchmarks/bench_multigpu.py --out OUT_DIR                # 2048² and 4096², CFG 1 and 4
    python3 benchmarks/bench_multigpu.py --gpus 2 --steps 6 --out OUT_DIR
    python benchmarks/bench_multigpu.py --device cpu --tiny           # smoke test on the CPU (seconds)

Model: the SD1.5-sized UNet of ``bench_gpu.py`` (random seeded weights, fp16); ``--tiny``: the
fixtures' shrunk SD15 UNet (fp32).  The extra devices' clones are made by ComfyUI's own
``comfy.multigpu.create_multigpu_deepclones`` (what the MultiGPU CFG Split node runs), from a
``cached_patcher_init`` factory that rebuilds the same seeded model.  On the CPU (``--device cpu``)
ComfyUI lists one device, so the smoke test builds the second clone on ``cpu:1`` with the same
ComfyUI calls minus its device enumeration (both "devices" then share the CPU: nothing to learn
about speed there, only that the script runs and its counts agree).

For every canvas and CFG: the grid-tiled model (1024 px tiles, 128 px overlap, Mixture of
Diffusers, auto tile batch; tiny: 64 / 16 px, batch 2) on one device, the same model with the
MultiGPU clones (the pack's tile split), and at CFG > 1 the same with the pack's split taken away
(ComfyUI's own split by conditioning: each device runs every tile of its conditioning).  Measured:
wall seconds per step (callback stamps after synchronising every device; median of the steps
after the first), tile evaluations per device (the engine's run-done line).  Ratios:
``speedup[canvas/cfgN] = one device s/step / all devices s/step`` and
``tile_vs_cond_split[canvas/cfgN]`` (cond-split s/step / tile-split s/step).  Writes
``bench_multigpu.json``.  Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import benchlib
import bench_gpu

PER_DEVICE_RE = re.compile(r"tile evaluations per device: (.*)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 128/256 px canvases, 3 steps (CPU smoke test)")
    p.add_argument("--gpus", type=int, default=0, help="devices to use (default: all ComfyUI lists; tiny: 2)")
    p.add_argument("--steps", type=int, help="sampler steps (default 8; tiny 3)")
    p.add_argument("--canvases", help="comma-separated canvas sides in px (default 2048,4096; tiny 128,256)")
    p.add_argument("--cfgs", default="1,4", help="comma-separated CFG values (default 1,4)")
    p.add_argument("--json", help="where to write the JSON (default OUT/bench_multigpu.json)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_multigpu_out", help="output folder")
    return p.parse_args(argv)


class MultiGpuBench:
    def __init__(self, args):
        self.args = args
        self.fx, self.pack, self.comfy_path = benchlib.setup(args.device, threads=1 if args.device == "cpu" else None)
        import comfy.model_management as mm
        import torch
        self.torch, self.mm = torch, mm
        try:
            import comfy.multigpu
            self.multigpu = comfy.multigpu
        except ImportError:
            raise SystemExit("bench_multigpu: this ComfyUI has no comfy/multigpu.py (MultiGPU nodes, 0.23+)")
        self.device = mm.get_torch_device()
        tiny = args.tiny
        self.steps = args.steps or (3 if tiny else 8)
        self.canvases = [int(v) for v in (args.canvases or ("128,256" if tiny else "2048,4096")).split(",")]
        self.cfgs = [float(v) for v in args.cfgs.split(",")]
        self.context_dim = 64 if tiny else 768
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = self._multi(self._build())
        self.pos = self.fx.tiny_conditioning("a photo of a house by a lake", dim=self.context_dim)
        self.neg = self.fx.tiny_conditioning("", dim=self.context_dim)
        self.rows: list[dict] = []
        self.info = benchlib.versions(self.comfy_path)
        self.info.update(device=str(self.device), devices=[str(d) for d in self.devices], steps=self.steps,
                         canvases=self.canvases, cfgs=self.cfgs,
                         model="fixtures.tiny_sd15 (fp32)" if tiny else "SD15 UNet, random weights, fp16")

    # ---- setup
    def _build(self, device=None):
        """The benchmark's model (same seed every time: the factory of the clones)."""
        if self.args.tiny:
            return self.fx.tiny_sd15(seed=0)
        import comfy.model_base
        import comfy.model_patcher
        import comfy.supported_models
        device = device or self.device
        config = comfy.supported_models.SD15(dict(bench_gpu.SD15_UNET))
        config.set_inference_dtype(self.dtype, None)
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=device)
        bench_gpu.GpuBench._fill(types.SimpleNamespace(torch=self.torch, device=device), base.diffusion_model, 0)
        base.eval()
        return comfy.model_patcher.ModelPatcher(base, load_device=self.device,
                                                offload_device=self.mm.unet_offload_device())

    def _multi(self, model):
        """``model`` with MultiGPU clones on the other devices, made by ComfyUI's own code."""
        mg = self.multigpu
        model.cached_patcher_init = (self._build, ())
        wanted = self.args.gpus or (2 if self.device.type == "cpu" else 0)
        if self.device.type != "cpu":
            m = mg.create_multigpu_deepclones(model, wanted or 64)
        else:       # ComfyUI lists the CPU once: the second "device" by hand, as create_multigpu_deepclones makes it
            m = model.clone()
            extra = []
            for i in range(1, max(2, wanted)):
                clone = m.deepclone_multigpu(new_load_device=self.torch.device("cpu", i))
                clone.is_multigpu_base_clone = True
                extra.append(clone)
            m.set_additional_models("multigpu", extra)
            m.match_multigpu_clones()
            mg.GPUOptionsGroup().register(m)
        self.devices = [m.load_device] + [c.load_device for c in m.get_additional_models_with_key("multigpu")]
        if len(self.devices) < 2:
            raise SystemExit(f"bench_multigpu: ComfyUI found one device ({self.device}); this benchmark needs two "
                             f"or more (or --device cpu --tiny for the smoke test)")
        self.one = model
        return m

    def tiled(self, model):
        tiny = self.args.tiny
        return benchlib.tile_model(self.pack, model, method="Mixture of Diffusers", tile_width=64 if tiny else 1024,
                                   tile_height=64 if tiny else 1024, tile_overlap=16 if tiny else 128,
                                   tile_batch_size=2 if tiny else 0)

    def sync(self):
        if self.device.type == "cuda":
            for d in self.devices:
                self.torch.cuda.synchronize(d)

    # ---- one run
    def run(self, canvas: int, cfg: float, mode: str) -> dict:
        import comfy.patcher_extension
        torch = self.torch
        m = self.tiled(self.one if mode == "one device" else self.model)
        if mode == "cond split":        # the pack's tile split taken away: ComfyUI's own split by conditioning
            m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
                                       self.pack.tile_devices.KEY)
        stamps = []

        def clock(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
            def stamping(i, *cb_args, **cb_kwargs):
                self.sync()
                stamps.append(time.perf_counter())
                if callback is not None:
                    return callback(i, *cb_args, **cb_kwargs)
            self.sync()
            stamps.append(time.perf_counter())
            return executor(guider, sigmas, extra_args, stamping, *args, **kwargs)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "qtd_bench_multigpu", clock)
        lat = torch.randn(1, 4, canvas // 8, canvas // 8, generator=torch.Generator().manual_seed(0))
        log = benchlib.RunSummaryLog()
        with log.attached(self.pack.__name__):
            benchlib.ksampler(m, self.pos, self.neg, {"samples": lat}, steps=self.steps, cfg=cfg, denoise=1.0)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        per_device = next((PER_DEVICE_RE.search(x).group(1) for x in log.lines if PER_DEVICE_RE.search(x)), None)
        row = {"canvas": canvas, "cfg": cfg, "mode": mode,
               "s_per_step": statistics.median(steps[1:] if len(steps) > 1 else steps),
               "tiles": log.summaries[-1]["tiles"] if log.summaries else None,
               "per_device": per_device}
        print(f"{canvas:>5} px  cfg {cfg:g}  {mode:<12} {row['s_per_step']:.4f} s/step  tiles {row['tiles']}"
              f"{'  per device: ' + per_device if per_device else ''}", flush=True)
        return row

    def main(self):
        print(f"devices: {', '.join(str(d) for d in self.devices)}; {self.info['model']}; {self.steps} steps")
        ratios = {}
        for canvas in self.canvases:
            for cfg in self.cfgs:
                modes = ["one device", "tile split"] + (["cond split"] if cfg > 1 else [])
                got = {mode: self.run(canvas, cfg, mode) for mode in modes}
                self.rows.extend(got.values())
                key = f"{canvas}/cfg{cfg:g}"
                ratios[f"speedup[{key}]"] = got["one device"]["s_per_step"] / got["tile split"]["s_per_step"]
                if "cond split" in got:
                    ratios[f"tile_vs_cond_split[{key}]"] = (got["cond split"]["s_per_step"]
                                                            / got["tile split"]["s_per_step"])
        print("\nratios:")
        for k, v in ratios.items():
            print(f"  {k} = {v:.4f}")
        path = self.args.json or os.path.join(self.args.out, "bench_multigpu.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        benchlib.write_json(path, {"info": self.info, "runs": self.rows, "ratios": ratios})
        print(f"wrote {path}")


def main(argv=None):
    MultiGpuBench(parse_args(argv)).main()


if __name__ == "__main__":
    main()
