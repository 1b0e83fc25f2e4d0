"""Samples files: what `ddpm gen --out x.npz` writes and `ddpm eval --samples` reads (numpy only).

An .npz (a zip of .npy members, as numpy.savez_compressed writes) with

    images  (N, H, W) uint8   0 black .. 255 white, MNIST's convention; H x W the model's image size (28 x 28 for
                              MNIST); (N, H, W, 3) uint8 RGB for a colour model (runtime.images' convention)
    labels  (N,)      int64   the class each sample was drawn for, -1 for unconditional samples

`save_samples` writes the images as they are generated, one batch at a time, so that any N fits in memory, and
atomically (files.atomic_write): a killed `ddpm gen` leaves the previous file, never a part. `read_samples` checks a
file against SAMPLES (schema.py) and raises SamplesError, one line that says what is wrong. `check_room` refuses,
before anything is generated, a file that cannot fit the free space.
"""

from __future__ import annotations

import itertools
import math
import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import DdpmError, brief, clip
from .files import atomic_write, input_path, real_path
from .schema import Array, Schema, repeated

NUM_CLASSES = 10
SAMPLES = Schema("samples file from `ddpm gen --out x.npz`", {
    "images": Array(("uint8",), ("N", "H", "W")),
    "labels": Array(("int",), ("N",), min=-1, max=NUM_CLASSES - 1),
}, hint="write one with `ddpm gen -n N --out x.npz`")
# the same file of a colour model: RGB pictures, channels last
COLOUR_SAMPLES = Schema(SAMPLES.what, {**SAMPLES.fields, "images": Array(("uint8",), ("N", "H", "W", 3))},
                        hint=SAMPLES.hint)


SCHEMAS = {3: SAMPLES, 4: COLOUR_SAMPLES}   # by the images' number of axes


def _schema(images, schemas=SCHEMAS) -> Schema:
    """SAMPLES, or COLOUR_SAMPLES for images (declared or read) of four axes."""
    return schemas[4 if images is not None and len(images.shape) == 4 else 3]


class SamplesError(DdpmError):
    """A samples file that is unreadable or not what `ddpm gen --out x.npz` writes."""


# The most a samples file may hold: 4 GiB of images (5 million digits; `ddpm eval` compares 10,000)
MAX_SAMPLES_BYTES = 4 << 30


class _Declared:
    """What an .npy member's header declares (dtype, shape, whether in Fortran order), checked against the schema
    before its data is read."""

    def __init__(self, dtype, shape, fortran=False):
        self.dtype, self.shape, self.fortran = dtype, shape, fortran


_DECLARED = {axes: Schema(s.what, {k: Array(v.dtypes, v.shape) for k, v in s.fields.items()}, hint=s.hint)
             for axes, s in SCHEMAS.items()}


def _declared(zf: zipfile.ZipFile, name: str) -> tuple[_Declared, int]:
    """(declared dtype and shape, header length) of the member NAME.npy, read from its header alone."""
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{name} is a .npy of version {version[0]}.{version[1]}, not 1.0 or 2.0")
        shape, fortran, dtype = read(f, max_header_size=10000)
        if dtype.hasobject:
            raise ValueError(f"{name} is an object array")
        return _Declared(dtype, shape, fortran), f.tell()


