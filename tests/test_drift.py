"""ComfyUI updates never break a workflow silently (issue 22): the startup self-check under simulated drift.

tests/drift_probe.py runs in a subprocess: it takes away or changes one feature of the real, running
ComfyUI the way a later version could, *then* loads the pack (each scenario in a fresh forked process),
and reports the pack's log lines and what the pack did.  For every drift: exactly one self-check line
names what changed (WARNING when a feature is missing or changed, INFO when the pack handles the
change), the rest of the pack loads (all 8 nodes register), and the affected part fails with a clear
message or falls back, logged.  Unchanged, the self-check logs no warning at all.
"""
import json
import os
import subprocess
import sys

import pytest

import qtd_fixtures as fx

PROBE = os.path.join(fx.TESTS_DIR, "drift_probe.py")
SELF_CHECK = f"{fx.PACK_MODULE_NAME}.self_check"
NODES = ["QuadtreeDiffusion", "QuadtreeGridLayout", "QuadtreeTileConditioning", "QuadtreeTileCrops",
         "QuadtreeVisualizer", "SpotDiffusionParams_QuadtreeDiffusion", "VAEDecodeTiled_QuadtreeDiffusion",
         "VAEEncodeTiled_QuadtreeDiffusion"]


@pytest.fixture(scope="module")
def drift():
    """{scenario: report} of one probe run over every scenario."""
    proc = subprocess.run([sys.executable, PROBE],
                          capture_output=True, text=True, timeout=600, cwd=fx.TESTS_DIR)
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DRIFT "):
            r = json.loads(line[len("DRIFT "):])
            reports[r["scenario"]] = r
    assert reports, f"the probe reported nothing (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return reports


def run(drift, name):
    r = drift[name]
    assert r["error"] is None, r["error"]
    return r


def check_lines(r):
    """The self-check's lines other than its summary, as (level, message)."""
    return [(lvl, msg) for lvl, logger, msg in r["lines"] if logger == SELF_CHECK and "features checked" not in msg]


def one_line(r, level, *words):
    lines = check_lines(r)
    assert len(lines) == 1, lines
    lvl, msg = lines[0]
    assert lvl == level, lines[0]
    for w in words:
        assert w in msg, (w, msg)
    return msg


def no_warnings(r):
    bad = [line for line in r["lines"] if line[0] in ("WARNING", "ERROR", "CRITICAL")]
    assert not bad, bad


def test_unchanged_comfyui_logs_no_self_check_warning(drift):
    r = run(drift, "clean")
    assert check_lines(r) == []
    summary = [msg for lvl, logger, msg in r["lines"] if logger == SELF_CHECK]
    assert len(summary) == 1 and "all as expected" in summary[0], summary
    no_warnings(r)
    assert r["result"]["nodes"] == NODES


def test_without_comfy_api_v0_0_2_the_nodes_use_latest(drift):
    r = run(drift, "no_v0_0_2")
    one_line(r, "WARNING", "comfy_api.v0_0_2", "comfy_api.latest", "every node")
    res = r["result"]
    assert res["nodes"] == NODES and res["latest"]
    assert res["grid_tiles"] == 4 and res["finite"]


def test_missing_wrapper_type_falls_back_and_refuses_tile_prompts(drift):
    """No CALC_COND_BATCH wrapper type: ControlNet is computed by ComfyUI on the canvas and each tile takes its
    crop (control calls on the 8 x 12 canvas, model calls on 4 x 4 tiles), no control is dropped, and Quadtree
    Tile Conditioning fails when run with a message naming what is missing."""
    r = run(drift, "no_calc_cond_batch")
    one_line(r, "WARNING", "CALC_COND_BATCH", "per-tile ControlNet", "Quadtree Tile Conditioning", "Still works")
    others = [line for line in r["lines"] if line[0] == "WARNING" and line[1] != SELF_CHECK]
    assert not others, others           # e.g. ComfyUI's "control could not be applied": none
    res = r["result"]
    assert res["nodes"] == 8 and res["finite"]
    assert res["control_shapes"] == [[8, 12]] and res["tile_shapes"] == [[4, 4]] and res["windows"] == 6
    err = res["tile_prompt_error"]
    assert err.startswith("RuntimeError: Quadtree Tile Conditioning cannot run on this ComfyUI")
    assert "CALC_COND_BATCH" in err and "self-check" in err


