"""Images: reading the user's pictures, model range [-1, 1] <-> uint8, grids as PNG and trajectories as PNG or GIF
(written atomically, files.atomic_write).

Every picture is (H, W) uint8 inside the package, 0 black .. 255 white, the digit white on black as in MNIST.
`read_image` turns any picture file Pillow reads into that (greyscale, 16-bit, float, RGB, palette, with or without
alpha; upright as shown), refusing unreadable files, animations and decompression bombs with one clear message
(ImageError, a DdpmError);
`fit` resizes.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import DdpmError, OptionError, clip
from ..files import input_path

# The largest picture read (pixels): a digit needs nothing near it, and a small file that claims more is a
# decompression bomb. Pillow's own limit (Image.MAX_IMAGE_PIXELS, about 89 M pixels) is enforced too.
MAX_PIXELS = 4096 * 4096


class ImageError(OptionError):
    """A picture that cannot be used; str(e) is one line for the user; `option` the argument it came from (image,
    mask) where that is known."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A picture file as (H, W) uint8 at the size it is shown, 0 black .. 255 white.

    Turned upright as a viewer shows it (its EXIF orientation applied: a phone's photo stored on its side).
    Greyscale (1-, 8- or 16-bit; 16-bit scaled by 255/65535 and rounded), float (mode F: values all in 0..1 scaled
    by 255, else taken as grey levels 0..255; NaN, negative values or values above 255 refused), RGB (luma,
    ITU-R 601-2 as Pillow's "L" conversion), palette (through its RGBA colours). With an alpha channel (LA, RGBA,
    palette with transparency): when the colour is the same in every pixel and alpha is not, the picture is a shape
    on a transparent canvas and the digit is the alpha channel itself; otherwise the colour is composited over black
    (luma x alpha / 255).
    Raises ImageError for a missing or unreadable file, one of more than one frame (an animated GIF, a multi-page
    TIFF: which frame is meant is not known), a float one out of range, and for one over MAX_PIXELS pixels or
    Pillow's decompression-bomb limit (checked on the header, before any pixel is decoded).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not os.path.lexists(p):
        raise ImageError(f"{path}: no such file")
    input_path(p, ImageError)   # a file: not a folder, a pipe, a dead link
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path}: {w}x{h} pixels is more than this reader takes ({MAX_PIXELS} pixels; "
                                     f"a digit needs 28x28)")
                if getattr(img, "is_animated", False):   # frames are not counted: that reads the whole file
                    raise ImageError(f"{path}: more than one frame (an animation or a multi-page file), which frame "
                                     f"is the digit is not known: save that frame as a picture of its own")
                return _grey(ImageOps.exif_transpose(img), path)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a picture file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:   # truncated or corrupt data
        raise ImageError(f"{path}: cannot read the picture ({type(e).__name__}: {clip(e)})") from None


def _grey(img, path="picture") -> np.ndarray:
    """A Pillow image -> (H, W) uint8 (see read_image); ImageError naming `path` for values out of range."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):   # 16-bit (Pillow reads a 16-bit PNG as I or I;16)
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer values {a.min():g}..{a.max():g} outside 16-bit's 0..65535; "
                             f"save it as 8- or 16-bit greyscale")
        return np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and 0 <= a.min() and a.max() <= 255):
            raise ImageError(f"{path}: float values must lie in 0..1 or 0..255, got "
                             f"{'NaN or inf' if not np.isfinite(a).all() else f'{a.min():g}..{a.max():g}'}")
        scale = 255.0 if a.size and a.max() <= 1 else 1.0   # 0..1 is a float picture's usual range
        return np.rint(a * scale).astype(np.uint8)
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        rgba = np.asarray(img.convert("RGBA"))
        colour, alpha = rgba[..., :3], rgba[..., 3]
        if (colour == colour.reshape(-1, 3)[0]).all() and (alpha != alpha.flat[0]).any():
            return np.array(alpha, dtype=np.uint8)
        luma = np.asarray(img.convert("RGB").convert("L"), dtype=np.float64)
        return np.rint(luma * alpha / 255.0).astype(np.uint8)
    return np.array(img.convert("L"), dtype=np.uint8)


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 resized to size (H', W'): unchanged when it fits; box averaging when shrinking both sides (for an
    integer factor, exactly the f x f mean, rounded), Lanczos otherwise."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if image.shape == tuple(size):
        return image.copy()
    H, W = size
    shrink = image.shape[0] >= H and image.shape[1] >= W
    out = Image.fromarray(image).resize((W, H), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return np.array(out, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- the editing inputs
# A picture argument (the API's image and mask, the CLI's --image and --mask) is a picture file or a (H, W) uint8
# array; a stack (N, H, W) gives one result per picture.
HALVES = ("top", "bottom", "left", "right")


def picture(image, option: str = "image", allow_bool: bool = False) -> np.ndarray:
    """A picture file (read_image) or an array -> (H, W) uint8 (allow_bool: a bool mask array, True = 255). Raises
    ImageError naming `option`."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(image)
        except ImageError as e:
            e.option = option
            raise
    try:
        a = np.asarray(image)
    except (ValueError, TypeError) as e:   # a ragged nested list, a closed PIL image
        raise ImageError(f"{option} must be a picture file or a (H, W) uint8 array ({e})", option) from None
    if allow_bool and a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim != 2 or a.dtype != np.uint8 or min(a.shape) < 1:
        raise ImageError(f"{option} must be a picture file or a (H, W) uint8 array, got {a.dtype} {a.shape}", option)
    return a


