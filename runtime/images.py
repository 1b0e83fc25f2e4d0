"""Images: model range [-1, 1] <-> uint8, and grids as PNG (written atomically)."""

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


# A grid beyond this many images is no longer an image anyone looks at (10,000 digits: 6002x6002 pixels at scale 2)
MAX_GRID = 10000


def check_grid(n: int) -> None:
    """ValueError when n images are too many for one grid image (MAX_GRID)."""
    if n > MAX_GRID:
        raise ValueError(f"a grid image of {n} digits would be too large to view (at most {MAX_GRID}); "
                         f"write an .npz instead")


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2,
              text: dict[str, str] | None = None) -> None:
    """Tile (N,H,W) uint8 images (N <= MAX_GRID) into one image, `scale` x nearest-neighbour, and write it atomically
    (PNG, or any format Pillow knows from the extension). text: PNG text entries (e.g. the training step)."""
    from PIL import Image, PngImagePlugin

    from ..files import atomic_write

    check_grid(len(images))
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())   # loads Pillow's plugins
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension (use .png)")
    img = Image.fromarray(grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    info = None
    if text and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, pnginfo=info) if info else img.save(tmp, format=fmt))
