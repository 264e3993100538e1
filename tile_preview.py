"""What a person sees of a layout: tile borders coloured by denoise, tile indices, tile crops.

Pure tensor functions over IMAGE tensors ([H, W, C] per image, values 0..1); no ComfyUI imports.
"""
from __future__ import annotations

import torch

from . import quadtree as qt

ASPECT_TOLERANCE = 0.03   # as the engine's: a layout from an image of another aspect is refused

# 3x5 bitmaps of the digits 0-9, rows top to bottom
DIGITS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111")


def draw_layout(image: torch.Tensor, layout: qt.Layout, thickness: int) -> torch.Tensor:
    """The image with each tile's border drawn, coloured by denoise: blue (0) to red (1)."""
    out = image[..., :3].clone()
    if thickness <= 0:
        return out
    H, W = out.shape[0], out.shape[1]
    for t in layout.tiles:
        color = torch.tensor([t.denoise, 0.15, 1.0 - t.denoise], dtype=out.dtype)
        x0, y0 = t.x, t.y
        x1, y1 = min(t.x + t.w, W), min(t.y + t.h, H)
        th = min(thickness, max(1, t.w // 2), max(1, t.h // 2))
        out[y0:y0 + th, x0:x1] = color
        out[max(y0, y1 - th):y1, x0:x1] = color
        out[y0:y1, x0:x0 + th] = color
        out[y0:y1, max(x0, x1 - th):x1] = color
    return out


def text_mask(text: str, scale: int) -> torch.Tensor:
    """Bool [5 s, (4 n - 1) s] mask of the digit string ``text`` (n digits, 1-px gaps), each bitmap
    pixel an s x s block (Kronecker product with a block of ones)."""
    glyphs = []
    for i, ch in enumerate(text):
        g = torch.tensor([int(b) for b in DIGITS[int(ch)]], dtype=torch.float32).reshape(5, 3)
        glyphs.append(g if i == 0 else torch.cat([torch.zeros(5, 1), g], dim=1))
    bitmap = torch.cat(glyphs, dim=1)
    return torch.kron(bitmap, torch.ones(scale, scale)) > 0


def index_scale(tile: qt.Tile, digits: int) -> int:
    """The largest glyph scale s <= 8 whose label, (4 n + 1) s by 7 s with its margin, fits in a
    third of the tile's width and height (at least 1)."""
    return max(1, min(8, tile.w // (3 * (4 * digits + 1)), tile.h // (3 * 7)))


def draw_indices(image: torch.Tensor, layout: qt.Layout) -> torch.Tensor:
    """The image with each tile's index (its position in ``layout.tiles``) drawn in white on a black
    box at the tile's top-left corner: the order of Quadtree Tile Crops and Tile Conditioning."""
    out = image.clone()
    H, W = out.shape[0], out.shape[1]
    white = torch.ones(out.shape[-1], dtype=out.dtype)
    for i, t in enumerate(layout.tiles):
        label = str(i)
        s = index_scale(t, len(label))
        mask = text_mask(label, s)
        y0, x0 = t.y + s, t.x + s
        y1, x1 = min(H, y0 + mask.shape[0] + s), min(W, x0 + mask.shape[1] + s)
        if y1 <= y0 or x1 <= x0:
            continue
        out[max(0, y0 - s):y1, max(0, x0 - s):x1] = 0.0
        m = mask[:y1 - y0, :x1 - x0]
        out[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = white
    return out


def tile_crops(images: torch.Tensor, layout: qt.Layout) -> list[torch.Tensor]:
    """One [B, h, w, C] crop of the IMAGE batch per tile, in ``layout.tiles`` order; the layout is
    scaled to the images' size first when it was built for another size."""
    H, W = images.shape[1], images.shape[2]
    if (layout.width, layout.height) != (W, H):
        if qt.aspect_mismatch(layout, W, H) > ASPECT_TOLERANCE:
            raise ValueError(f"quadtree: built for a {layout.width}x{layout.height}px image but the image is "
                             f"{W}x{H}px (another aspect ratio): connect the image the quadtree was built on")
        scaled = qt.scale_layout(layout, W, H)
        if len(scaled.tiles) != len(layout.tiles):
            raise ValueError(f"quadtree: built for a {layout.width}x{layout.height}px image; at {W}x{H}px "
                             f"{len(layout.tiles) - len(scaled.tiles)} of its tiles vanish: connect the image the "
                             f"quadtree was built on")
        layout = scaled
    return [images[:, t.y:t.y + t.h, t.x:t.x + t.w, :] for t in layout.tiles]