# A picture whose outer frame has this median grey level or more has a light background: a dark digit on white,
# which the model (white digits on black, as MNIST) would read as a white blob.
LIGHT_FRAME = 224


def check_dark_background(a: np.ndarray, where: str, option: str = "image") -> np.ndarray:
    """a, an (H, W) uint8 picture, when its background is dark; ImageError (naming `where` and `option`) when the
    median of its outer 1-pixel frame is LIGHT_FRAME or more: a black digit on white, to be inverted first."""
    if min(a.shape) > 2:
        frame = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
        level = int(np.median(frame))
        if level >= LIGHT_FRAME:
            raise ImageError(f"{where} has a light background (its edge pixels' median grey level is {level}): the "
                             f"model takes a white digit on black, as in MNIST; invert the picture (255 - each pixel)",
                             option)
    return a


def _dark_picture(image, option: str = "image") -> np.ndarray:
    """picture(image) when its background is dark (check_dark_background, naming the file or `option`)."""
    where = str(image) if isinstance(image, (str, os.PathLike)) else option
    return check_dark_background(picture(image, option), where, option)


def editing_picture(image, size: tuple[int, int], option: str = "image") -> np.ndarray:
    """One editing input, a picture file or a (H, W) uint8 array, as every editing command and method takes it:
    (H', W') uint8 resized to size (fit). Raises ImageError as `pictures` does, also for a light background."""
    return fit(_dark_picture(image, option), size)


def pictures(image, n: int | None, option: str = "image") -> tuple[list[np.ndarray], int]:
    """(pictures at their own size, n): one picture with n results (default 8), or a stack (N, H, W) with one
    result each (n None or N >= 1). Raises ImageError, also for a picture with a light background
    (check_dark_background), or OptionError naming `option` (an empty stack) or n."""
    if isinstance(image, (str, os.PathLike)) or np.ndim(image) != 3:
        return [_dark_picture(image, option)], 8 if n is None else n
    stack = np.asarray(image)
    if len(stack) == 0:
        raise OptionError(f"{option} is an empty stack of pictures (shape {stack.shape}): give at least one", option)
    if n not in (None, len(stack)):
        raise OptionError(f"a stack of {len(stack)} pictures gives one result each: n must be {len(stack)}, got {n}",
                          "n")
    return [check_dark_background(picture(p, option), f"{option} {i}", option) for i, p in enumerate(stack)], \
        len(stack)


