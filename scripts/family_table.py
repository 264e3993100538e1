"""Print the README's per-family table for the running ComfyUI (or merge several runs' JSON).

    COMFYUI_PATH=... python scripts/family_table.py --json out-075.json     # one ComfyUI: facts per family
    python scripts/family_table.py --merge out-075.json out-028.json        # the markdown table

For every family of ``comfy.supported_models.models`` it records the latent format, the compression the
engine uses (``utils.latent_compression``), the latent patch the engine aligns tiles to and the minimum
tile (built from the tiny model of ``tests/families.py``), and whether the family matrix tests it there
(excluded / xfail families with their reason).  Native resolutions come from NATIVE below (the families'
published training sizes; the recommended tile size is the native size).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(HERE)

# Published native (training) resolution per family, in px: the recommended grid tile / max_tile_size.
NATIVE = {
    "SD15": "512", "SD15_instructpix2pix": "512", "SD20": "768", "SD21UnclipL": "768", "SD21UnclipH": "768",
    "LotusD": "768", "Stable_Zero123": "256", "SD_X4Upscaler": "512 (output)", "SDXL": "1024", "SSD1B": "1024",
    "KOALA_700M": "1024", "KOALA_1B": "1024", "Segmind_Vega": "1024", "SDXLRefiner": "1024",
    "SDXL_instructpix2pix": "1024", "SVD_img2vid": "1024x576", "SV3D_u": "576", "SV3D_p": "576",
    "Stable_Cascade_C": "1024", "Stable_Cascade_B": "1024", "SD3": "1024", "AuraFlow": "1024",
    "PixArtAlpha": "1024", "PixArtSigma": "1024-2048", "HunyuanDiT": "1024", "HunyuanDiT1": "1024",
    "Flux": "1024", "FluxSchnell": "1024", "FluxInpaint": "1024", "LongCatImage": "1024", "Flux2": "1024-2048",
    "Chroma": "1024", "ChromaRadiance": "1024", "HiDream": "1024", "HiDreamO1": "1024", "Lumina2": "1024",
    "ZImage": "1024", "ZImagePixelSpace": "1024", "QwenImage": "1328", "Omnigen2": "1024", "Boogu": "1024",
    "JoyImage": "1024", "Ideogram4": "1024", "Krea2": "1024", "Lens": "1440", "ErnieImage": "1024",
    "Kandinsky5Image": "1024", "Kandinsky5": "768x512", "PixelDiTT2I": "1024", "PiD": "1024 (output)",
    "HunyuanImage21": "2048", "HunyuanImage21Refiner": "2048", "CosmosT2IPredict2": "1024", "Anima": "1024",
    "CosmosI2VPredict2": "1280x704", "CosmosT2V": "1280x704", "CosmosI2V": "1280x704", "GenmoMochi": "848x480",
    "LTXV": "768x512", "LTXAV": "768x512", "HunyuanVideo": "1280x720", "HunyuanVideoI2V": "1280x720",
    "HunyuanVideoSkyreelsI2V": "960x544", "HunyuanVideo15": "1280x720", "HunyuanVideo15_SR_Distilled": "1920x1080",
    "WAN21_T2V": "832x480 / 1280x720", "WAN21_I2V": "832x480 / 1280x720", "WAN21_FunControl2V": "832x480",
    "WAN21_Vace": "832x480 / 1280x720", "WAN21_Camera": "832x480", "WAN22_Camera": "832x480",
    "WAN22_S2V": "832x480", "WAN21_HuMo": "832x480", "WAN22_Animate": "1280x720", "WAN22_T2V": "1280x704",
    "WAN21_CausalAR_T2V": "832x480", "WAN21_FlowRVS": "832x480", "WAN21_SCAIL": "832x480",
    "WAN21_SCAIL2": "832x480", "WAN22_WanDancer": "832x480", "CogVideoX_T2V": "720x480",
    "CogVideoX_I2V": "720x480", "CogVideoX_Inpaint": "720x480", "SeedVR2": "any (restoration)",
}


def facts():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import importlib.util

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    fx = load("qtd_fixtures", os.path.join(REPO, "tests", "fixtures.py"))
    fx.setup_comfy()
    fam = load("qtd_families", os.path.join(REPO, "tests", "families.py"))
    pack = fx.load_pack(REPO)
    import comfy.supported_models as sm
    out = {}
    for cls in sm.models:
        name = cls.__name__
        fmt = cls.latent_format

        class Base:
            latent_format = fmt()

        row = {"format": fmt.__name__, "compression": pack.utils.latent_compression(Base())}
        if name in fam.EXCLUDED:
            row["status"] = "excluded: " + fam.EXCLUDED[name]
        elif name in fam.XFAIL:
            row["status"] = "refused (xfail): " + fam.XFAIL[name]
        elif name in fam.BUILDERS:
            t = fam.tiny(name)
            row.update(status="tested", patch=pack.utils.latent_patch_size(t.model.model),
                       min_tile=pack.model_families.min_tile(t.model.model),
                       references=pack.reference_latents.describe(t.model.model),
                       frames=t.frames is not None or "frames_batch" in t.extra)
        else:
            row["status"] = "no tiny model"
        out[name] = row
    return out


def merge(paths):
    """The markdown table over several runs (file names out-<version>.json give the version labels)."""
    label = lambda p: os.path.basename(p)[:-len(".json")].replace("out-", "")       # noqa: E731
    runs = [(label(p), json.load(open(p))) for p in paths]
    names = list(dict.fromkeys(n for _, r in runs for n in r))
    lines = ["| family | ComfyUI | latent format (compression) | patch (latent px) | tested | recommended tile "
             "(native size, px) | reference images |", "|---|---|---|---|---|---|---|"]
    for n in names:
        have = [(v, r[n]) for v, r in runs if n in r]
        versions = ", ".join(v for v, _ in have)
        r = have[-1][1]
        st = r["status"]
        tested = "yes" if st == "tested" else "no: " + st
        patch = str(r.get("patch", "-"))
        if r.get("min_tile", 1) > r.get("patch", 1):
            patch += f"; tiles >= {r['min_tile'] * r['compression']} px"
        kind = " (video)" if r.get("frames") else ""
        lines.append(f"| {n}{kind} | {versions} | {r['format']} ({r['compression']}x) | {patch} | {tested} | "
                     f"{NATIVE.get(n, '-') if st == 'tested' else '-'} | {r.get('references', '-')} |")
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--merge", nargs="+")
    a = ap.parse_args()
    if a.merge:
        merge(a.merge)
    else:
        data = facts()
        json.dump(data, open(a.json, "w"), indent=1) if a.json else print(json.dumps(data, indent=1))
