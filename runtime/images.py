"""Images: model range [-1, 1] <-> uint8, and grids as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(x) -> np.ndarray:
    """(N,1,H,W) or (N,H,W) in [-1, 1] (torch or numpy) -> (N,H,W) uint8."""
    x = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim == 4:
        x = x[:, 0]
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N,H,W) uint8 images into one (rows*(H+pad)+pad, cols*(W+pad)+pad) image."""
    n, h, w = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return out


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2) -> None:
    from PIL import Image

    img = Image.fromarray(grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
