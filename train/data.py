"""MNIST from the four canonical IDX files (gzipped or not), with validation and an MD5-checked download."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ..errors import DdpmError
from ..schema import Array, Schema

# name -> MD5 of the *uncompressed* file (recompressed .gz copies differ in their own MD5, not in their content)
FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(DdpmError):
    """MNIST files missing, unreadable or corrupted; the message names the file."""


def default_data_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm/mnist, else ~/.cache/ddpm/mnist (locations.cache_dir)."""
    from ..locations import cache_dir

    return cache_dir("mnist")


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """--data DIR, else $DDPM_DATA, else ~/.cache/ddpm/mnist."""
    if data:
        return Path(data)
    if os.environ.get("DDPM_DATA"):
        return Path(os.environ["DDPM_DATA"])
    return default_data_dir()


FIX_HINT = ("delete it (ddpm train downloads it again when it is missing) or point --data (or $DDPM_DATA) at a "
            "folder with good copies of the four MNIST files")
# A split as load_mnist returns it: N images of 28x28 and N labels 0-9, both uint8 as in the IDX files
SPLIT = Schema("MNIST split", {"images": Array(("uint8",), ("N", 28, 28)), "labels": Array(("uint8",), ("N",), max=9)},
               hint=FIX_HINT.replace("delete it", "delete the damaged file", 1))


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); {FIX_HINT}") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file's bytes: magic 00 00 <type> <ndim>, ndim big-endian uint32 sizes, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    dtype, ndim = _DTYPES.get(data[2]), data[3]
    if dtype is None:
        raise DataError(f"{name}: unknown IDX element type 0x{data[2]:02x}")
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: IDX header truncated or has no dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    body = len(data) - 4 - 4 * ndim
    if body != expected:
        raise DataError(f"{name}: IDX header says {dims} ({expected} bytes) but the file holds {body} bytes "
                        f"({'truncated' if body < expected else 'trailing garbage'})")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(np.dtype(dtype).newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz); used for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def find_file(data_dir: Path, name: str) -> Path | None:
    for cand in (data_dir / name, data_dir / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (plain or .gz) as an array; DataError saying what to do when it is damaged."""
    path = Path(path)
    try:
        return parse_idx(_read_bytes(path), str(path))
    except DataError as e:
        if "; delete it" in str(e):
            raise
        raise DataError(f"{e}; {FIX_HINT}") from None


def _fetch(name: str, data_dir: Path) -> None:
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                raw = r.read()
            content = gzip.decompress(raw)
        except (urllib.error.URLError, OSError, EOFError, zlib.error) as e:
            errors.append(f"{url}: {e}")
            continue
        if hashlib.md5(content).hexdigest() != FILES[name]:
            errors.append(f"{url}: MD5 mismatch")
            continue
        from ..model.io import atomic_write

        atomic_write(data_dir / f"{name}.gz", lambda tmp: Path(tmp).write_bytes(raw))
        return
    raise DataError(f"could not download {name}.gz ({'; '.join(errors)})")


def ensure_mnist(data_dir: Path, download: bool = True, progress=print) -> Path:
    """Make sure the four files are in data_dir, downloading (and MD5-checking) missing ones if allowed."""
    missing = [n for n in FILES if find_file(data_dir, n) is None]
    if not missing:
        return data_dir
    hint = (f"MNIST files missing in {data_dir}: {', '.join(missing)} (plain or .gz). "
            f"Put them there, or point --data DIR (or $DDPM_DATA) at a folder that holds them")
    if not download:
        raise DataError(hint)
    try:
        for name in missing:
            progress(f"downloading {name}.gz into {data_dir}")
            _fetch(name, data_dir)
    except DataError as e:
        raise DataError(f"{hint}. Download failed: {e}") from None
    return data_dir


def load_mnist(data_dir: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels int64 (N,)) of a split, validated."""
    data_dir = Path(data_dir)
    img_name, lbl_name = SPLITS[split]
    paths = [find_file(data_dir, img_name), find_file(data_dir, lbl_name)]
    if None in paths:
        raise DataError(f"MNIST {split} files missing in {data_dir} ({img_name}, {lbl_name}); use --data DIR")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    SPLIT.check({"images": images, "labels": labels}, f"{paths[0]} and {paths[1].name}", DataError)
    return images, labels.astype(np.int64)


def to_model_range(images_u8):
    """uint8 [0, 255] -> float [-1, 1] (numpy or torch)."""
    return images_u8 / 127.5 - 1.0
