"""MNIST from the four canonical IDX files (gzipped or not), with validation and an MD5-checked download.

Every file read is recognised by the MD5 of its decompressed content (FILES; cached in ~/.cache/ddpm/mnist-checks.json
by path, size, mtime_ns, inode and ctime_ns, so a file is hashed once): MNIST's files in each other's places (train and test
swapped) are refused, other IDX data is used with a one-line notice. An IDX header's sizes are checked against the
file and MAX_IDX_BYTES before anything is decompressed, and nothing beyond what it declares is ever inflated.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import re
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ..errors import DdpmError, brief, clip
from ..locations import in_the_way
from ..schema import Array, Schema, json_loads

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


MAX_IDX_DIMS = 16   # an IDX header may declare up to 255; numpy arrays have at most 64 (32 before numpy 2)
# The largest IDX file read: MNIST's largest is 47 MB (train images); a header that declares more is refused before
# anything is decompressed or allocated.
MAX_IDX_BYTES = 2 << 30
_GZIP_MAGIC = b"\x1f\x8b"


class _Stream:
    """The decompressed bytes of an IDX file (plain or gzip, also several concatenated gzip members), read on
    demand: read(n) never produces more than n bytes, so a small file that inflates to gigabytes costs nothing
    beyond what is asked for. The MD5 of everything read is kept (`md5`)."""

    def __init__(self, f, name: str, hash: bool = True):
        self.f, self.name, self.md5 = f, name, hashlib.md5() if hash else None
        self.gzip = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        self.z = zlib.decompressobj(wbits=31) if self.gzip else None
        self.tail = b""   # compressed input read from the file and not yet consumed

    def size(self) -> int | None:
        """The total length for a plain file (its length on disk); None for gzip (known only once inflated)."""
        if self.gzip:
            return None
        pos = self.f.tell()
        end = self.f.seek(0, os.SEEK_END)
        self.f.seek(pos)
        return end

    def readinto(self, buf) -> int:
        """Fill `buf` (a writable buffer, e.g. a numpy array's memory) with the next bytes, in place: no copy of the
        whole is ever made. The number of bytes put there; fewer than len(buf) only at the end of the data."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            if self.gzip:
                part = self.read(min(len(view) - done, 1 << 20))
                view[done:done + len(part)] = part
                k = len(part)
            else:
                k = self.f.readinto(view[done:])
                self._hash(view[done:done + k])
            if not k:
                break
            done += k
        return done

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the data. DataError for a damaged or truncated gzip stream."""
        if not self.gzip:
            out = self.f.read(n)
            self._hash(out)
            return out
        out = bytearray()
        try:
            while len(out) < n:
                if self.z.eof:   # a gzip member ended: another may follow (as gzip.decompress reads them all)
                    rest = self.z.unused_data or self.f.read(1 << 16)
                    rest = rest.lstrip(b"\x00")   # zero padding between members, as gzip allows
                    while not rest:
                        more = self.f.read(1 << 16)
                        if not more:
                            self._hash(out)
                            return bytes(out)
                        rest = more.lstrip(b"\x00")
                    self.z, self.tail = zlib.decompressobj(wbits=31), rest
                if not self.tail:
                    self.tail = self.f.read(1 << 16)
                    if not self.tail:
                        raise DataError(f"{self.name}: cannot read (the compressed data stops before its end: "
                                        f"truncated)")
                out += self.z.decompress(self.tail, n - len(out))
                self.tail = self.z.unconsumed_tail
        except zlib.error as e:
            raise DataError(f"{self.name}: cannot read ({clip(e)})") from None
        self._hash(out)
        return bytes(out)

    def _hash(self, data) -> None:
        if self.md5 is not None:
            self.md5.update(data)


def _parse_header(s: _Stream, name: str, limit: int = MAX_IDX_BYTES) -> tuple[np.dtype, tuple[int, ...], int, str]:
    """(element dtype, dims, data bytes, a text that says what the header declares) of an IDX stream, read from its
    header alone; the declared size checked against `limit` and, for a plain file, against the file's length."""
    head = s.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    dtype, ndim = _DTYPES.get(head[2]), head[3]
    if dtype is None:
        raise DataError(f"{name}: unknown IDX element type 0x{head[2]:02x}")
    sizes = s.read(4 * ndim)
    if ndim == 0 or len(sizes) < 4 * ndim:
        raise DataError(f"{name}: IDX header truncated or has no dimensions")
    if ndim > MAX_IDX_DIMS:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions, more than the {MAX_IDX_DIMS} an IDX file "
                        f"may have here (MNIST's have 1 or 3)")
    dims = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
    expected = math.prod(dims) * np.dtype(dtype).itemsize
    header = 4 + 4 * ndim
    # bounded: a header may declare 255 sizes of up to 2^32-1 each
    said = f"IDX header says {brief(dims)} ({expected if expected < 1 << 64 else 'more than 2^64'} bytes)"
    total = s.size()
    if total is not None and total - header != expected:
        body = total - header
        raise DataError(f"{name}: {said} but the file holds {body} bytes "
                        f"({'truncated' if body < expected else 'trailing garbage'})")
    if expected > limit:
        raise DataError(f"{name}: {said}, more than the {limit >> 20} MiB an IDX file may hold here")
    return np.dtype(dtype), dims, expected, said


