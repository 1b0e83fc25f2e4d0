"""Samples files: what `ddpm gen --out x.npz` writes and `ddpm eval --samples` reads (numpy only).

An .npz (a zip of .npy members, as numpy.savez_compressed writes) with

    images  (N, 28, 28) uint8   0 black .. 255 white, MNIST's convention
    labels  (N,)        int64   the class each sample was drawn for, -1 for unconditional samples

`save_samples` writes the images as they are generated, one batch at a time, so that any N fits in memory, and
atomically (files.atomic_write): a killed `ddpm gen` leaves the previous file, never a part. `read_samples` checks a
file against SAMPLES (schema.py) and raises SamplesError, one line that says what is wrong.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import DdpmError
from .files import atomic_write
from .schema import Array, Schema

NUM_CLASSES = 10
SAMPLES = Schema("samples file from `ddpm gen --out x.npz`", {
    "images": Array(("uint8",), ("N", 28, 28)),
    "labels": Array(("int",), ("N",), min=-1, max=NUM_CLASSES - 1),
}, hint="write one with `ddpm gen -n N --out x.npz`")


class SamplesError(DdpmError):
    """A samples file that is unreadable or not what `ddpm gen --out x.npz` writes."""


def read_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,28,28) uint8, labels (N,) int64) of a samples file, checked against SAMPLES. Raises SamplesError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        obj = np.load(path, allow_pickle=False) if magic.startswith((b"PK", b"\x93NUMPY")) else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SamplesError(f"{path}: not a samples file (numpy cannot read it: {e}); {SAMPLES.hint}") from None
    if obj is None:
        raise SamplesError(f"{path}: not a samples file (not even an .npz, a zip of .npy arrays); {SAMPLES.hint}")
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise SamplesError(f"{path}: not a samples file (a single .npy array, not images and labels); "
                           f"{SAMPLES.hint}")
    try:
        with obj:
            data = {k: obj[k] for k in SAMPLES.fields if k in obj.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SamplesError(f"{path}: not a samples file (damaged: {e}); {SAMPLES.hint}") from None
    SAMPLES.check(data, path, SamplesError)
    return data["images"], data["labels"].astype(np.int64)


def _npy_member(zf: zipfile.ZipFile, name: str, dtype, shape: tuple[int, ...]):
    """An open zip member with the .npy header of an array of `shape` and `dtype`; the caller writes the data."""
    f = zf.open(f"{name}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return f


def save_samples(path: str | os.PathLike, labels, batches: Iterable[np.ndarray],
                 image_shape: tuple[int, int] = (28, 28), n: int | None = None) -> None:
    """Write a samples file from the labels and the images as batches of (b, H, W) uint8 (N in all), holding one
    batch at a time. labels: (N,) ints, or a function (lo, hi) -> the labels of samples lo..hi-1 with `n` = N (then
    nothing of size N is held). Atomic: whatever stops it (an error in `batches`, Ctrl-C, a full disk), the previous
    file stays. Raises ValueError when the batches do not add up to N images of that shape."""
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
            count = 0
            with _npy_member(zf, "images", np.uint8, (n, *image_shape)) as f:
                for part in batches:
                    part = np.ascontiguousarray(part, dtype=np.uint8)
                    if part.shape[1:] != tuple(image_shape) or count + len(part) > n:
                        raise ValueError(f"batch of shape {part.shape} does not fit {n} images of {image_shape}")
                    f.write(part.tobytes())
                    count += len(part)
            if count != n:
                raise ValueError(f"{count} images for {n} labels")

    atomic_write(path, write)
