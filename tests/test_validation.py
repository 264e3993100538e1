"""Bad inputs get a message naming the input and its fix, before sampling starts (issue 6).

Through a REAL ComfyUI server (tests/server.py): ``POST /prompt`` validation errors (what the UI
uses to highlight a node), execution errors in ``/history`` status messages, and the engine's
log lines in the server log.  The last tests (latent rank / channels) run in-process.
"""
import os

import pytest
import torch

import qtd_fixtures as fx




import qtd_reliability as rl  # registered by conftest.py (tests/reliability.py)

PROMPT_TIMEOUT = 240
VIS_INPUTS = {"min_denoise", "max_denoise", "min_tile_size", "max_tile_size"}


@pytest.fixture(scope="module")
def oi(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def photo(comfy_server):
    return rl.ensure_photo(comfy_server, 128, 128, seed=0)


def vis_prompt(oi, photo, **vis):
    """LoadImage -> QuadtreeVisualizer -> PreviewImage (nothing sampled)."""
    args = dict(image=["img", 0], content_threshold=10.0, min_tile_size=32, min_denoise=0.2, max_denoise=0.8,
                line_thickness=1, max_tile_size=128)
    args.update(vis)
    return {
        "img": rl.node(oi, "LoadImage", image=photo),
        "vis": rl.node(oi, "QuadtreeVisualizer", **args),
        "show": rl.node(oi, "PreviewImage", images=["vis", 0]),
    }


def assert_rejected(srv, prompt, node_id, class_type):
    status, body = rl.post_prompt(srv, prompt)
    assert status == 400, (status, body)
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    info = body["node_errors"][node_id]
    assert info["class_type"] == class_type, info
    assert info["errors"], info
    return info["errors"]


# ------------------------------------------------------------------------------------ VALIDATE_INPUTS

@pytest.mark.slow
@pytest.mark.parametrize("inputs, names, text", [
    (dict(min_denoise=0.9, max_denoise=0.1), {"min_denoise", "max_denoise"},
     ["min_denoise (0.9) is greater than max_denoise (0.1)", "set min_denoise <= max_denoise"]),
    (dict(min_tile_size=512, max_tile_size=256), {"min_tile_size", "max_tile_size"},
     ["min_tile_size (512px) is greater than max_tile_size (256px)", "lower min_tile_size or raise max_tile_size"]),
], ids=["denoise", "tile_size"])
def test_inverted_range_is_rejected_at_prompt_naming_the_input(comfy_server, oi, photo, inputs, names, text):
    srv = comfy_server
    before = srv.get("/history").json()
    errors = assert_rejected(srv, vis_prompt(oi, photo, **inputs), "vis", "QuadtreeVisualizer")
    for e in errors:
        assert e["type"] == "custom_validation_failed", e
        for t in text:
            assert t in e["details"], e["details"]
    flagged = {e["extra_info"]["input_name"] for e in errors}
    assert names <= flagged, flagged            # the UI highlights these widgets
    assert srv.get("/history").json().keys() == before.keys(), "a rejected prompt must never be queued"
    assert srv.alive()


@pytest.mark.slow
def test_validation_error_marks_only_the_inputs_involved(comfy_server, oi, photo):
    """ComfyUI flags every input its VALIDATE_INPUTS receives: only the four range inputs, never the
    image, content_threshold or line_thickness."""
    errors = assert_rejected(comfy_server, vis_prompt(oi, photo, min_denoise=0.9, max_denoise=0.1),
                             "vis", "QuadtreeVisualizer")
    flagged = {e["extra_info"]["input_name"] for e in errors}
    assert flagged <= VIS_INPUTS, f"unrelated inputs flagged: {sorted(flagged - VIS_INPUTS)}"


@pytest.mark.slow
@pytest.mark.parametrize("inputs, name", [
    (dict(content_threshold=-5.0), "content_threshold"),
    (dict(max_denoise=1.5), "max_denoise"),
    (dict(min_tile_size=8, max_tile_size=16), "max_tile_size"),
], ids=["content_threshold", "max_denoise", "max_tile_size"])
def test_out_of_range_values_are_rejected(comfy_server, oi, photo, inputs, name):
    """ComfyUI skips its own min/max checks for the inputs VALIDATE_INPUTS takes: the node must
    still refuse out-of-range values (and ComfyUI keeps checking all the others)."""
    errors = assert_rejected(comfy_server, vis_prompt(oi, photo, **inputs), "vis", "QuadtreeVisualizer")
    mine = [e for e in errors if e["extra_info"]["input_name"] == name]
    assert mine, errors
    if name in VIS_INPUTS:
        assert any(f"{name} ({inputs[name]}" in e["details"] for e in mine), mine


@pytest.mark.slow
@pytest.mark.parametrize("kw, node_id, class_type, name, text", [
    (dict(method="Bogus"), "tiled", "QuadtreeDiffusion", "method",
     "method: 'Bogus' is not one of MultiDiffusion, Mixture of Diffusers, SpotDiffusion"),
    (dict(mode="bogus"), "tiled", "QuadtreeDiffusion", "variable_denoise",
     "variable_denoise: 'bogus' is not one of schedule, scale, off"),
    (dict(method="SpotDiffusion", spot=dict(shift_method="bogus")), "spot", "SpotDiffusionParams_QuadtreeDiffusion",
     "shift_method", "shift_method: 'bogus' is not one of random, sorted, fibonacci"),
], ids=["method", "variable_denoise", "shift_method"])
def test_unknown_combo_value_is_rejected_at_prompt_naming_the_input(comfy_server, oi, kw, node_id, class_type,
                                                                   name, text):
    """ComfyUI 0.3.75 checks no V3 combo value at /prompt (newer versions do): the nodes'
    validate_inputs does, so a bad value is refused before anything runs, on every version."""
    srv = comfy_server
    before = srv.get("/history").json()
    errors = assert_rejected(srv, rl.tiled_prompt(oi, text=f"bad combo {name}", **kw), node_id, class_type)
    mine = [e for e in errors if e["extra_info"]["input_name"] == name]
    assert mine and all(text in e["details"] for e in mine), errors
    assert srv.get("/history").json().keys() == before.keys(), "a rejected prompt must never be queued"


@pytest.mark.slow
def test_equal_bounds_are_valid(comfy_server, oi, photo):
    entry = comfy_server.run(vis_prompt(oi, photo, min_denoise=0.5, max_denoise=0.5, min_tile_size=64,
                                        max_tile_size=64), timeout=PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success"
    [path] = comfy_server.output_images(entry, "show")
    assert os.path.isfile(path)


# ------------------------------------------------------------------------------------ overlap

@pytest.mark.slow
@pytest.mark.parametrize("layout, note", [
    ("grid", "tile_overlap 64px clamped to 32px (half a tile)"),
    ("quadtree", "tile_overlap 64px clamped to 32px (the smallest tile side)"),
])
def test_overlap_without_tile_interior_is_clamped_and_logged(comfy_server, oi, photo, layout, note):
    """64-px tiles (grid) / 32-px smallest tiles (quadtree) cannot share 64 px: the engine clamps
    the overlap, says so once in the server log, and samples exactly as with the clamped value."""
    srv = comfy_server
    kw = dict(image=photo, layout=layout, denoise=0.6, tile_width=64, tile_height=64, min_tile_size=32,
              text=f"clamp {layout}", seed=11)
    entry, log = rl.run_with_log(srv, rl.tiled_prompt(oi, overlap=64, **kw), PROMPT_TIMEOUT)
    lines = rl.engine_lines(log)
    assert lines.count(f"[Quadtree Diffusion] {note}") == 1, lines
    clamped = rl.saved_latent(srv, entry)
    entry2, log2 = rl.run_with_log(srv, rl.tiled_prompt(oi, overlap=32, **kw), PROMPT_TIMEOUT)
    assert not any("clamped" in ln for ln in rl.engine_lines(log2)), rl.engine_lines(log2)
    assert torch.isfinite(clamped).all()
    assert torch.equal(clamped, rl.saved_latent(srv, entry2)), "the clamped overlap is not the one used"


# ------------------------------------------------------------------------------------ layout vs latent

@pytest.mark.slow
def test_quadtree_of_another_aspect_ratio_is_refused_before_sampling(comfy_server, oi, photo):
    srv = comfy_server
    bad = rl.tiled_prompt(oi, image=photo, layout="quadtree", latent="empty", width=192, height=128,
                          text="aspect 192x128")
    entry, log = rl.run_with_log(srv, bad, PROMPT_TIMEOUT, check=False)
    assert entry["status"]["status_str"] == "error", entry["status"]
    err = rl.message(entry, "execution_error")
    assert err is not None, rl.status_messages(entry)
    assert err["node_type"] == "KSampler" and err["exception_type"].endswith("ValueError"), err
    msg = err["exception_message"]
    assert msg.startswith("quadtree: the layout was built for a 128x128px image but the latent is 192x128px"), msg
    assert "connect QuadtreeVisualizer to the image you encode into this latent" in msg, msg
    # refused before sampling: no tile plan, no sampler step, no run summary
    assert not any(" on a " in ln or "run done" in ln for ln in rl.engine_lines(log)), rl.engine_lines(log)
    assert "1/3" not in log
    assert srv.alive()

    # within the 3% tolerance the layout is scaled to the latent, and the server still samples
    ok = rl.tiled_prompt(oi, image=photo, layout="quadtree", latent="empty", width=392, height=384,
                         text="aspect 392x384", steps=2)
    entry, log = rl.run_with_log(srv, ok, PROMPT_TIMEOUT)
    assert any("quadtree on a 49x48 latent" in ln for ln in rl.engine_lines(log)), rl.engine_lines(log)
    out = rl.saved_latent(srv, entry)
    assert out.shape == (1, 4, 48, 49) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ IMAGE batches

@pytest.fixture(scope="module")
def flat_photo(comfy_server):
    """A flat grey 128x128 image: its quadtree is one tile, the photo's has many."""
    name = "qtd_rel_flat_128.png"
    fx.save_image(torch.full((1, 128, 128, 3), 0.5), os.path.join(comfy_server.input_dir, name))
    return name


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_visualiser_batch_of_equal_images_gives_one_layout(comfy_server, oi, photo, batch):
    srv = comfy_server
    p = rl.tiled_prompt(oi, image=photo, image_batch=2, layout="quadtree", batch=batch, denoise=0.6, steps=2,
                        content_threshold=9.0 + batch, text=f"equal images {batch}")  # never a cached layout
    entry, log = rl.run_with_log(srv, p, PROMPT_TIMEOUT)
    lines = rl.engine_lines(log)
    vis = [ln for ln in lines if "quadtree of 128x128px" in ln]
    assert len(vis) == 1 and "one layout per image" not in vis[0], lines
    assert not any("batch item" in ln for ln in lines), lines
    out = rl.saved_latent(srv, entry)
    assert out.shape == (batch, 4, 16, 16) and torch.isfinite(out).all()


@pytest.mark.slow
def test_visualiser_batch_of_different_images_gives_one_layout_per_item(comfy_server, oi, photo, flat_photo):
    srv = comfy_server
    p = rl.tiled_prompt(oi, image=photo, image2=flat_photo, layout="quadtree", latent="images",
                        denoise=0.6, steps=2, text="two images")
    entry, log = rl.run_with_log(srv, p, PROMPT_TIMEOUT)
    lines = rl.engine_lines(log)
    assert any("(one layout per image for 2 images)" in ln for ln in lines), lines
    items = [ln for ln in lines if "(batch item" in ln]
    assert len(items) == 2 and "(batch item 0)" in items[0] and "(batch item 1)" in items[1], lines
    assert "1 tiles (1x 128x128px)" in items[1] and "1 tiles" not in items[0], items
    out = rl.saved_latent(srv, entry)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


@pytest.mark.slow
def test_visualiser_batch_not_matching_the_latent_batch_is_refused(comfy_server, oi, photo, flat_photo):
    srv = comfy_server
    p = rl.tiled_prompt(oi, image=photo, image2=flat_photo, layout="quadtree", latent="image",
                        denoise=0.6, steps=2, text="two images, one latent")
    entry, _ = rl.run_with_log(srv, p, PROMPT_TIMEOUT, check=False)
    err = rl.message(entry, "execution_error")
    assert err is not None and err["node_type"] == "KSampler", rl.status_messages(entry)
    msg = err["exception_message"]
    assert msg.startswith("quadtree: 2 layouts (one per image of the IMAGE batch) but the latent batch is 1"), msg
    assert srv.alive()


# ------------------------------------------------------------------------------------ latent shape (in-process)

def _tiled_local(pack):
    """(tiled model, its LocalConvNet with call recording on)."""
    base = fx.local_model(0)
    net = base.model.diffusion_model
    net.record, net.calls = True, []
    node = pack.nodes.QuadtreeDiffusion
    args = fx.node_input_defaults(node)
    args.update(model=base, tile_width=64, tile_height=64, tile_overlap=16, tile_batch_size=4)
    return fx.call_node(node, **args)[0], net


@pytest.mark.parametrize("shape", [(1, 4, 16), (1, 16)], ids=["3d", "2d"])
def test_latent_without_height_and_width_is_refused_before_sampling(pack, shape):
    """A 3-D latent [1, 4, 16] would otherwise be tiled as a 4x16 canvas over its channels."""
    model, net = _tiled_local(pack)
    pos, neg = fx.tiny_conditioning("a"), fx.tiny_conditioning("b")
    with pytest.raises(ValueError) as err:
        fx.run_ksampler(model, pos, neg, torch.randn(*shape), steps=2, denoise=0.5)
    msg = str(err.value)
    assert msg.startswith("latent: ") and str(list(shape)) in msg and "[batch, channels, height, width]" in msg, msg
    assert net.calls == [], "the model was called before the latent was refused"


def test_latent_with_wrong_channel_count_is_refused_naming_both(pack):
    model, net = _tiled_local(pack)
    pos, neg = fx.tiny_conditioning("a"), fx.tiny_conditioning("b")
    with pytest.raises(ValueError) as err:
        fx.run_ksampler(model, pos, neg, torch.randn(1, 8, 16, 16), steps=2, denoise=0.5)
    msg = str(err.value)
    assert msg.startswith("latent: 8 channels but the model expects 4"), msg
    assert "VAE" in msg, msg
    assert net.calls == [], "the model was called before the latent was refused"