def _parse_stream(s: _Stream, name: str, limit: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file from a stream: the header first (`_parse_header`), then exactly the data it declares, read
    into the array's own memory (held once: no copy of it is made), and nothing after it."""
    dtype, dims, expected, said = _parse_header(s, name, limit)
    array = np.empty(dims, dtype=dtype.newbyteorder("="))
    got = s.readinto(array.view(np.uint8).reshape(-1)) if expected else 0
    if got < expected:
        raise DataError(f"{name}: {said} but the file holds {got} bytes (truncated)")
    if s.read(1):
        raise DataError(f"{name}: {said} but the file holds more (trailing garbage)")
    if dtype.byteorder == ">":
        array.byteswap(inplace=True)   # IDX is big-endian: the bytes as read are the file's order
    return array


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file's bytes: magic 00 00 <type> <ndim>, ndim big-endian uint32 sizes, then the data."""
    return _parse_stream(_Stream(io.BytesIO(bytes(data)), name), name)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz); used for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def find_file(data_dir: Path, name: str) -> Path | None:
    """The file of MNIST's `name` in data_dir: NAME (uncompressed) when it exists, else NAME.gz, else None.
    DataError when something other than a file stands at one of those names (a folder, a pipe, a dangling link:
    files.input_path says what), rather than calling the file missing and downloading over it."""
    from ..files import input_path

    for cand in (data_dir / name, data_dir / f"{name}.gz"):
        if cand.is_file():
            return cand
        if os.path.lexists(cand):
            input_path(cand, DataError, f"; {FIX_HINT}")   # raises: it is not a file
    return None


def _read(path: Path, limit: int = MAX_IDX_BYTES, hash: bool = True) -> tuple[np.ndarray, str | None]:
    """(array, MD5 of the decompressed content or None when not `hash`) of an IDX file; DataError saying what to do
    when it is damaged."""
    with _reading(path), open(path, "rb") as f:
        s = _Stream(f, str(path), hash)
        array = _parse_stream(s, str(path), limit)
    return array, s.md5 and s.md5.hexdigest()


@contextlib.contextmanager
def _reading(path: Path):
    """An OSError or a DataError while reading the IDX file `path` as one DataError that ends with what to do about
    a damaged file (FIX_HINT): the checks below say what is wrong, this says what to do, once."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{path}: cannot read ({clip(e)}); {FIX_HINT}") from None
    except DataError as e:
        raise DataError(f"{e}; {FIX_HINT}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (plain or .gz) as an array; DataError saying what to do when it is damaged (also when its header
    declares more than MAX_IDX_BYTES: nothing is decompressed beyond what the header declares)."""
    return _read(Path(path))[0]


# Which file of MNIST a content is, by the MD5 of its decompressed bytes
KNOWN = {md5: name for name, md5 in FILES.items()}
ROLES = {"train-images-idx3-ubyte": "training images", "train-labels-idx1-ubyte": "training labels",
         "t10k-images-idx3-ubyte": "test images", "t10k-labels-idx1-ubyte": "test labels"}
CHECKS_FILE = "mnist-checks.json"   # in the cache folder: path -> the file's identity (IDENTITY) and its MD5 then
# What a record's file must still have for its MD5 to be trusted: the size and mtime_ns a copy can keep (cp -p,
# rsync -t, tar, os.utime) and the inode and ctime_ns it cannot (every write or utime sets ctime to now); a record
# without one of these (an older cache's) is a miss
IDENTITY = ("size", "mtime_ns", "ino", "ctime_ns")
_noticed: set = set()               # the notices given in this process (each said once)


def _checks_path() -> Path:
    return default_data_dir().parent / CHECKS_FILE


MAX_CHECKS_BYTES = 1 << 20   # CHECKS_FILE's size at most (a record is ~200 bytes; the cache holds a few per folder)


def _read_checks() -> dict:
    """The records of CHECKS_FILE, or {} when it is missing or is not what `_remember_md5` writes: not a regular
    file (a pipe, a device, a link to one: files.input_path refuses it without opening it), larger than
    MAX_CHECKS_BYTES, not JSON (also JSON nested too deeply to decode), not an object. A cache: a bad one is ignored
    and the MD5s recomputed, never waited on or read without bound."""
    from ..files import input_path

    try:
        where = input_path(_checks_path(), DataError)
        with open(where, "rb") as f:
            text = f.read(MAX_CHECKS_BYTES + 1)
        if len(text) > MAX_CHECKS_BYTES:
            return {}
        recs = json_loads(text)
    except (DdpmError, OSError, ValueError, RecursionError):
        return {}
    return recs if isinstance(recs, dict) else {}


