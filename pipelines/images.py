"""Image grids for reports: sample grids, reconstruction pairs, captioned contact sheets."""
from __future__ import annotations

import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["to_pil", "grid", "caption_sheet"]


def to_pil(x) -> Image.Image:
    """(3, H, W) array/tensor in [-1, 1] -> RGB PIL image."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    arr = ((arr.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(arr)


def grid(images: list[Image.Image], cols: int | None = None, scale: int = 1, pad: int = 2) -> Image.Image:
    if not images:
        raise ValueError("grid: no images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    w, h = w * scale, h * scale
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (128, 128, 128))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def caption_sheet(items: list[tuple[Image.Image, str]], cols: int = 4, size: int = 96) -> Image.Image:
    """Images upscaled to `size` with their captions underneath."""
    font = ImageFont.load_default()
    text_h = 52
    rows = math.ceil(len(items) / cols)
    cell_w, cell_h = size + 16, size + text_h
    out = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, caption) in enumerate(items):
        r, c = divmod(i, cols)
        x, y = c * cell_w + 8, r * cell_h
        out.paste(im.resize((size, size), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, 18)[:4]):
            draw.text((x, y + size + 1 + 12 * j), line, fill="black", font=font)
    return out
