"""End to end through a REAL ComfyUI server (tests/server.py) with the pack installed in
custom_nodes under a folder name that is not a Python identifier."""
import os

import numpy as np
import pytest
from PIL import Image

import qtd_fixtures as fx
from qtd_server import PromptRejected

pytestmark = pytest.mark.slow

CATEGORY = "sampling/tiled_diffusion"
EXPECTED_ORDER = {
    "QuadtreeVisualizer": {
        "required": ["image", "content_threshold", "min_tile_size", "min_denoise", "max_denoise",
                     "line_thickness", "max_tile_size"],
        "optional": ["draw_indices"],
    },
    "QuadtreeDiffusion": {
        "required": ["model", "method", "enable_overlap", "tile_overlap", "tile_batch_size",
                     "skip_diffusion_below", "variable_denoise", "tile_width", "tile_height"],
        "optional": ["quadtree", "reference_mode"],       # reference_mode added after, last
    },
    "SpotDiffusionParams_QuadtreeDiffusion": {
        "required": ["model", "shift_method", "seed"],
        "optional": ["context_margin"],
    },
}
PROMPT_TIMEOUT = 240

from qtd_reliability import node  # noqa: E402  (registered by conftest.py)


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def read_png(path):
    assert os.path.isfile(path), path
    return np.asarray(Image.open(path).convert("RGB"))


def input_order(info, section):
    order = info.get("input_order", {}).get(section)
    return order if order is not None else list(info["input"].get(section, {}))


# --------------------------------------------------------------------------------------------

def test_pack_nodes_registered_with_category_tooltips_and_input_order(object_info):
    for class_type, expected in EXPECTED_ORDER.items():
        assert class_type in object_info, f"{class_type} missing from /object_info"
        info = object_info[class_type]
        assert info["category"] == CATEGORY, (class_type, info["category"])
        for section in ("required", "optional"):
            assert input_order(info, section) == expected.get(section, []), (class_type, section)
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{class_type}.{name} has no tooltip"


def test_pack_loaded_from_a_dashed_folder(comfy_server, object_info):
    link = os.path.join(comfy_server.custom_nodes_dir, "quadtree-diffusion")
    assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(fx.REPO_ROOT)
    assert sorted(os.listdir(comfy_server.custom_nodes_dir)) == ["qtd_test_fixture_nodes", "quadtree-diffusion"]
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert object_info["QuadtreeDiffusion"]["python_module"].startswith("custom_nodes.")
    assert "QTDTestCheckpointLoader" in object_info


def test_txt2img_grid_workflow(comfy_server, object_info):
    oi = object_info
    prompt = {
        "1": node(oi, "QTDTestCheckpointLoader", kind="local", seed=0),
        "2": node(oi, "QTDTestConditioning", text="a sunny beach with palm trees"),
        "3": node(oi, "QTDTestConditioning", text="blurry, low quality"),
        "4": node(oi, "QuadtreeDiffusion", model=["1", 0], method="Mixture of Diffusers",
                  tile_width=256, tile_height=256, tile_overlap=64, tile_batch_size=4),
        "5": node(oi, "EmptyLatentImage", width=512, height=384, batch_size=1),
        "6": node(oi, "KSampler", model=["4", 0], seed=42, steps=4, cfg=7.0, sampler_name="euler",
                  scheduler="normal", positive=["2", 0], negative=["3", 0], latent_image=["5", 0], denoise=1.0),
        "7": node(oi, "VAEDecode", samples=["6", 0], vae=["1", 2]),
        "8": node(oi, "SaveImage", images=["7", 0], filename_prefix="qtd_txt2img"),
    }
    history = comfy_server.run(prompt, timeout=PROMPT_TIMEOUT)
    assert history["status"]["status_str"] == "success"
    paths = comfy_server.output_images(history)
    assert len(paths) == 1 and paths[0].endswith(".png")
    assert os.path.dirname(paths[0]) == comfy_server.output_dir
    img = read_png(paths[0])
    assert img.shape == (384, 512, 3)
    assert img.std() > 1.0, "the decoded image is (nearly) constant"


