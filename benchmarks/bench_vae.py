#!/usr/bin/env python
"""Tiled VAE benchmark: Quadtree VAE Encode / Decode (exact, fast) vs ComfyUI's VAEEncodeTiled /
VAEDecodeTiled, all against ComfyUI's untiled VAEEncode / VAEDecode on the same VAE.

    .cache/venv/bin/python benchmarks/bench_vae.py                    # CPU, tiny VAE, 256..768 px
    .cache/venv/bin/python benchmarks/bench_vae.py --small            # smoke size (seconds)
    python benchmarks/bench_vae.py --device cuda --vae sd --dtype fp16 --sizes 1024,2048,4096 --tile 512

VAE: a real ``comfy.sd.VAE`` around ComfyUI's ``AutoencoderKL`` with seeded weights
(``tests/fixtures.py``): ``tiny`` (32/64 channels, the tests' VAE) or ``sd`` (SD1.x/SDXL-sized:
128..512 channels, 2 blocks a level). Input: the fixtures' synthetic photo at each size; the
decode input is the untiled encode of that photo.

Per size and method: max and mean |result - untiled| (image in 0..1, latent units), time (the
calling thread's CPU time on the CPU, wall time after a synchronise on a GPU), the largest
tensor any convolution receives (forward pre-hooks on every Conv2d: elements), on a GPU the peak
allocated memory above the weights (``torch.cuda.max_memory_allocated``), and for exact mode
the planned host memory of the whole feature maps. Writes JSON (``--json``) and a markdown table
(``--md``); ends with a ``ratios:`` block. Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import benchlib

METHODS = ("untiled", "exact", "fast", "comfy_tiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--vae", default="tiny", choices=("tiny", "sd"), help="tiny (default) or sd-sized")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--sizes", help="comma-separated image sides in px (default 256,512,768; --small 192,384)")
    p.add_argument("--tile", type=int, help="tile_size in px for every tiled method (default 128; --small 96)")
    p.add_argument("--small", action="store_true", help="smoke-test sizes")
    p.add_argument("--no-ref64", action="store_true",
                   help="skip the float64 reference (the same VAE untiled in float64; default on for --vae tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1: CPU time is the work)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--md", metavar="PATH")
    return p.parse_args(argv)


class ConvPeak:
    """Largest input (elements) any Conv2d of the VAE receives (torch forward pre-hooks)."""

    def __init__(self, model):
        self.model, self.largest, self.handles = model, 0, []

    def __enter__(self):
        import torch
        for m in self.model.modules():
            if isinstance(m, torch.nn.Conv2d):
                self.handles.append(m.register_forward_pre_hook(self._hook))
        return self

    def _hook(self, module, args):
        self.largest = max(self.largest, args[0].numel())

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Bench:
    def __init__(self, args):
        import torch
        self.args = args
        self.fx, self.pack, self.comfy_path = benchlib.setup(args.device, threads=args.threads
                                                             if args.device == "cpu" else None)
        import comfy.model_management as mm
        self.torch, self.mm, self.tv = torch, mm, self.pack.tiled_vae
        self.device = mm.get_torch_device()
        self.timer = benchlib.clock_for(self.device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        dd = self.fx.SD_VAE_DDCONFIG if args.vae == "sd" else None
        self.vae = self.fx.tiny_vae(seed=0, dtype=dtype, ddconfig=dd)
        self.vae64 = None if args.no_ref64 or args.vae != "tiny" else \
            self.fx.tiny_vae(seed=0, dtype=torch.float64, ddconfig=dd)
        self.sizes = [int(s) for s in (args.sizes or ("192,384" if args.small else "256,512,768")).split(",")]
        self.tile = args.tile or (96 if args.small else 128)
        self.results = {"versions": benchlib.versions(self.comfy_path), "vae": args.vae, "dtype": args.dtype,
                        "device": str(self.device), "tile": self.tile, "runs": []}

    def measure(self, fn):
        """(result, seconds, largest conv input, peak device bytes above the start or None)."""
        torch = self.torch
        gc.collect()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.inference_mode(), ConvPeak(self.vae.first_stage_model) as peak:
            t0 = self.timer()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            dt = self.timer() - t0
        mem = torch.cuda.max_memory_allocated() - base if cuda else None
        return out, dt, peak.largest, mem

    def run_one(self, kind, size, method, fn, ref, ref64=None):
        try:
            out, dt, conv, mem = self.measure(fn)
        except self.mm.OOM_EXCEPTION as e:  # noqa: PERF203  reported, not fatal
            print(f"{kind} {size}px {method}: out of memory ({str(e).splitlines()[0][:80]})")
            self.mm.soft_empty_cache()
            return None, {"kind": kind, "size": size, "method": method, "status": "oom"}
        rec = {"kind": kind, "size": size, "method": method, "status": "ok", "seconds": dt, "largest_conv_input": conv,
               "device_peak_bytes": mem}
        if ref is not None and method != "untiled":
            d = (out.float().cpu() - ref.float().cpu()).abs()
            rec.update(max_err=d.max().item(), mean_err=d.mean().item())
        if ref64 is not None:
            d = (out.double().cpu() - ref64.double().cpu()).abs()
            rec.update(max_err64=d.max().item(), mean_err64=d.mean().item())
        print(f"{kind:6s} {size:5d}px {method:12s} {dt:8.2f}s  conv input {conv / 1e6:8.3f}M"
              + (f"  device {mem / 2 ** 20:8.1f} MiB" if mem is not None else "")
              + (f"  err max {rec['max_err']:.2e} mean {rec['mean_err']:.2e}" if "max_err" in rec else "")
              + (f"  vs fp64 max {rec['max_err64']:.2e}" if "max_err64" in rec else ""))
        return out, rec

    def ref64(self, fn):
        """``fn`` run on the float64 copy of the VAE (untiled ComfyUI), or None."""
        if self.vae64 is None:
            return None
        with self.torch.inference_mode():
            return fn(self.vae64)

    def host_plan(self, size):
        """Planned host bytes of the whole feature maps, exact decode and encode of size x size px."""
        torch, ex, graph = self.torch, self.pack.vae_executor, self.pack.vae_graph
        fsm = self.vae.first_stage_model
        f = graph.spatial_factor(fsm)
        dec = graph.decoder_stages(fsm)
        z = torch.empty((1, fsm.decoder.conv_in.in_channels, size // f, size // f), device="meta")
        r = ex.TileRunner(dec, {"z": z}, "meta", self.vae.vae_dtype, "meta", self.tv._budget(dec, self.tile))
        enc = graph.encoder_stages(fsm, lambda t: t)
        px = torch.empty((1, 3, size, size), device="meta")
        e = ex.TileRunner(enc, {"pixels": px}, "meta", self.vae.vae_dtype, "meta", self.tv._budget(enc, self.tile))
        return r.plan_host_peak([[s] for s in dec]), e.plan_host_peak([[s] for s in enc])

    def sd_host_plan(self, size=1024, tile=512):
        """Host bytes per megapixel of the exact path for an SD-sized VAE (built on the meta
        device: no weights), fp16 and fp32, decode and encode, and in fast mode."""
        torch, ex, graph = self.torch, self.pack.vae_executor, self.pack.vae_graph
        from comfy.ldm.models.autoencoder import AutoencoderKL
        dd = dict(self.fx.TINY_VAE_DDCONFIG, **self.fx.SD_VAE_DDCONFIG)
        with torch.device("meta"):
            fsm = AutoencoderKL(ddconfig=dd, embed_dim=4)
        out = {}
        for name, dt in (("fp16", torch.float16), ("fp32", torch.float32)):
            dec = graph.decoder_stages(fsm)
            z = torch.empty((1, 4, size // 8, size // 8), device="meta")
            r = ex.TileRunner(dec, {"z": z}, "meta", dt, "meta", self.tv._budget(dec, tile))
            start = next(i for i, s in enumerate(dec) if s.name.startswith("up."))
            enc = graph.encoder_stages(fsm, lambda t: t)
            e = ex.TileRunner(enc, {"pixels": torch.empty((1, 3, size, size), device="meta")}, "meta", dt, "meta",
                              self.tv._budget(enc, tile))
            mid = next(i for i, s in enumerate(enc) if s.name.startswith("mid."))
            first = next(i for i, s in enumerate(enc) if s.level >= 1)
            mp = size * size / 1e6
            out[name] = {
                "decode_exact": r.plan_host_peak(self.tv._segments(dec, False, start, len(dec))) / mp,
                "decode_fast": r.plan_host_peak(self.tv._segments(dec, True, start, len(dec))) / mp,
                "encode_exact": e.plan_host_peak(self.tv._segments(enc, False, 0, mid)) / mp,
                "encode_fast_color_fix": e.plan_host_peak(self.tv._segments(enc, True, first, mid)) / mp,
                "encode_fast": e.plan_host_peak(self.tv._segments(enc, True, 0, mid)) / mp,
            }
        self.results["sd_host_bytes_per_megapixel"] = out
        for name, d in out.items():
            print(f"SD-sized VAE, {name}, host MiB per megapixel: "
                  + ", ".join(f"{k} {v / 2 ** 20:.0f}" for k, v in d.items()))
        return out

    # What ComfyUI's VAEEncode / VAEDecode / VAEEncodeTiled / VAEDecodeTiled nodes call (the VAE's
    # methods directly: ComfyUI's ``nodes`` module needs PyAV, which a GPU image may lack).
    @staticmethod
    def untiled_encode(vae, photo):
        return vae.encode(photo[..., :3])

    @staticmethod
    def untiled_decode(vae, z):
        return vae.decode(z)

    @staticmethod
    def comfy_tiled_encode(vae, photo, tile, overlap):
        return vae.encode_tiled(photo[..., :3], tile_x=tile, tile_y=tile, overlap=overlap)

    @staticmethod
    def comfy_tiled_decode(vae, z, tile, overlap):
        c = vae.spacial_compression_decode()
        return vae.decode_tiled(z, tile_x=tile // c, tile_y=tile // c, overlap=overlap // c)

    def main(self):
        self.sd_host_plan()
        tv, tile = self.tv, self.tile
        vae = self.vae
        overlap = min(64, tile // 4)
        for size in self.sizes:
            photo = self.fx.synthetic_photo(size, size, seed=1)
            lat64 = self.ref64(lambda v: self.untiled_encode(v, photo))
            lat_ref, rec = self.run_one("encode", size, "untiled", lambda: self.untiled_encode(vae, photo), None, lat64)
            self.results["runs"].append(rec)
            lat = lat_ref if lat_ref is not None else tv.encode(vae, photo, tile)
            for method, fn in (("exact", lambda: tv.encode(vae, photo, tile)),
                               ("fast", lambda: tv.encode(vae, photo, tile, fast=True)),
                               ("comfy_tiled", lambda: self.comfy_tiled_encode(vae, photo, tile, overlap))):
                self.results["runs"].append(self.run_one("encode", size, method, fn, lat_ref, lat64)[1])
            img64 = self.ref64(lambda v: self.untiled_decode(v, lat))
            img_ref, rec = self.run_one("decode", size, "untiled", lambda: self.untiled_decode(vae, lat), None, img64)
            self.results["runs"].append(rec)
            for method, fn in (("exact", lambda: tv.decode(vae, {"samples": lat}, tile)),
                               ("fast", lambda: tv.decode(vae, {"samples": lat}, tile, fast=True)),
                               ("comfy_tiled", lambda: self.comfy_tiled_decode(vae, lat, tile, overlap))):
                self.results["runs"].append(self.run_one("decode", size, method, fn, img_ref, img64)[1])
            hd, he = self.host_plan(size)
            self.results.setdefault("host_plan", {})[size] = {"decode": hd, "encode": he}
            mp = size * size / 1e6
            print(f"host maps (exact): decode {hd / 2 ** 20:.1f} MiB, encode {he / 2 ** 20:.1f} MiB "
                  f"({hd / mp / 2 ** 20:.0f} / {he / mp / 2 ** 20:.0f} MiB per megapixel)")
        self.report()

    def get(self, kind, size, method):
        for r in self.results["runs"]:
            if r["kind"] == kind and r["size"] == size and r["method"] == method and r["status"] == "ok":
                return r
        return None

    def report(self):
        lines = [f"VAE `{self.args.vae}` ({self.args.dtype}) on {self.results['device']}, tile_size {self.tile} px; "
                 f"errors against ComfyUI's untiled VAEEncode/VAEDecode (image 0..1, latent units).", "",
                 "| op | size | method | max err | mean err | max err vs fp64 | time s "
                 "| largest conv input (M elements) | device peak MiB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.results["runs"]:
            if r["status"] != "ok":
                lines.append(f"| {r['kind']} | {r['size']} | {r['method']} | {r['status']} | | | | | |")
                continue
            err = (f"{r['max_err']:.2e} | {r['mean_err']:.2e}") if "max_err" in r else "– | –"
            err += f" | {r['max_err64']:.2e}" if "max_err64" in r else " | –"
            mem = f"{r['device_peak_bytes'] / 2 ** 20:.0f}" if r["device_peak_bytes"] is not None else "–"
            lines.append(f"| {r['kind']} | {r['size']} | {r['method']} | {err} | {r['seconds']:.2f} | "
                         f"{r['largest_conv_input'] / 1e6:.3f} | {mem} |")
        md = "\n".join(lines)
        print("\n" + md)
        lo, hi = self.sizes[0], self.sizes[-1]
        ratios = {}
        for kind in ("decode", "encode"):
            for method in ("exact", "fast", "untiled", "comfy_tiled"):
                a, b = self.get(kind, lo, method), self.get(kind, hi, method)
                if a and b:
                    ratios[f"conv_input_growth[{kind}/{method}]"] = b["largest_conv_input"] / a["largest_conv_input"]
            for method in ("exact", "fast", "comfy_tiled"):
                r = self.get(kind, hi, method)
                if r and "mean_err" in r:
                    ratios[f"mean_err[{kind}/{method}@{hi}]"] = r["mean_err"]
                    ratios[f"max_err[{kind}/{method}@{hi}]"] = r["max_err"]
            f, c = self.get(kind, hi, "fast"), self.get(kind, hi, "comfy_tiled")
            if f and c and "mean_err" in f:
                ratios[f"fast_vs_comfy_mean_err[{kind}@{hi}]"] = f["mean_err"] / max(c["mean_err"], 1e-30)
            for method in ("untiled", "exact"):
                r = self.get(kind, hi, method)
                if r and "max_err64" in r:
                    ratios[f"max_err_vs_fp64[{kind}/{method}@{hi}]"] = r["max_err64"]
            e, u = self.get(kind, hi, "exact"), self.get(kind, hi, "untiled")
            if e and u:
                ratios[f"time_vs_untiled[{kind}/exact@{hi}]"] = e["seconds"] / max(u["seconds"], 1e-9)
        ratios[f"area_growth"] = (hi / lo) ** 2
        self.results["ratios"] = ratios
        self.results["markdown"] = md
        print("\nratios:")
        for k, v in ratios.items():
            print(f"  {k} = {v:.6g}")
        if self.args.json:
            benchlib.write_json(self.args.json, self.results)
            print(f"wrote {self.args.json}")
        if self.args.md:
            with open(self.args.md, "w", encoding="utf-8") as fh:
                fh.write(md + "\n")
            print(f"wrote {self.args.md}")


def main(argv=None):
    Bench(parse_args(argv)).main()


if __name__ == "__main__":
    main()