def _identity(st: os.stat_result) -> dict:
    """The IDENTITY fields of a file's stat, as a record holds them."""
    return {name: getattr(st, f"st_{name}") for name in IDENTITY}


def _cached_md5(path: Path, st: os.stat_result) -> str | None:
    """The MD5 recorded for this file when its IDENTITY (size, mtime_ns, inode, ctime_ns) is still what it was,
    else None (also for a record that lacks one of them)."""
    rec = _read_checks().get(str(path.resolve()))
    if isinstance(rec, dict) and all(type(rec.get(k)) is int and rec[k] == v for k, v in _identity(st).items()) \
            and isinstance(rec.get("md5"), str):
        return rec["md5"]
    return None


def _remember_md5(path: Path, st: os.stat_result, md5: str) -> None:
    """Record a file's MD5 under its IDENTITY (atomically; a cache that cannot be written is skipped)."""
    import json

    from ..files import atomic_write

    where = _checks_path()
    recs = _read_checks()
    recs[str(path.resolve())] = {**_identity(st), "md5": md5}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(where, lambda tmp: Path(tmp).write_text(json.dumps(recs, indent=0) + "\n"))
    except (OSError, DdpmError):
        pass


def _notice(msg: str) -> None:
    """One line on stderr, once per process."""
    if msg not in _noticed:
        _noticed.add(msg)
        print(f"note: {msg}", file=sys.stderr)


def _read_checked(path: Path, name: str) -> tuple[np.ndarray, str | None]:
    """(array, the MNIST file its content is, or None for other data) of the file that should be MNIST's `name`.
    The content's MD5 is taken while reading and cached by path and IDENTITY in CHECKS_FILE."""
    st = path.stat()
    md5 = _cached_md5(path, st)
    array, found = _read(path, hash=md5 is None)
    if md5 is None:
        md5 = found
        _remember_md5(path, st, md5)
    return array, KNOWN.get(md5)


_MNIST_MAX_BYTES = 60_000 * 28 * 28   # the data of MNIST's largest file, the training images


class _Declared:
    """What an IDX header declares (dtype, shape): checked against SPLIT's dtypes and shapes before the data is read."""

    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, shape


_DECLARED_SPLIT = Schema(SPLIT.what, {k: Array(v.dtypes, v.shape) for k, v in SPLIT.fields.items()}, hint=SPLIT.hint)


def _declared(path: Path) -> _Declared:
    """The dtype and shape the IDX file at `path` declares, from its header alone (nothing is inflated beyond it);
    DataError, as `_read` says it, when the header is damaged."""
    with _reading(path), open(path, "rb") as f:
        dtype, dims, _, _ = _parse_header(_Stream(f, str(path), hash=False), str(path))
    return _Declared(dtype, dims)


def _check_roles(split: str, paths: list[Path], names: tuple[str, str], found: list[str | None]) -> None:
    """Refuse MNIST files in the wrong place (train and test swapped, images and labels mixed up); a notice for
    data that is not MNIST's (another IDX dataset given on purpose)."""
    for path, want, got in zip(paths, names, found):
        if got is not None and got != want:
            swapped = got[:5] != want[:5]
            raise DataError(f"{path} holds MNIST's {ROLES[got]} ({got}), not its {ROLES[want]}: "
                            + ("the train and test files are swapped, or one is a copy of the other" if swapped
                               else "the files are mixed up")
                            + "; rename them to what they hold, or point --data (or $DDPM_DATA) at a folder with "
                              "MNIST's own files")
    other = [p.name for p, got in zip(paths, found) if got is None]
    if other:
        one = len(other) == 1
        _notice(f"{paths[0].parent}: {' and '.join(other)} {'is' if one else 'are'} not MNIST's own {split} "
                f"file{'' if one else 's'} (unknown MD5); using {'it' if one else 'them'} as given")


_MAX_DOWNLOAD = 64 << 20   # bytes read from a mirror (MNIST's largest .gz is 9.9 MB)


