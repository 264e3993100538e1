"""Smoke tests of the benchmark scripts: they run end to end (small sizes, subprocesses), print
their ratio lines and write their JSON. Nothing about speed is asserted (the machines are
shared and noisy); what is asserted are counts, which are exact: the model calls the
benchmarks count through a model wrapper agree with the engine's own run summary and with
the variable-denoise maths, and every run produced a finite time."""
import json
import math
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
BENCH = os.path.join(REPO_ROOT, "benchmarks")

pytestmark = pytest.mark.benchmark


def _run(args, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n" \
                                 f"--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


def _ratio_lines(stdout):
    out = {}
    section = stdout.split("\nratios:\n", 1)
    assert len(section) == 2, f"no 'ratios:' block in the output:\n{stdout[-3000:]}"
    for line in section[1].splitlines():
        line = line.strip()
        if " = " not in line:
            continue
        key, val = line.split(" = ", 1)
        out[key] = float(val)
    return out


def test_bench_cpu_small(tmp_path):
    path = tmp_path / "cpu.json"
    stdout = _run([os.path.join(BENCH, "bench_cpu.py"), "--small", "--json", str(path)], timeout=600)
    ratios = _ratio_lines(stdout)
    for key in ("at_limit[untiled]", "overhead[MultiDiffusion/grid]", "overhead[Mixture_of_Diffusers/grid]",
                "overhead[SpotDiffusion/grid]", "overhead[Mixture_of_Diffusers/quadtree]",
                "at_limit[Mixture_of_Diffusers/grid]", "schedule_tiles_ratio", "skip_tiles_ratio",
                "auto_vs_best_fixed", "outside_model_share", "engine_us_per_tile[Mixture_of_Diffusers/grid]"):
        assert key in ratios, f"ratio line {key!r} missing from:\n{stdout[-3000:]}"
        assert math.isfinite(ratios[key]) and ratios[key] > 0 or key == "outside_model_share", (key, ratios[key])
    data = json.loads(path.read_text())
    assert data["ratios"].keys() == ratios.keys()

    # A: the tile-window area ratio comes from the engine's plan: 3x3 windows of 256px+32px overlap
    # on 512px -> each window 32x32 latent on a 64x64 latent; MoD grid tiled once per model call.
    a = data["overhead"]
    assert a["untiled"]["tiles"] == a["untiled"]["calls"]          # untiled: one canvas per call
    grid = a["Mixture of Diffusers / grid"]
    assert grid["n_tiles"] == 9 and grid["area_ratio"] == pytest.approx(9 * 32 * 32 / (64 * 64))
    assert grid["tiles"] == 9 * len(grid["step_times"])            # every tile at every step
    assert a["SpotDiffusion / grid"]["area_ratio"] == pytest.approx(1.0)

    # C: counted tile evaluations == the engine's run summary, schedule == sum round(d * n)
    work = data["model_work"]
    for name, run in work["runs"].items():
        assert run["engine_summary"] is not None, name
        assert run["tiles"] == run["engine_summary"]["tiles"], name
        # the engine counts sampler calls (euler: one per step, cond+uncond together); the meter
        # counts the tile batches the engine sends to the model (none in a step where no tile is active)
        assert run["engine_summary"]["calls"] == work["steps"], name
    assert work["runs"]["schedule"]["tiles"] == work["expected_schedule_tiles"]
    assert work["runs"]["off"]["tiles"] == work["layout_tiles"] * work["steps"]
    assert work["runs"]["schedule"]["tiles"] < work["runs"]["off"]["tiles"]

    # D: a fixed tile batch k never puts more than k tiles in one call; auto batches more than 1
    for k, run in data["batch_sweep"].items():
        if int(k) > 0:
            assert run["tiles_per_call"] <= int(k)
    assert data["batch_sweep"]["0"]["tiles_per_call"] > 1


def test_bench_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    stdout = _run([os.path.join(BENCH, "bench_gpu.py"), "--device", "cpu", "--tiny", "--budget-s", "600",
                   "--out", str(out)], timeout=600)
    ratios = _ratio_lines(stdout)
    for key in ("auto_vs_best_fixed[grid@128]", "auto_vs_best_fixed[quadtree schedule@256]",
                "schedule_tiles_vs_off[256]", "at_limit_worst_tiled", "at_limit_best_tiled"):
        assert key in ratios, f"ratio line {key!r} missing from:\n{stdout[-3000:]}"
        assert math.isfinite(ratios[key]) and ratios[key] > 0, (key, ratios[key])
    data = json.loads((out / "bench_gpu.json").read_text())
    md = (out / "bench_gpu.md").read_text()
    assert "| canvas" in md and "quadtree schedule" in md
    runs = data["runs"]
    assert runs and all(r["status"] == "ok" for r in runs), [r["status"] for r in runs]
    for r in runs:
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0
        assert math.isfinite(r["raw_s_per_step"]) and r["raw_s_per_step"] > 0
        if r["config"] == "untiled":
            assert r["tiles_per_step"] == 1.0
        elif r["tile_batch"]:
            assert r["max_tiles_per_call"] <= r["tile_batch"]
    # the quadtree in schedule mode asks the model for fewer tiles than with variable denoise off
    for canvas in (128, 256):
        qs = [r for r in runs if r["canvas"] == canvas and r["config"] == "quadtree schedule" and r["tile_batch"] == 0]
        qo = [r for r in runs if r["canvas"] == canvas and r["config"] == "quadtree off"]
        assert qs[0]["tiles"] < qo[0]["tiles"]


def test_bench_vae_small(tmp_path):
    """benchmarks/bench_vae.py end to end at smoke size: its ratio lines and JSON; the counts it
    measures (largest convolution input, errors) are deterministic, its times are not asserted."""
    path = tmp_path / "vae.json"
    stdout = _run([os.path.join(BENCH, "bench_vae.py"), "--small", "--sizes", "96,192", "--tile", "48",
                   "--json", str(path)], timeout=600)
    ratios = _ratio_lines(stdout)
    for kind in ("decode", "encode"):
        for key in (f"conv_input_growth[{kind}/exact]", f"conv_input_growth[{kind}/untiled]",
                    f"mean_err[{kind}/fast@192]", f"mean_err[{kind}/comfy_tiled@192]",
                    f"fast_vs_comfy_mean_err[{kind}@192]", f"max_err_vs_fp64[{kind}/exact@192]",
                    f"time_vs_untiled[{kind}/exact@192]"):
            assert key in ratios, f"ratio line {key!r} missing from:\n{stdout[-3000:]}"
            assert math.isfinite(ratios[key]) and ratios[key] > 0, (key, ratios[key])
        assert ratios[f"conv_input_growth[{kind}/exact]"] <= 1.3 < 3.5 <= ratios[f"conv_input_growth[{kind}/untiled]"]
    assert ratios["max_err[decode/exact@192]"] < 1e-4 and ratios["max_err[encode/exact@192]"] < 1e-3
    data = json.loads(path.read_text())
    assert data["ratios"].keys() == ratios.keys()
    assert {r["method"] for r in data["runs"]} == {"untiled", "exact", "fast", "comfy_tiled"}
    assert all(r["status"] == "ok" and math.isfinite(r["seconds"]) for r in data["runs"])
    per_mp = data["sd_host_bytes_per_megapixel"]
    assert per_mp["fp32"]["decode_exact"] == pytest.approx(2 * per_mp["fp16"]["decode_exact"], rel=0.02)
    assert per_mp["fp32"]["decode_exact"] > 10 * per_mp["fp32"]["decode_fast"]


def test_bench_scale_small(tmp_path):
    """benchmarks/bench_scale.py at smoke size: its table, ratio lines and JSON; the counts are exact (the
    model's calls the benchmark counts == the engine's run summary; 16 tiles per call at most)."""
    path = tmp_path / "scale.json"
    stdout = _run([os.path.join(BENCH, "bench_scale.py"), "--small", "--json", str(path)], timeout=600)
    ratios = _ratio_lines(stdout)
    for key in ("overhead_growth[grid]", "overhead_growth[quadtree]"):
        assert key in ratios and math.isfinite(ratios[key]) and ratios[key] > 0, (key, ratios)
    rows = json.loads(path.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["grid", "grid", "quadtree", "quadtree"]
    assert rows[0]["tiles"] == 100 and rows[1]["tiles"] == 400
    for r in rows:
        assert r["engine"]["calls"] == r["calls"] and r["rows_per_call"] <= 16
        assert r["engine"]["rows_per_call"] == pytest.approx(r["rows_per_call"], abs=0.05)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("plan_ms", "step_s", "bare_step_s", "overhead"))
    assert rows[1]["calls_per_step"] == 400 / 16 and rows[1]["shapes"] == 1     # 25 full calls of one shape


def _has_multigpu():
    try:
        import comfy.multigpu   # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif("not _has_multigpu()", reason="this ComfyUI has no MultiGPU clones (comfy/multigpu.py, 0.23+)")
def test_bench_multigpu_tiny_on_cpu(tmp_path):
    """benchmarks/bench_multigpu.py --device cpu --tiny: its ratio lines and JSON; the counts are exact
    (the tile split's per-device evaluations add up to the one-device run's; ComfyUI's split by
    conditioning runs every tile once per conditioning)."""
    path = tmp_path / "multigpu.json"
    stdout = _run([os.path.join(BENCH, "bench_multigpu.py"), "--device", "cpu", "--tiny", "--canvases", "128",
                   "--steps", "2", "--json", str(path)], timeout=600)
    ratios = _ratio_lines(stdout)
    for key in ("speedup[128/cfg1]", "speedup[128/cfg4]", "tile_vs_cond_split[128/cfg4]"):
        assert key in ratios and math.isfinite(ratios[key]) and ratios[key] > 0, (key, ratios)
    runs = json.loads(path.read_text())["runs"]
    assert [(r["cfg"], r["mode"]) for r in runs] == [(1.0, "one device"), (1.0, "tile split"), (4.0, "one device"),
                                                     (4.0, "tile split"), (4.0, "cond split")]
    for one, split in ((runs[0], runs[1]), (runs[2], runs[3])):
        counts = dict(part.rsplit(" ", 1) for part in split["per_device"].split(", "))
        assert set(counts) == {"cpu", "cpu:1"} and all(int(n) > 0 for n in counts.values())
        assert sum(int(n) for n in counts.values()) == split["tiles"] == one["tiles"]
    assert runs[4]["tiles"] == 2 * runs[2]["tiles"] and runs[4]["per_device"] is None