def fitted(image, n: int | None, size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(pictures (m, H', W') uint8 resized to size, n): see pictures."""
    raw, n = pictures(image, n)
    return np.stack([fit(p, size) for p in raw]), n


def inpaint_inputs(image, mask, n: int | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(pictures (m, H, W) uint8, kept (m or 1, H, W) bool, n) at `size`, from inpaint's picture(s) and mask: the
    name of the half to redraw (HALVES), or picture(s) of the image's size (before resizing), read as grey
    (read_image: a coloured mask by its luma), whose white pixels (>= 128 after resizing) are kept. Raises
    ImageError / OptionError naming image, mask or n, also for a mask that keeps no pixel or every pixel."""
    from .edits import half_mask

    raw, n = pictures(image, n)                     # at the file's size: a mask picture must match it
    images = np.stack([fit(p, size) for p in raw])
    if isinstance(mask, str) and mask in HALVES:
        if size[0] != size[1]:
            raise OptionError("half masks need a square image", "mask")
        return images, half_mask(mask, size[0])[None], n
    if isinstance(mask, str) and not Path(mask).suffix:
        raise OptionError(f"mask must be one of {', '.join(HALVES)} or a picture file, got {mask!r}", "mask")
    stack = not isinstance(mask, (str, os.PathLike)) and np.ndim(mask) == 3
    masks = [picture(m, "mask", allow_bool=True) for m in (mask if stack else [mask])]
    if len(masks) not in (1, len(raw)):
        raise OptionError(f"{len(masks)} masks for {len(raw)} pictures", "mask")
    for m in masks:
        if m.shape != raw[0].shape:
            raise OptionError(f"the mask is {m.shape[1]}x{m.shape[0]} pixels and the image {raw[0].shape[1]}x"
                              f"{raw[0].shape[0]}: they must have the same size", "mask")
    kept = np.stack([fit(m, size) >= 128 for m in masks])
    for k in kept:
        if not k.any():
            raise OptionError("the mask keeps no pixel: none is white (>= 128 when read as grey; a coloured mask is "
                              "read by its luma, so pure red is 76): white pixels are kept, black ones redrawn", "mask")
        if k.all():
            raise OptionError("the mask keeps every pixel, so there is nothing to redraw: black pixels are redrawn, "
                              "white ones kept", "mask")
    return images, kept, n


class GreyOnly(DdpmError):
    """A model of more than one channel asked for pictures: ddpm's pictures are greyscale (H, W) uint8."""


def require_grey(image_shape: tuple[int, int, int], what: str) -> None:
    """Return when a model's images (C, H, W) have one channel; GreyOnly naming the shape and `what` (e.g. "sampling
    it") otherwise. The one rule for models of more channels: every picture ddpm writes is greyscale (H, W) uint8
    (to_uint8, the generator's `images` output), so sampling, editing, generator.onnx and the web page refuse such a
    model before any work, and it loads and exports to ONNX only."""
    if image_shape[0] != 1:
        shape = "x".join(map(str, image_shape))
        raise GreyOnly(f"this model makes {shape} images, and ddpm writes greyscale pictures only: {what} would drop "
                       f"channels")


def to_uint8(x) -> np.ndarray:
    """(N,1,H,W) or (N,H,W) in [-1, 1] (torch or numpy) -> (N,H,W) uint8 (channel 0: require_grey)."""
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
    """OptionError (option "n") when n images are too many for one grid image (MAX_GRID)."""
    if n > MAX_GRID:
        raise OptionError(f"a grid image of {n} pictures would be too large to view (at most {MAX_GRID}); "
                          f"use --out x.npz, which streams any number", "n")


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2,
              text: dict[str, str] | None = None) -> None:
    """Tile (N,H,W) uint8 images (N <= MAX_GRID) into one image, `scale` x nearest-neighbour, and write it atomically
    (PNG, or any format Pillow knows from the extension); one image (N = 1) is written bare, at its own H x W. text:
    PNG text entries (e.g. the training step)."""
    from PIL import Image, PngImagePlugin

    from ..files import atomic_write

    check_grid(len(images))
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())   # loads Pillow's plugins
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension (use .png)")
    if len(images) == 1:   # a picture of one digit is the digit itself, as the model made it
        img = Image.fromarray(np.ascontiguousarray(images[0], dtype=np.uint8))
    else:
        img = Image.fromarray(grid(images, nrow))
    if scale > 1 and len(images) > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    info = None
    if text and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, pnginfo=info) if info else img.save(tmp, format=fmt))


class Trajectory:
    """A watch for generate() (runtime.generate; a runtime.engine.StepCallback): x_t and x0_hat of the first
    `samples` samples after every row, as uint8 frames (x0_hat kept from the last network row on rows that only add
    noise)."""

    def __init__(self, samples: int = 4):
        self.samples = samples
        self.rows: list[int] = []
        self.x: list[np.ndarray] = []     # (m, H, W) uint8 per row
        self.x0: list[np.ndarray] = []

    def __call__(self, i: int, t: int, x: np.ndarray, x0: np.ndarray | None) -> None:
        m = self.samples
        self.rows.append(i)
        self.x.append(to_uint8(x[:m]))
        self.x0.append(to_uint8(x0[:m]) if x0 is not None else self.x0[-1] if self.x0 else np.zeros_like(self.x[-1]))

    def pick(self, count: int) -> list[int]:
        """`count` indices of recorded rows, evenly spread from the first to the last."""
        n = len(self.rows)
        return sorted(set(np.round(np.linspace(0, n - 1, min(count, n))).astype(int).tolist()))

    def save(self, path: str | os.PathLike, columns: int = 10, frames: int = 60, scale: int = 2) -> None:
        """.png: for each sample a row of x_t then a row of x0_hat at `columns` rows of the plan; .gif: up to `frames`
        frames of all samples' x_t (top) and x0_hat (bottom), the last one held for 2 s."""
        from PIL import Image

        from ..files import atomic_write

        if not self.rows:
            raise ValueError("nothing recorded")
        path = Path(path)
        m = self.x[0].shape[0]
        if path.suffix.lower() == ".gif":
            pics = []
            for k in self.pick(frames):
                g = grid(np.concatenate([self.x[k], self.x0[k]]), nrow=m)
                pics.append(Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST))
            durations = [80] * (len(pics) - 1) + [2000]
            # optimize=False: Pillow's palette optimisation of later frames changes grey levels (255 read back as 243)
            atomic_write(path, lambda tmp: pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:],
                                                        duration=durations, loop=0, optimize=False))
            return
        cols = self.pick(columns)
        tiles = [img for s in range(m) for seq in (self.x, self.x0) for img in (seq[k][s] for k in cols)]
        save_grid(np.stack(tiles), path, nrow=len(cols), scale=scale)