def read_samples(path: str | os.PathLike,
                 image_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,H,W) or (N,H,W,3) uint8, labels (N,) int64) of a samples file, checked against SAMPLES (or
    COLOUR_SAMPLES for pictures of three channels). Raises SamplesError.

    Every member's header (dtype, shape) is checked against the schema, against `image_shape` ((H, W) or (H, W, 3)
    the reader takes, e.g. the evaluator's (28, 28); None: any), and the bytes it implies against the size the zip
    declares for the member and against MAX_SAMPLES_BYTES, before any data is inflated or allocated."""
    path = input_path(path, SamplesError, f"; {SAMPLES.hint}")   # a file: not a folder, a pipe, a dead link
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise SamplesError(f"{path}: not a samples file (cannot read it: {clip(e)}); {SAMPLES.hint}") from None
    if magic.startswith(b"\x93NUMPY"):
        raise SamplesError(f"{path}: not a samples file (a single .npy array, not images and labels); "
                           f"{SAMPLES.hint}")
    if not magic.startswith(b"PK"):
        raise SamplesError(f"{path}: not a samples file (not even an .npz, a zip of .npy arrays); {SAMPLES.hint}")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SamplesError(f"{path}: not a samples file (numpy cannot read it: {clip(e)}); {SAMPLES.hint}") from None
    try:
        with zf:
            twice = repeated(zf.namelist())
            if twice is not None:
                raise SamplesError(f"{path}: not a samples file (it holds two members named {brief(twice)}, which "
                                   f"zip readers pick differently); {SAMPLES.hint}")
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            declared, total = {}, 0
            for k in SAMPLES.fields:
                if k in names:
                    declared[k], header = _declared(zf, k)
                    need = header + math.prod(declared[k].shape) * declared[k].dtype.itemsize
                    if need != zf.getinfo(f"{k}.npy").file_size:
                        raise ValueError(f"{k} declares {brief(declared[k].shape)} but its member holds "
                                         f"{zf.getinfo(f'{k}.npy').file_size - header} bytes of data")
                    total += need
            _schema(declared.get("images"), _DECLARED).check(declared, path, SamplesError)
            if image_shape is not None and tuple(declared["images"].shape[1:]) != tuple(image_shape):
                raise SamplesError(f"{path}: images of shape {brief(tuple(declared['images'].shape))}, but "
                                   f"(N, {', '.join(map(str, image_shape))}) are read here; {SAMPLES.hint}")
            if total > MAX_SAMPLES_BYTES:
                raise SamplesError(f"{path}: holds {total >> 20} MiB of samples, more than the "
                                   f"{MAX_SAMPLES_BYTES >> 20} MiB read here; {SAMPLES.hint}")
            from .runtime.generate import ensure_memory

            copies = sum(math.prod(d.shape) * d.dtype.itemsize for d in declared.values() if d.fortran)  # C copies
            try:
                ensure_memory(total + copies, f"reading {path}", "evaluate fewer samples (`ddpm gen -n`)")
            except DdpmError as e:
                raise SamplesError(str(e)) from None
            data = {}
            for k in declared:
                with zf.open(f"{k}.npy") as f:
                    data[k] = np.ascontiguousarray(np.lib.format.read_array(f, allow_pickle=False))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
        raise SamplesError(f"{path}: not a samples file (damaged: {clip(e)}); {SAMPLES.hint}") from None
    _schema(data.get("images")).check(data, path, SamplesError)
    return data["images"], data["labels"].astype(np.int64)


def _npy_member(zf: zipfile.ZipFile, name: str, dtype, shape: tuple[int, ...]):
    """An open zip member with the .npy header of an array of `shape` and `dtype`; the caller writes the data."""
    f = zf.open(f"{name}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return f


def save_samples(path: str | os.PathLike, labels, batches: Iterable[np.ndarray],
                 image_shape: tuple[int, ...] | None = None, n: int | None = None) -> None:
    """Write a samples file from the labels and the pictures as batches of (b, H, W) or (b, H, W, 3) uint8 (N in
    all), holding one batch at a time. labels: (N,) ints, or a function (lo, hi) -> the labels of samples lo..hi-1
    with `n` = N (then nothing of size N is held). image_shape: (H, W) or (H, W, 3), by default the first batch's.
    Atomic: whatever stops it (an error in `batches`, Ctrl-C, a full disk), the previous file stays. Raises
    ValueError when the batches do not add up to N images of one shape."""
    if callable(labels):
        get = labels
    else:
        arr = np.asarray(labels, dtype=np.int64)
        n, get = len(arr), lambda lo, hi: arr[lo:hi]

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            with _npy_member(zf, "labels", np.int64, (n,)) as f:
                for lo in range(0, n, 1 << 20):
                    f.write(np.ascontiguousarray(get(lo, min(n, lo + (1 << 20))), dtype=np.int64).tobytes())
            count, parts = 0, iter(batches)
            first = next(parts, None)
            shape = tuple(image_shape) if image_shape is not None else \
                np.shape(first)[1:] if first is not None else (0, 0)
            with _npy_member(zf, "images", np.uint8, (n, *shape)) as f:
                for part in itertools.chain([] if first is None else [first], parts):
                    part = np.ascontiguousarray(part, dtype=np.uint8)
                    if part.shape[1:] != shape or count + len(part) > n:
                        raise ValueError(f"batch of shape {part.shape} does not fit {n} images of {shape}")
                    f.write(part.tobytes())
                    count += len(part)
            if count != n:
                raise ValueError(f"{count} images for {n} labels")

    atomic_write(path, write)


# DEFLATE (an .npz's compression) codes at most 258 bytes in one match of at least 2 bits: nothing shrinks more
DEFLATE_MAX_RATIO = 1032


def check_room(out: str, num: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse (OutputError, one line naming `ddpm gen`'s -n) an .npz at `out` of `num` images of image_shape
    (C, H, W) that cannot fit the free space of the folder its temporary is written in (shutil.disk_usage), before
    anything is made: its members (labels int64, images uint8) compressed as much as DEFLATE can compress anything
    (DEFLATE_MAX_RATIO), a bound that never refuses a file that would fit. A file system that does not say: no
    check."""
    import shutil

    from .files import OutputError
    from .runtime.generate import gib

    folder = Path(real_path(out)).parent
    while not folder.is_dir() and folder != folder.parent:   # missing folders are created when written
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    per_image = 8 + math.prod(image_shape)
    least = num * per_image // DEFLATE_MAX_RATIO
    if least > free:
        fit = free * DEFLATE_MAX_RATIO // per_image
        raise OutputError(f"-n {num} digits make an .npz of at least {gib(least)} (compressed), more than the "
                          f"{gib(free)} free in {folder}; lower -n (at most {fit} could fit)")