def test_img2img_quadtree_workflow_gives_the_in_process_result(comfy_server, object_info, pack):
    """LoadImage -> Quadtree Visualizer -> Quadtree Diffusion -> VAE Encode -> KSampler -> VAE Decode through
    the server gives the image of the same graph run in-process (SaveImage's uint8 truncation apart), and
    the visualiser's image has its tile borders drawn."""
    oi = object_info
    photo = fx.synthetic_photo(512, 512, seed=0)
    fx.save_image(photo, os.path.join(comfy_server.input_dir, "qtd_photo.png"))
    prompt = {
        "1": node(oi, "QTDTestCheckpointLoader", kind="local", seed=0),
        "2": node(oi, "QTDTestConditioning", text="a landscape photo"),
        "3": node(oi, "QTDTestConditioning", text="blurry"),
        "10": node(oi, "LoadImage", image="qtd_photo.png"),
        "11": node(oi, "QuadtreeVisualizer", image=["10", 0], content_threshold=25.0, min_tile_size=64,
                   min_denoise=0.2, max_denoise=0.8, line_thickness=2, max_tile_size=512),
        "12": node(oi, "QuadtreeDiffusion", model=["1", 0], method="Mixture of Diffusers",
                   tile_overlap=32, tile_batch_size=4, quadtree=["11", 1]),
        "13": node(oi, "VAEEncode", pixels=["10", 0], vae=["1", 2]),
        "14": node(oi, "KSampler", model=["12", 0], seed=7, steps=4, cfg=7.0, sampler_name="euler",
                   scheduler="normal", positive=["2", 0], negative=["3", 0], latent_image=["13", 0], denoise=0.6),
        "15": node(oi, "VAEDecode", samples=["14", 0], vae=["1", 2]),
        "16": node(oi, "SaveImage", images=["15", 0], filename_prefix="qtd_img2img"),
        "17": node(oi, "SaveImage", images=["11", 0], filename_prefix="qtd_quadtree"),
    }
    history = comfy_server.run(prompt, timeout=PROMPT_TIMEOUT)
    result = comfy_server.output_images(history, "16")
    layout = comfy_server.output_images(history, "17")
    assert len(result) == 1 and len(layout) == 1
    out = read_png(result[0])
    vis = read_png(layout[0])
    src = read_png(os.path.join(comfy_server.input_dir, "qtd_photo.png"))
    assert out.shape == (512, 512, 3) and vis.shape == (512, 512, 3)
    assert not np.array_equal(vis, src), "the visualizer drew no tile borders"
    import torch
    image = torch.from_numpy(src.astype(np.float32) / 255.0)[None]        # what LoadImage gives
    _, lay = fx.call_node(pack.nodes.QuadtreeVisualizer, image=image, content_threshold=25.0, min_tile_size=64,
                          min_denoise=0.2, max_denoise=0.8, line_thickness=2, max_tile_size=512)
    args = fx.node_input_defaults(pack.nodes.QuadtreeDiffusion)
    args.update(model=fx.make_model("local", 0), method="Mixture of Diffusers", tile_overlap=32, tile_batch_size=4,
                quadtree=lay)
    vae = fx.FixtureVAE()
    lat = fx.run_ksampler(fx.call_node(pack.nodes.QuadtreeDiffusion, **args)[0],
                          fx.tiny_conditioning("a landscape photo"), fx.tiny_conditioning("blurry"),
                          vae.encode(image), seed=7, steps=4, cfg=7.0, denoise=0.6)
    mine = 255.0 * vae.decode(lat)[0].numpy()
    assert np.abs(out.astype(np.float32) - mine.clip(0, 255)).max() <= 1.0 + 1e-3
    assert np.abs(out.astype(np.float32) - src).mean() > 1.0          # and the sampler changed the picture


def test_invalid_inputs_are_rejected_with_a_readable_error(comfy_server, object_info):
    oi = object_info
    fx.save_image(fx.synthetic_photo(64, 64), os.path.join(comfy_server.input_dir, "qtd_small.png"))
    prompt = {
        "1": node(oi, "LoadImage", image="qtd_small.png"),
        "2": node(oi, "QuadtreeVisualizer", image=["1", 0], min_denoise=0.9, max_denoise=0.1),
        "3": node(oi, "PreviewImage", images=["2", 0]),
    }
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue(prompt)
    text = str(err.value)
    assert "QuadtreeVisualizer" in text and "min_denoise" in text, text


def test_interrupt_answers_when_idle(comfy_server):
    r = comfy_server.post("/interrupt", json={})
    assert r.status_code == 200 and r.content == b""
    comfy_server.interrupt()
    assert comfy_server.alive()


def test_tile_crops_run_the_next_node_once_per_tile(pack, comfy_server, object_info):
    """Quadtree Tile Crops outputs a list: ComfyUI runs the node after it once per tile, in tile order."""
    oi = object_info
    photo = fx.synthetic_photo(256, 192, seed=4)
    fx.save_image(photo, os.path.join(comfy_server.input_dir, "qtd_crops.png"))
    prompt = {
        "1": node(oi, "LoadImage", image="qtd_crops.png"),
        "2": node(oi, "QuadtreeVisualizer", image=["1", 0], content_threshold=20.0, min_tile_size=32,
                  max_tile_size=128, line_thickness=0, draw_indices=True),
        "3": node(oi, "QuadtreeTileCrops", image=["1", 0], quadtree=["2", 1]),
        "4": node(oi, "SaveImage", images=["3", 0], filename_prefix="qtd_crop"),
        # as saved before draw_indices existed: the optional input is simply absent
        "5": {"class_type": "QuadtreeVisualizer", "inputs": {
            "image": ["1", 0], "content_threshold": 20.0, "min_tile_size": 32, "min_denoise": 0.2,
            "max_denoise": 0.8, "line_thickness": 2, "max_tile_size": 128}},
        "6": node(oi, "SaveImage", images=["5", 0], filename_prefix="qtd_vis_old"),
    }
    history = comfy_server.run(prompt, timeout=PROMPT_TIMEOUT)
    paths = comfy_server.output_images(history, "4")
    src = read_png(os.path.join(comfy_server.input_dir, "qtd_crops.png"))
    import torch
    layout = fx.call_node(pack.nodes.QuadtreeVisualizer, image=torch.from_numpy(src[None] / 255.0),
                          content_threshold=20.0, min_tile_size=32, min_denoise=0.2, max_denoise=0.8,
                          line_thickness=0, max_tile_size=128)[1]
    assert len(comfy_server.output_images(history, "6")) == 1
    assert len(paths) == len(layout.tiles) > 4
    for path, t in zip(paths, layout.tiles):
        assert np.array_equal(read_png(path), src[t.y:t.y + t.h, t.x:t.x + t.w]), path