def test_wrapped_function_called_with_a_new_keyword(drift):
    """ComfyUI calls the CALC_COND_BATCH wrappers with a keyword the pack does not know: logged once (handled),
    passed through all three of the pack's wrappers to ComfyUI's function at every call, per-tile ControlNet
    unchanged (each of the 6 tiles sees its own crop)."""
    r = run(drift, "new_keyword")
    one_line(r, "INFO", "_calc_cond_batch()", "new_option", "pass new parameters on")
    no_warnings(r)
    res = r["result"]
    assert res["finite"] and res["received"] == ["from ComfyUI"] and res["calls"] >= 2
    assert res["tiles_seen"] == res["windows"] == 6 and res["tile_shapes"] == [[4, 4]]


def test_wrapped_function_with_a_renamed_parameter_switches_its_wrapper_off(drift):
    """KSAMPLER.sample's ``sigmas`` renamed: the SAMPLER_SAMPLE wrapper is not registered (its run state would be
    wrong), logged; a quadtree run with per-tile denoise 0.5 still samples, every tile at every step (full
    strength: 4 steps x 2 batches of the 6 tiles), with the engine's own warning."""
    r = run(drift, "sampler_signature_changed")
    one_line(r, "WARNING", "KSAMPLER.sample()", "sigma_schedule", "per-tile denoise", "Still works")
    warned = [msg for lvl, logger, msg in r["lines"] if lvl == "WARNING" and "variable denoise will NOT work" in msg]
    assert len(warned) == 1
    res = r["result"]
    assert res["finite"] and res["tile_calls"] == 4 * 2 and res["tile_shapes"] == [[4, 4]]


def test_vae_decode_moved_falls_back_to_comfyui_tiled_decode(drift):
    """decode() moved off AutoencodingEngineLegacy: Quadtree VAE Decode gives ComfyUI's tiled decode (logged, equal
    to VAEDecodeTiled's image, no KeyError), Quadtree VAE Encode stays exact."""
    r = run(drift, "vae_decode_moved")
    one_line(r, "WARNING", "AutoencodingEngineLegacy", "decode()", "Quadtree VAE Decode", "Quadtree VAE Encode (exact)")
    fallback = [msg for lvl, logger, msg in r["lines"] if "ComfyUI's own tiled VAE decode is used" in msg]
    assert len(fallback) == 1 and "AutoencodingEngineLegacy" in fallback[0]
    assert not any("ComfyUI's own tiled VAE encode" in msg for _, _, msg in r["lines"])
    res = r["result"]
    assert res["decode_equals_comfy_tiled"]
    assert res["encode_max_diff"] < 1e-4


def test_unknown_model_patch_passed_on_and_named(drift):
    """A model-patch class the tiler does not know: named at load (handled), then once per run; every tile's model
    call holds it unchanged (the whole control image)."""
    r = run(drift, "unknown_patch")
    one_line(r, "INFO", "FutureCnetPatch", "passes such patches on unchanged")
    no_warnings(r)
    per_run = [msg for lvl, logger, msg in r["lines"] if logger.endswith("tile_patches") and "FutureCnetPatch" in msg]
    res = r["result"]
    assert len(per_run) == res["runs"] == 2 and "passed on unchanged" in per_run[0]
    assert res["unchanged"] and res["calls"] >= 2 * 2 and res["tile_shapes"] == [[4, 4]]


def test_controlnet_hint_cache_per_size(drift):
    """ControlNet caching prepared hints in per-size dicts (upstream PR #15832, tests/upstream.py), pre-filled with
    wrong hints for the canvas and tile sizes: found at load (handled), and every tile still gets exactly its own
    crop at every step."""
    r = run(drift, "hint_cache_dict")
    one_line(r, "INFO", "cond_hints", "control_inputs", "starts with them empty")
    no_warnings(r)
    res = r["result"]
    assert res["finite"] and res["caches"] == ["cond_hints", "control_inputs"]
    assert res["seen"] == res["expected"] and len(res["expected"]) == 6
