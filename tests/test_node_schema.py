"""The nodes' V3 schema and registration, in-process (no server).

Saved workflows (UI and API form) address nodes by id and widgets by input name and order, so the
node info ComfyUI serves at ``/object_info`` (``GET_NODE_INFO_V1()`` for V3 nodes) is pinned here
exactly as the V1 nodes' ``INPUT_TYPES()`` / ``RETURN_TYPES`` had it. The one representation V3
changes: a combo is ``["COMBO", {"options": [...], "multiselect": false, ...}]`` instead of
``[[...], {...}]``; it is compared by its options. tests/test_server.py checks the same order
through a real server; tests/test_validation.py checks the validation messages through one.
"""
import asyncio
import inspect
import json
import os
import re

import pytest

import qtd_fixtures as fx

# (type, {default/min/max/step}) per input, in input order; a list type is a combo's options.
EXPECTED = {
    "QuadtreeVisualizer": {
        "display_name": "Quadtree Visualizer",
        "required": [
            ("image", "IMAGE", {}),
            ("content_threshold", "FLOAT", {"default": 25.0, "min": 0.0, "max": 255.0, "step": 0.1}),
            ("min_tile_size", "INT", {"default": 128, "min": 1, "max": 4096, "step": 1}),
            ("min_denoise", "FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01}),
            ("max_denoise", "FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01}),
            ("line_thickness", "INT", {"default": 2, "min": 0, "max": 16, "step": 1}),
            ("max_tile_size", "INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
        ],
        "optional": [("draw_indices", "BOOLEAN", {"default": False})],     # added after; optional, last
        "output": ["IMAGE", "QUADTREE"],
        "output_name": ["image", "quadtree"],
    },
    "QuadtreeDiffusion": {
        "display_name": "Quadtree Diffusion",
        "required": [
            ("model", "MODEL", {}),
            ("method", ["MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"],
             {"default": "Mixture of Diffusers"}),
            ("enable_overlap", "BOOLEAN", {"default": True}),
            ("tile_overlap", "INT", {"default": 64, "min": 0, "max": 1024, "step": 8}),
            ("tile_batch_size", "INT", {"default": 0, "min": 0, "max": 256, "step": 1}),
            ("skip_diffusion_below", "INT", {"default": 0, "min": 0, "max": 8192, "step": 8}),
            ("variable_denoise", ["schedule", "scale", "off"], {"default": "schedule"}),
            ("tile_width", "INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
            ("tile_height", "INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
        ],
        "optional": [("quadtree", "QUADTREE", {}),
                     # added after (issue 20); optional, last: saved workflows load unchanged
                     ("reference_mode", ["crop to tile", "whole image"], {"default": "crop to tile"})],
        "output": ["MODEL"],
        "output_name": ["MODEL"],
    },
    "SpotDiffusionParams_QuadtreeDiffusion": {
        "display_name": "SpotDiffusion Parameters (Quadtree)",
        "required": [
            ("model", "MODEL", {}),
            ("shift_method", ["random", "sorted", "fibonacci"], {"default": "random"}),
            ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        ],
        # appended (issue 15): optional and last, so workflows saved without it load unchanged
        "optional": [("context_margin", "INT", {"default": 0, "min": 0, "max": 1024, "step": 8})],
        "output": ["MODEL"],
        "output_name": ["MODEL"],
    },
    # The predecessor's ids and inputs (its saved workflows load). tile_size's default follows the
    # device's memory: 512 on the CPU these tests run on (see test_vae_tile_size_default_follows_the_device).
    "VAEEncodeTiled_QuadtreeDiffusion": {
        "display_name": "Quadtree VAE Encode",
        "required": [
            ("pixels", "IMAGE", {}),
            ("vae", "VAE", {}),
            ("tile_size", "INT", {"default": 512, "min": 128, "max": 8192, "step": 16}),
            ("fast", "BOOLEAN", {"default": False}),
            ("color_fix", "BOOLEAN", {"default": True}),
        ],
        "optional": [],
        "output": ["LATENT"],
        "output_name": ["LATENT"],
    },
    "VAEDecodeTiled_QuadtreeDiffusion": {
        "display_name": "Quadtree VAE Decode",
        "required": [
            ("samples", "LATENT", {}),
            ("vae", "VAE", {}),
            ("tile_size", "INT", {"default": 512, "min": 128, "max": 8192, "step": 16}),
            ("fast", "BOOLEAN", {"default": False}),
        ],
        "optional": [],
        "output": ["IMAGE"],
        "output_name": ["IMAGE"],
    },
    "QuadtreeTileCrops": {
        "display_name": "Quadtree Tile Crops",
        "required": [("image", "IMAGE", {}), ("quadtree", "QUADTREE", {})],
        "optional": [],
        "output": ["IMAGE"],
        "output_name": ["crops"],
        "output_is_list": [True],
    },
    "QuadtreeTileConditioning": {
        "display_name": "Quadtree Tile Conditioning",
        "required": [("conditioning", "CONDITIONING", {}), ("quadtree", "QUADTREE", {}),
                     ("tile_conditioning", "CONDITIONING", {})],
        "optional": [],
        "output": ["CONDITIONING"],
        "output_name": ["CONDITIONING"],
        "input_is_list": True,
    },
    "QuadtreeGridLayout": {
        "display_name": "Quadtree Grid Layout",
        "required": [
            ("width", "INT", {"default": 2048, "min": 8, "max": 16384, "step": 8}),
            ("height", "INT", {"default": 2048, "min": 8, "max": 16384, "step": 8}),
            ("tile_width", "INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
            ("tile_height", "INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
            ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ],
        "optional": [],
        "output": ["QUADTREE"],
        "output_name": ["quadtree"],
    },
}
CATEGORY = "sampling/tiled_diffusion"
PINNED_KEYS = ("default", "min", "max", "step")


def registered(pack) -> dict:
    """{node id: class} as ComfyUI's load_custom_node gets them: from comfy_entrypoint()."""
    async def nodes():
        ext = await pack.comfy_entrypoint()
        return ext, await ext.get_node_list()
    ext, classes = asyncio.run(nodes())
    return ext, {cls.GET_NODE_INFO_V1()["name"]: cls for cls in classes}


def node_info(cls) -> dict:
    """What /object_info serves for the node (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(cls.GET_NODE_INFO_V1()))


def normalized(spec):
    """(type, pinned options) of an /object_info input spec; a combo's type is its option list."""
    typ, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if typ == "COMBO":
        typ = opts.pop("options")
        assert opts.pop("multiselect", False) is False
    return typ, {k: opts[k] for k in PINNED_KEYS if k in opts}


def test_pack_registers_through_comfy_entrypoint_only(pack):
    from comfy_api.v0_0_2 import ComfyExtension, io
    # ComfyUI uses NODE_CLASS_MAPPINGS when a pack has one and then never calls comfy_entrypoint
    assert getattr(pack, "NODE_CLASS_MAPPINGS", None) is None
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    ext, nodes = registered(pack)
    assert isinstance(ext, ComfyExtension)
    assert list(nodes) == list(EXPECTED)
    for node_id, cls in nodes.items():
        assert issubclass(cls, io.ComfyNode), node_id
        assert cls is getattr(pack.nodes, node_id), node_id      # what in-process callers use


def test_v3_api_is_pinned_to_v0_0_2(pack):
    """The nodes are defined with ``comfy_api.v0_0_2`` (``self_check.node_api``; ``comfy_api.latest`` only where
    v0_0_2 is missing: tests/test_drift.py), and no module of the pack imports a node API of its own."""
    import comfy_api.v0_0_2 as pinned
    assert pack.self_check.NODE_API_PINNED == "comfy_api.v0_0_2"
    assert pack.nodes.io is pinned.io and pack.nodes.ComfyExtension is pinned.ComfyExtension
    for name in sorted(os.listdir(fx.REPO_ROOT)):
        if name.endswith(".py") and name != "self_check.py":
            with open(os.path.join(fx.REPO_ROOT, name), encoding="utf-8") as f:
                imports = re.findall(r"^\s*(?:from|import)\s+(comfy_api\S*)", f.read(), flags=re.M)
            assert imports == [], (name, imports)


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_node_info_matches_the_v1_nodes(pack, node_id):
    _, nodes = registered(pack)
    info = node_info(nodes[node_id])
    want = EXPECTED[node_id]
    assert info["name"] == node_id
    assert info["display_name"] == want["display_name"]
    assert info["category"] == CATEGORY
    assert info["description"]
    assert info["output_node"] is False
    for section in ("required", "optional"):
        expected = want[section]
        assert info["input_order"].get(section, []) == [name for name, _, _ in expected], section
        assert list(info["input"].get(section, {})) == [name for name, _, _ in expected], section
        for name, typ, opts in expected:
            spec = info["input"][section][name]
            assert normalized(spec) == (typ, opts), (node_id, name, spec)
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert "hidden" not in info["input"]
    assert info["output"] == want["output"]
    assert info["output_name"] == want["output_name"]
    assert info["output_is_list"] == want.get("output_is_list", [False] * len(want["output"]))
    assert getattr(nodes[node_id], "INPUT_IS_LIST", False) is want.get("input_is_list", False)
    assert len(info["output_tooltips"]) == len(want["output"]) and all(info["output_tooltips"])


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_input_types_and_return_types_as_comfyui_reads_them(pack, node_id):
    """execution.py reads INPUT_TYPES() / RETURN_TYPES of V3 classes through their V1 shims."""
    cls = getattr(pack.nodes, node_id)
    spec = cls.INPUT_TYPES()
    want = EXPECTED[node_id]
    assert list(spec["required"]) == [name for name, _, _ in want["required"]]
    assert list(spec.get("optional", {})) == [name for name, _, _ in want["optional"]]
    assert list(cls.RETURN_TYPES) == want["output"]


# ------------------------------------------------------------------ validate_inputs (direct calls)

VIS_OK = dict(min_denoise=0.2, max_denoise=0.8, min_tile_size=128, max_tile_size=1024)


@pytest.mark.parametrize("bad, message", [
    (dict(min_denoise=0.9, max_denoise=0.1),
     "min_denoise (0.9) is greater than max_denoise (0.1): set min_denoise <= max_denoise "
     "(large flat tiles get min_denoise, small detailed tiles max_denoise)"),
    (dict(min_tile_size=512, max_tile_size=256),
     "min_tile_size (512px) is greater than max_tile_size (256px): lower min_tile_size or raise max_tile_size"),
    (dict(max_denoise=1.5), "max_denoise (1.5) is outside 0.0..1.0: set max_denoise between 0.0 and 1.0"),
    (dict(min_denoise=-0.1), "min_denoise (-0.1) is outside 0.0..1.0: set min_denoise between 0.0 and 1.0"),
    (dict(min_tile_size=0), "min_tile_size (0) is outside 1..4096: set min_tile_size between 1 and 4096"),
    (dict(max_tile_size=16), "max_tile_size (16) is outside 64..8192: set max_tile_size between 64 and 8192"),
], ids=["denoise", "tile_size", "max_denoise", "min_denoise", "min_tile_size", "max_tile_size"])
def test_visualizer_validate_inputs_messages(pack, bad, message):
    assert pack.nodes.QuadtreeVisualizer.validate_inputs(**{**VIS_OK, **bad}) == message


def test_visualizer_validate_inputs_accepts_valid_equal_and_linked_values(pack):
    v = pack.nodes.QuadtreeVisualizer.validate_inputs
    assert v(**VIS_OK) is True
    assert v(min_denoise=0.5, max_denoise=0.5, min_tile_size=64, max_tile_size=64) is True
    assert v(min_denoise=None, max_denoise=0.1, min_tile_size=None, max_tile_size=None) is True  # linked inputs


@pytest.mark.parametrize("node_id, inputs, message", [
    ("QuadtreeDiffusion", dict(method="bogus", variable_denoise="schedule"),
     "method: 'bogus' is not one of MultiDiffusion, Mixture of Diffusers, SpotDiffusion"),
    ("QuadtreeDiffusion", dict(method="SpotDiffusion", variable_denoise="bogus"),
     "variable_denoise: 'bogus' is not one of schedule, scale, off"),
    ("SpotDiffusionParams_QuadtreeDiffusion", dict(shift_method="bogus"),
     "shift_method: 'bogus' is not one of random, sorted, fibonacci"),
])
def test_combo_values_are_checked_by_validate_inputs(pack, node_id, inputs, message):
    """ComfyUI 0.3.75 does not check V3 combo values at /prompt; validate_inputs does."""
    cls = getattr(pack.nodes, node_id)
    assert cls.validate_inputs(**inputs) == message
    assert cls.validate_inputs(**{k: None for k in inputs}) is True


def test_execute_returns_node_output(pack):
    from comfy_api.v0_0_2 import io
    model = fx.local_model(0)
    out = pack.nodes.SpotDiffusionParams_QuadtreeDiffusion.execute(model=model, shift_method="sorted", seed=3)
    assert isinstance(out, io.NodeOutput)
    (m,) = out.args
    assert m is not model
    with pytest.raises(ValueError, match="shift_method: 'x' is not one of random, sorted, fibonacci"):
        pack.nodes.SpotDiffusionParams_QuadtreeDiffusion.execute(model=model, shift_method="x", seed=3)


def test_vae_tile_size_default_follows_the_device(pack):
    """512 px on the CPU; on an accelerator the largest multiple of 64 whose tile fits a fifth of
    its memory (more memory, larger tiles; 256..4096)."""
    tv = pack.tiled_vae
    assert tv.default_tile_size("decode") == tv.default_tile_size("encode") == 512
    sizes = {gib: (tv.tile_size_for_memory(gib * 2 ** 30, "decode"), tv.tile_size_for_memory(gib * 2 ** 30, "encode"))
             for gib in (4, 8, 24, 80, 1000)}
    dec = [d for d, _ in sizes.values()]
    assert dec == sorted(dec) and dec[0] >= 256 and dec[-1] == 4096 and len(set(dec)) >= 4, sizes
    assert all(e >= d and e % 64 == 0 for d, e in sizes.values()), sizes
    assert tv.tile_bytes(sizes[24][0] ** 2 * 256, 2) <= 24 * 2 ** 30 / 5 < tv.tile_bytes((sizes[24][0] + 64) ** 2 * 256, 2)


@pytest.mark.parametrize("node_id, inputs", [
    ("VAEDecodeTiled_QuadtreeDiffusion", dict(samples=None, vae=None, fast=False)),
    ("VAEEncodeTiled_QuadtreeDiffusion", dict(pixels=None, vae=None, fast=False, color_fix=True)),
])
@pytest.mark.parametrize("tile_size", [64, 9000])
def test_vae_nodes_reject_a_tile_size_out_of_range(pack, node_id, inputs, tile_size):
    cls = getattr(pack.nodes, node_id)
    with pytest.raises(ValueError, match=rf"tile_size \({tile_size}\) is outside 128..8192 px: "
                                         r"set tile_size between 128 and 8192"):
        cls.execute(tile_size=tile_size, **inputs)
