"""The captioner of the per-tile prompt example workflow, standing in for a captioning model.

No captioning model can be downloaded here, so the tests run the example's loop (Quadtree Tile
Crops -> captioner -> CLIP Text Encode -> Quadtree Tile Conditioning) with these instead:

* ``QTDTestCaptioner`` (image, prompt) -> STRING: a short deterministic description of the crop
  (its brightness, dominant colour and size) or, with ``constant``, the same text for every crop.
  ComfyUI runs it once per item of the IMAGE list, exactly as it runs a real captioner. Each
  caption is also returned as UI text, so a test reads every caption back from the history.
* ``TextGenerate``: ComfyUI's own local captioner ("Generate Text", ComfyUI 0.15 and later),
  which the example workflow uses. On a ComfyUI that lacks it (0.3.75, CI's), this stand-in with
  the same inputs lets the rest of the example validate and load in the frontend; where ComfyUI
  has the node, ComfyUI ignores a custom node of the same name and the real one is checked.
"""
import torch

COLOURS = {"red": (1, 0, 0), "orange": (1, 0.5, 0), "yellow": (1, 1, 0), "green": (0, 0.8, 0),
           "cyan": (0, 1, 1), "blue": (0, 0, 1), "purple": (0.6, 0, 0.8), "grey": (0.5, 0.5, 0.5)}


def describe(image: torch.Tensor) -> str:
    """'a <brightness> <colour> region, <w>x<h> pixels' for a [B, H, W, C] IMAGE."""
    img = image[..., :3].float()
    mean = img.mean(dim=(0, 1, 2))
    chroma = mean - mean.mean()
    if float(chroma.abs().max()) < 0.03:
        colour = "grey"
    else:
        names = list(COLOURS)
        refs = torch.tensor([COLOURS[n] for n in names])
        refs = refs - refs.mean(dim=1, keepdim=True)
        colour = names[int(torch.argmax(torch.nn.functional.cosine_similarity(refs, chroma[None], dim=1)))]
    lum = float(mean.mean())
    brightness = "dark" if lum < 0.35 else "bright" if lum > 0.65 else "mid-toned"
    return f"a {brightness} {colour} region, {image.shape[2]}x{image.shape[1]} pixels"


class QTDTestCaptioner:
    """IMAGE -> STRING, deterministic (stands in for a captioning model in tests)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to describe."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Ignored (a real captioner's instruction)."}),
            "constant": ("BOOLEAN", {"default": False, "tooltip": "Give the same caption for every image."}),
        }}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "caption"
    OUTPUT_NODE = False
    CATEGORY = "_for_testing/quadtree_diffusion"
    DESCRIPTION = "Test fixture: a deterministic caption from the image's colour and size."

    def caption(self, image, prompt, constant):
        text = "a mid-toned grey region" if constant else describe(image)
        return {"ui": {"text": [text]}, "result": (text,)}


class TextGenerateStandIn(QTDTestCaptioner):
    """The inputs of ComfyUI's ``TextGenerate`` (0.28), for ComfyUIs that lack the node."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "A vision-language text encoder."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "", "tooltip": "Instruction."}),
                "max_length": ("INT", {"default": 512, "min": 1, "max": 32768, "tooltip": "Most tokens to generate."}),
                "sampling_mode": (["on", "off"], {"tooltip": "Sample (on) or greedy (off)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to describe."}),
                "video": ("IMAGE", {"tooltip": "Video frames."}),
                "audio": ("AUDIO", {"tooltip": "Audio."}),
                "thinking": ("BOOLEAN", {"default": False, "tooltip": "Thinking mode."}),
                "use_default_template": ("BOOLEAN", {"default": True, "tooltip": "The model's template."}),
            },
        }

    RETURN_NAMES = ("generated_text",)
    FUNCTION = "generate"
    DESCRIPTION = "Test stand-in for ComfyUI's Generate Text (TextGenerate) where ComfyUI lacks it."

    def generate(self, clip, prompt, max_length, sampling_mode, image=None, **kwargs):
        return self.caption(image, prompt, constant=image is None)


NODE_CLASS_MAPPINGS = {"QTDTestCaptioner": QTDTestCaptioner, "TextGenerate": TextGenerateStandIn}
NODE_DISPLAY_NAME_MAPPINGS = {"QTDTestCaptioner": "QTD Test Captioner",
                              "TextGenerate": "Generate Text (test stand-in)"}
