"""Images: reading the user's pictures, model range [-1, 1] <-> uint8, grids as PNG and trajectories as PNG or GIF
(written atomically, files.atomic_write).

The picture convention, one for the whole package (numpy's and Pillow's order):

    a model's images    (N, C, H, W) float32 in [-1, 1]      the network's space (C = 1 grey, 3 RGB)
    grey pictures       (N, H, W)    uint8, 0 black .. 255 white (C = 1; MNIST's digits, white on black)
    colour pictures     (N, H, W, C) uint8, channels last, RGB (C = 3)

converted in one place: `to_uint8` (model -> pictures: u = clip(rint((x + 1) 127.5), 0, 255)) and `from_uint8`
(pictures -> model: x = u / 127.5 - 1, exactly inverse on the 256 levels). One picture is a stack's element,
(H, W) or (H, W, C): `picture_shape` gives it for a model. Models of other channel counts are refused
(check_channels).
`read_image` turns any picture file Pillow reads into a grey or an RGB picture (greyscale, 16-bit, float, RGB,
palette, with or without alpha; upright as shown), refusing unreadable files, animations and decompression bombs
with one clear message (ImageError, a DdpmError);
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


def check_pixels(h: int, w: int, where: str, option: str | None = None) -> None:
    """ImageError (naming `where` and `option`) for a picture of h x w pixels over MAX_PIXELS, from its size alone:
    a file's header or an array's shape (a broadcast view of a few bytes may declare any size), before any pixel
    is decoded or read."""
    if h * w > MAX_PIXELS:
        raise ImageError(f"{where}: {w}x{h} pixels is more than this reader takes ({MAX_PIXELS} pixels; a digit "
                         f"needs 28x28)", option)


def read_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """A picture file as (H, W) uint8 at the size it is shown, 0 black .. 255 white; with channels 3, as (H, W, 3)
    uint8 RGB (a grey file's levels in all three channels; colour composited over black where it has alpha:
    rgb x alpha / 255, rounded).

    Turned upright as a viewer shows it (its EXIF orientation applied: a phone's photo stored on its side).
    Greyscale (1-, 8- or 16-bit; 16-bit scaled by 255/65535 and rounded), float (mode F: values all in 0..1 scaled
    by 255, else taken as grey levels 0..255; NaN, negative values or values above 255 refused), RGB (luma,
    ITU-R 601-2 as Pillow's "L" conversion), palette (through its RGBA colours). With an alpha channel (LA, RGBA,
    palette with transparency): when the colour is the same in every pixel that is not fully transparent and alpha
    is not, the picture is a shape on a transparent canvas and the digit is the alpha channel itself (a black digit
    on a transparent background too, whatever colour its transparent pixels hold); otherwise the colour is
    composited over black (luma x alpha / 255).
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
                check_pixels(h, w, str(path))
                if getattr(img, "is_animated", False):   # frames are not counted: that reads the whole file
                    raise ImageError(f"{path}: more than one frame (an animation or a multi-page file), which frame "
                                     f"is the digit is not known: save that frame as a picture of its own")
                upright = ImageOps.exif_transpose(img)
                return _grey(upright, path) if channels == 1 else _rgb(upright, path)
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
        seen = colour[alpha > 0]   # a fully transparent pixel's colour is not seen, whatever it holds
        if (alpha != alpha.flat[0]).any() and len(seen) and (seen == seen[0]).all():
            return np.array(alpha, dtype=np.uint8)
        luma = np.asarray(img.convert("RGB").convert("L"), dtype=np.float64)
        return np.rint(luma * alpha / 255.0).astype(np.uint8)
    return np.array(img.convert("L"), dtype=np.uint8)


# Pillow's modes read as grey levels (_grey); every other mode is colour (_rgb)
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _rgb(img, path="picture") -> np.ndarray:
    """A Pillow image -> (H, W, 3) uint8 RGB (see read_image): a grey one through _grey, in all three channels."""
    if img.mode in GREY_MODES:
        return np.repeat(_grey(img, path)[..., None], 3, axis=-1)
    if img.mode in ("P", "PA", "RGBA", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        return np.rint(rgba[..., :3] * rgba[..., 3:] / 255.0).astype(np.uint8)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A picture (H, W) or (H, W, C) uint8 resized to size (H', W'): unchanged when it fits; box averaging when
    shrinking both sides (for an integer factor, exactly the f x f mean, rounded), Lanczos otherwise."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] == tuple(size):
        return image.copy()
    H, W = size
    shrink = image.shape[0] >= H and image.shape[1] >= W
    out = Image.fromarray(image).resize((W, H), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return np.array(out, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- the editing inputs
# A picture argument (the API's image and mask, the CLI's --image and --mask) is a picture file or a uint8 array:
# (H, W) grey, or for a 3-channel model also (H, W, 3) RGB; a stack (N, H, W) or (N, H, W, 3) gives one result per
# picture. A grey picture given to a 3-channel model is read as its grey levels in all three channels; masks are
# grey (H, W) whatever the model.
HALVES = ("top", "bottom", "left", "right")


def _form(channels: int) -> str:
    return "a (H, W) uint8 array" + ("" if channels == 1 else f" or an (H, W, {channels}) one")


def picture(image, option: str = "image", allow_bool: bool = False, channels: int = 1) -> np.ndarray:
    """A picture file (read_image) or an array -> (H, W) uint8 for channels 1, (H, W, 3) uint8 for 3 (a grey one
    in all three channels). allow_bool: a bool mask array, True = 255. Raises ImageError naming `option`."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(image, channels)
        except ImageError as e:
            e.option = option
            raise
    try:
        a = np.asarray(image)
    except (ValueError, TypeError) as e:   # a ragged nested list, a closed PIL image
        raise ImageError(f"{option} must be a picture file or {_form(channels)} ({e})", option) from None
    grey = a.ndim == 2
    if not (grey or channels > 1 and a.ndim == 3 and a.shape[2] == channels) or min(a.shape) < 1 or \
            a.dtype != np.uint8 and not (allow_bool and a.dtype == bool):
        raise ImageError(f"{option} must be a picture file or {_form(channels)}, got {a.dtype} {a.shape}", option)
    check_pixels(a.shape[0], a.shape[1], option, option)   # from the shape, before any value is read or copied
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if channels > 1 and grey:
        a = np.repeat(a[..., None], channels, axis=-1)
    return a


# A picture whose outer frame has this median grey level or more has a light background: a dark digit on white,
# which the model (white digits on black, as MNIST) would read as a white blob.
LIGHT_FRAME = 224


def check_dark_background(a: np.ndarray, where: str, option: str = "image") -> np.ndarray:
    """a, an (H, W) uint8 picture, when its background is dark and it holds something; ImageError (naming `where`
    and `option`) when every pixel has one value (no digit: an edit of it would draw from nothing, and a dark digit
    on a transparent background is black on black once composited over black, picture), or when the median of its
    outer 1-pixel frame is LIGHT_FRAME or more: a black digit on white, to be inverted first. A colour picture
    (H, W, C) is checked for the first only: white-on-black is MNIST's convention, not a colour model's."""
    if a.size and a.min() == a.max():
        raise ImageError(f"{where} holds no digit: every pixel is {int(a.flat[0])} (a dark digit on a transparent "
                         f"background disappears over black: draw it white on black)", option)
    if a.ndim == 2 and min(a.shape) > 2:
        frame = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
        level = int(np.median(frame))
        if level >= LIGHT_FRAME:
            raise ImageError(f"{where} has a light background (its edge pixels' median grey level is {level}): the "
                             f"model takes a white digit on black, as in MNIST; invert the picture (255 - each pixel)",
                             option)
    return a


def _dark_picture(image, option: str = "image", channels: int = 1) -> np.ndarray:
    """picture(image) when its background is dark (check_dark_background, naming the file or `option`)."""
    where = str(image) if isinstance(image, (str, os.PathLike)) else option
    return check_dark_background(picture(image, option, channels=channels), where, option)


def editing_picture(image, size: tuple[int, int], option: str = "image", channels: int = 1) -> np.ndarray:
    """One editing input, a picture file or an array (picture), as every editing command and method takes it:
    (H', W') uint8 (channels 1) or (H', W', 3) (channels 3) resized to size (fit). Raises ImageError as `pictures`
    does, also for a light background."""
    return fit(_dark_picture(image, option, channels), size)


def _is_stack(image, channels: int) -> bool:
    """Whether a picture argument is a stack: 3 axes for grey pictures; for colour, 4 axes or a stack of grey
    pictures (3 axes, the last not `channels` long)."""
    if isinstance(image, (str, os.PathLike)):
        return False
    ndim = np.ndim(image)
    return ndim == 3 if channels == 1 else ndim == 4 or ndim == 3 and np.shape(image)[-1] != channels


def check_stack(stack: np.ndarray, option: str, size: tuple[int, int] | None, channels: int = 1) -> None:
    """From a stack's shape alone, before any of its pictures is read: OptionError naming `option` when it holds
    more pictures than one call makes results (arguments.MAX_COUNT), runtime.generate.OutOfMemory when its pictures
    as read, resized to `size` (None: their own) and stacked, and one result each would not fit in host memory
    (runtime.generate.ensure_memory, as `generate` refuses a count). stack: (N, H, W) or (N, H, W, C), any dtype (a
    broadcast view holds one picture's bytes for all N)."""
    from ..arguments import MAX_COUNT
    from .generate import ensure_memory

    count = len(stack)
    if count > MAX_COUNT:
        raise OptionError(f"{option} is a stack of {count} pictures, more than the {MAX_COUNT} results one call "
                          f"makes", option)
    read = math.prod(stack.shape[1:3]) * channels   # one picture as read, (H, W[, C]) uint8
    fitted_ = math.prod(size or stack.shape[1:3]) * channels
    per = read + 3 * fitted_   # as read, resized, stacked, and its result
    ensure_memory(count * per, f"a stack of {count} pictures ({option})", f"give fewer {option} pictures",
                  per_unit=per)


def pictures(image, n: int | None, option: str = "image", channels: int = 1,
             size: tuple[int, int] | None = None) -> tuple[list[np.ndarray], int]:
    """(pictures at their own size, n): one picture with n results (default 8), or a stack (N, H, W) (colour:
    (N, H, W, 3) too) with one result each (n None or N >= 1). Raises ImageError, also for a picture with a light
    background (check_dark_background), or OptionError naming `option` (an empty stack) or n; for a stack of more
    pictures than fit (check_stack; size: the size they are resized to), OptionError or OutOfMemory before any
    picture is read."""
    if not _is_stack(image, channels):
        return [_dark_picture(image, option, channels)], 8 if n is None else n
    try:
        stack = np.asarray(image)
    except (ValueError, TypeError) as e:   # a ragged nested list
        raise ImageError(f"{option} must be a picture file or {_form(channels)}, or a stack of them ({e})",
                         option) from None
    if len(stack) == 0:
        raise OptionError(f"{option} is an empty stack of pictures (shape {stack.shape}): give at least one", option)
    if channels == 1 and stack.ndim == 3 and stack.shape[-1] in (3, 4) and stack.shape[1] > stack.shape[-1]:
        # (H, W, 3) read as H pictures of W x 3 pixels: one colour picture given to a grey model, most likely
        raise ImageError(f"{option} of shape {stack.shape} is a stack of {stack.shape[0]} pictures of "
                         f"{stack.shape[1]}x{stack.shape[2]} pixels for this grey model: for one colour picture "
                         f"give its file, or its grey levels as an (H, W) array", option)
    if n not in (None, len(stack)):
        raise OptionError(f"a stack of {len(stack)} pictures gives one result each: n must be {len(stack)}, got {n}",
                          "n")
    check_stack(stack, option, size, channels)
    return [check_dark_background(picture(p, option, channels=channels), f"{option} {i}", option)
            for i, p in enumerate(stack)], len(stack)


def fitted(image, n: int | None, size: tuple[int, int], channels: int = 1) -> tuple[np.ndarray, int]:
    """(pictures (m, H', W') uint8, or (m, H', W', 3) for channels 3, resized to size, n): see pictures."""
    raw, n = pictures(image, n, channels=channels, size=size)
    return np.stack([fit(p, size) for p in raw]), n


def inpaint_inputs(image, mask, n: int | None, size: tuple[int, int],
                   channels: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """(pictures (m, H, W) uint8 (channels 3: (m, H, W, 3)), kept (m or 1, H, W) bool, n) at `size`, from inpaint's
    picture(s) and mask: the name of the half to redraw (HALVES), or picture(s) of the image's size (before
    resizing), read as grey (read_image: a coloured mask by its luma), whose white pixels (>= 128 after resizing)
    are kept. Raises ImageError / OptionError naming image, mask or n, also for a mask that keeps no pixel or every
    pixel."""
    from .edits import half_mask

    raw, n = pictures(image, n, channels=channels, size=size)   # at the file's size: a mask picture must match it
    images = np.stack([fit(p, size) for p in raw])
    if isinstance(mask, str) and mask in HALVES:
        if size[0] != size[1]:
            raise OptionError("half masks need a square image", "mask")
        return images, half_mask(mask, size[0])[None], n
    if isinstance(mask, str) and not Path(mask).suffix:
        raise OptionError(f"mask must be one of {', '.join(HALVES)} or a picture file, got {mask!r}", "mask")
    stack = not isinstance(mask, (str, os.PathLike)) and np.ndim(mask) == 3
    count = len(mask) if stack else 1   # from the shape, before any mask is read
    if count not in (1, len(raw)):
        raise OptionError(f"{count} masks for {len(raw)} pictures", "mask")
    def same_size(shape) -> None:
        if tuple(shape[:2]) != raw[0].shape[:2]:
            raise OptionError(f"the mask is {shape[1]}x{shape[0]} pixels and the image {raw[0].shape[1]}x"
                              f"{raw[0].shape[0]}: they must have the same size", "mask")

    if not isinstance(mask, (str, os.PathLike)) and np.ndim(mask) in (2, 3):
        same_size(np.shape(mask)[-2:])   # an array's size from its shape, before any of it is read
    masks = [picture(m, "mask", allow_bool=True) for m in (mask if stack else [mask])]
    for m in masks:
        same_size(m.shape)
    kept = np.stack([fit(m, size) >= 128 for m in masks])
    for k in kept:
        if not k.any():
            raise OptionError("the mask keeps no pixel: none is white (>= 128 when read as grey; a coloured mask is "
                              "read by its luma, so pure red is 76): white pixels are kept, black ones redrawn", "mask")
        if k.all():
            raise OptionError("the mask keeps every pixel, so there is nothing to redraw: black pixels are redrawn, "
                              "white ones kept", "mask")
    return images, kept, n


def grey_out(image: np.ndarray, kept: np.ndarray, level: int = 64) -> np.ndarray:
    """A picture (H, W) or (H, W, C) uint8 with the pixels not kept (kept: (H, W) bool) at grey `level`: inpainting's
    input as shown, the part to redraw greyed out."""
    k = kept if image.ndim == 2 else kept[..., None]
    return np.where(k, image, level).astype(np.uint8)


def enlarge(images: np.ndarray, f: int) -> np.ndarray:
    """Pictures (N, h, w) or (N, h, w, C) -> (N, h f, w f[, C]): every pixel repeated over an f x f block (nearest;
    upscaling's input as shown)."""
    return np.repeat(np.repeat(np.asarray(images), f, axis=1), f, axis=2)


# ------------------------------------------------------------------------------------------- the convention
# The channel counts a picture has: grey and RGB
PICTURE_CHANNELS = (1, 3)


class PictureChannels(DdpmError):
    """A model whose images are neither grey nor RGB (C not in PICTURE_CHANNELS): ddpm cannot write its pictures."""


def check_channels(image_shape: tuple[int, int, int], what: str) -> None:
    """Return when a model's images (C, H, W) are pictures ddpm writes, C = 1 (grey) or 3 (RGB); PictureChannels
    naming the shape and `what` (e.g. "sampling it") otherwise, raised before any work."""
    if image_shape[0] not in PICTURE_CHANNELS:
        raise PictureChannels(f"this model makes {_shape(image_shape)} images, and ddpm writes grey (1 channel) or "
                              f"RGB (3 channels) pictures only: {what} is refused")


class GreyOnly(DdpmError):
    """A model of more than one channel asked for what draws greyscale pictures only (the web page)."""


def require_grey(image_shape: tuple[int, int, int], what: str) -> None:
    """Return when a model's images (C, H, W) have one channel; GreyOnly naming the shape and `what` (e.g. "the web
    page") otherwise."""
    if image_shape[0] != 1:
        raise GreyOnly(f"this model makes {_shape(image_shape)} images, and {what} draws greyscale pictures only")


def _shape(image_shape) -> str:
    return "x".join(map(str, image_shape))


def picture_shape(image_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """One picture's shape for a model's images (C, H, W): (H, W) for C = 1, (H, W, C) otherwise."""
    C, H, W = image_shape
    return (H, W) if C == 1 else (H, W, C)


def to_uint8(x) -> np.ndarray:
    """A model's images -> pictures: (N, C, H, W) in [-1, 1] (torch or numpy) -> (N, H, W) uint8 for C = 1,
    (N, H, W, C) for more (channels last); (N, H, W) is taken as one channel. u = clip(rint((x + 1) 127.5), 0, 255)."""
    x = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else np.moveaxis(x, 1, -1)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model(images_u8: np.ndarray) -> np.ndarray:
    """uint8 levels (any shape; 0 black .. 255 white) -> float32 in [-1, 1], x = u / 127.5 - 1, element by element
    (to_uint8 inverts it exactly)."""
    return (np.asarray(images_u8, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def from_uint8(pictures: np.ndarray) -> np.ndarray:
    """Pictures -> a model's images, the inverse of to_uint8: (N, H, W) uint8 -> (N, 1, H, W) float32 in [-1, 1],
    (N, H, W, C) -> (N, C, H, W) (to_model's levels)."""
    a = to_model(pictures)
    return a[:, None] if a.ndim == 3 else np.ascontiguousarray(np.moveaxis(a, -1, 1))


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile pictures (N, H, W) or (N, H, W, C) uint8 into one (rows*(H+pad)+pad, cols*(W+pad)+pad[, C]) picture."""
    n, h, w = images.shape[:3]
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]), dtype=np.uint8)
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
    """Tile pictures (N, H, W) or (N, H, W, 3) uint8 (N <= MAX_GRID) into one picture, `scale` x nearest-neighbour,
    and write it atomically (PNG, or any format Pillow knows from the extension): greyscale (mode L) or RGB. One
    picture (N = 1) is written bare, at its own H x W. text: PNG text entries (e.g. the training step)."""
    from PIL import Image, PngImagePlugin

    from ..files import atomic_write

    check_grid(len(images))
    suffix = Path(path).suffix.lower()
    # .png needs the PNG plugin alone (imported above); another extension, the format that one of Pillow's plugins
    # registers for it, which loads all of them (about 45 ms of CPU)
    fmt = "PNG" if suffix == ".png" else Image.registered_extensions().get(suffix)
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
        self.x: list[np.ndarray] = []     # (m, H, W) or (m, H, W, C) uint8 per row (to_uint8)
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