def _fetch(name: str, data_dir: Path) -> None:
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                raw = r.read(_MAX_DOWNLOAD + 1)
            if len(raw) > _MAX_DOWNLOAD:
                raise OSError(f"more than {_MAX_DOWNLOAD >> 20} MiB")
            content = _Stream(io.BytesIO(raw), url)
            content.read(_MAX_DOWNLOAD)   # the largest MNIST file inflates to 47 MB: enough to tell it apart
        except (urllib.error.URLError, OSError, DataError) as e:
            errors.append(f"{url}: {e}")
            continue
        if content.md5.hexdigest() != FILES[name]:
            errors.append(f"{url}: MD5 mismatch")
            continue
        from ..model.io import atomic_write

        atomic_write(data_dir / f"{name}.gz", lambda tmp: Path(tmp).write_bytes(raw))
        return
    raise DataError(f"could not download {name}.gz ({'; '.join(errors)})")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")   # scheme:/ (two letters at least: not a Windows drive)


def check_data_dir(data_dir: str | os.PathLike) -> None:
    """DataError (one line) when `data_dir` cannot be a folder of MNIST files, before anything is looked for in it
    or downloaded into it: a URL (--data takes a folder on this machine), a file or a device (/dev/null), a
    symbolic link to nothing or a loop of them on its path (locations.in_the_way). A folder that does not exist yet
    passes: the download creates it."""
    text = os.fspath(data_dir)
    if _URL.match(text) and not os.path.lexists(text):
        raise DataError(f"the MNIST folder {text} is a URL, not a folder: point --data (or $DDPM_DATA) at a folder on "
                        f"this machine, or leave both out to download MNIST into the cache folder")
    why = in_the_way(data_dir)
    if why is not None:
        raise DataError(f"the MNIST folder {text} cannot be used: {why}; point --data (or $DDPM_DATA) at a folder")


def ensure_mnist(data_dir: Path, download: bool = True, progress=print, splits=("train", "test")) -> Path:
    """Make sure the files of `splits` (default both, the four files) are in data_dir, downloading (and
    MD5-checking) missing ones if allowed, once it is known that they can be written there. Raises DataError naming
    what is missing, or why data_dir cannot hold them (check_data_dir; a folder where files cannot be created)."""
    check_data_dir(data_dir)
    missing = [n for split in splits for n in SPLITS[split] if find_file(data_dir, n) is None]
    if not missing:
        return data_dir
    hint = (f"MNIST files missing in {data_dir}: {', '.join(missing)} (plain or .gz). "
            f"Put them there, or point --data DIR (or $DDPM_DATA) at a folder that holds them")
    if not download:
        raise DataError(hint)
    from ..files import OutputError, check_writable

    try:
        check_writable(data_dir, folder=True)
    except OutputError as e:
        raise DataError(f"{hint}; they cannot be downloaded there ({e})") from None
    try:
        for name in missing:
            progress(f"downloading {name}.gz into {data_dir}")
            _fetch(name, data_dir)
    except DataError as e:
        raise DataError(f"{hint}. Download failed: {e}") from None
    return data_dir


def load_mnist(data_dir: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels int64 (N,)) of a split, validated.

    Every file's content is identified by its MD5 (cached by path, size, mtime_ns, inode and ctime_ns in the cache
    folder's CHECKS_FILE, so a file is hashed once): MNIST's files in the wrong place (train and test swapped) raise DataError;
    other IDX data is used with a one-line notice on stderr, as is the choice of NAME over NAME.gz when both exist."""
    data_dir = Path(data_dir)
    check_data_dir(data_dir)
    names = SPLITS[split]
    paths = [find_file(data_dir, n) for n in names]
    if None in paths:
        raise DataError(f"MNIST {split} files missing in {data_dir} ({names[0]}, {names[1]}); use --data DIR")
    for n, p in zip(names, paths):
        if p.name == n and (data_dir / f"{n}.gz").is_file():
            _notice(f"{data_dir} holds both {n} and {n}.gz; using {n}")
    declared = [_declared(p) for p in paths]
    try:   # the headers agree: checked before any data is read
        _DECLARED_SPLIT.check(dict(zip(("images", "labels"), declared)), f"{paths[0]} and {paths[1].name}", DataError)
    except DataError:
        # MNIST's own file in the wrong place (test labels beside training images) says so better: those files that
        # declare no more than MNIST's largest are read, by content, to tell
        for p, n, d in zip(paths, names, declared):
            if math.prod(d.shape) * d.dtype.itemsize <= _MNIST_MAX_BYTES:
                found = _read_checked(p, n)[1]
                if found is not None:
                    _check_roles(split, [p], (n,), [found])
        raise
    (images, img_is), (labels, lbl_is) = (_read_checked(p, n) for p, n in zip(paths, names))
    _check_roles(split, paths, names, [img_is, lbl_is])
    SPLIT.check({"images": images, "labels": labels}, f"{paths[0]} and {paths[1].name}", DataError)
    return images, labels.astype(np.int64)


def to_model_range(images_u8):
    """uint8 [0, 255] -> float [-1, 1] (numpy or torch)."""
    return images_u8 / 127.5 - 1.0
