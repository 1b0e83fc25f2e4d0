"""Declarative checks of what a loader reads: required entries, their types, shapes and dtypes, one table per format.

    SAMPLES = Schema("samples file from `ddpm gen --out x.npz`", {
        "images": Array(("uint8",), ("N", 28, 28)),
        "labels": Array(("int",), ("N",), min=-1),
    })
    SAMPLES.check(npz, where="a.npz", error=SamplesError)  # raises SamplesError("a.npz: labels has shape (7,), ...")

A named dimension ("N", "T") must be the same wherever it appears: the first entry that fixes it wins, and the
message of a later mismatch says where the value came from (`Int(dim="T")` fixes one from an integer entry; `dims=`
fixes some in advance). The first problem found raises `error(message)`, one line that names the file, the entry,
what was expected and what was found, followed by the schema's hint (what to do). numpy only; torch tensors are
checked by duck typing (dtype, shape) without importing torch unless one is given.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any as AnyT, Callable, Iterator, Mapping

import numpy as np

from .errors import brief


def repeated(names) -> str | None:
    """The first name that occurs twice in `names` (e.g. an archive's member names), None if none does. A zip may
    hold two members of one name: numpy and zipfile read the last, other readers (unzip, browsers) the first, so
    the same file would show different contents to each; the readers of archives refuse it."""
    seen = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


class DuplicateKey(ValueError):
    """A JSON object holding one key twice (json_loads)."""


def _unique_keys(pairs: list) -> dict:
    twice = repeated(k for k, _ in pairs)
    if twice is not None:
        raise DuplicateKey(f"the key {brief(twice)} appears twice in one JSON object")
    return dict(pairs)


# The most digits an integer read from JSON may have: more than a float's range (309 digits; Num names that) and
# any entry's bound. Python's own limit (4300) raises a ValueError that tells the user to call
# sys.set_int_max_str_digits.
MAX_JSON_DIGITS = 1000


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_JSON_DIGITS} are read)")
    return int(digits)


def json_loads(text: str | bytes):
    """json.loads for what a file holds: an object that holds one key twice raises DuplicateKey (a ValueError, as
    json's own errors are). Python keeps the last value, other readers (browsers, Rust's serde) may keep the first
    or refuse, so the same file would mean different things to each; the readers refuse it, as they refuse an
    archive holding one member name twice (repeated). RecursionError for nesting deeper than the decoder goes; a
    ValueError for an integer of more than MAX_JSON_DIGITS digits."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)


class Invalid(Exception):
    """One entry does not fit its spec (internal; Schema.check turns it into the caller's error type)."""


def _describe(v) -> str:
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return f"{_dtype_name(v)} of shape {brief(tuple(v.shape))}"
    if isinstance(v, str):
        return brief(v, 40)
    if isinstance(v, (bool, int, float)) or v is None:
        return brief(v)
    return f"a {type(v).__name__}"


def _dtype_name(v) -> str:
    """numpy's name of the dtype ("int64" for '<i8' and '>i8' alike: byte order is not part of the type), or
    torch's without its module prefix."""
    return v.dtype.name if isinstance(v.dtype, np.dtype) else str(v.dtype).replace("torch.", "")


def is_bool(v) -> bool:
    """Whether `v` is a boolean (Python's or numpy's). Python's bool is an int (True == 1), so every check of an
    integer or a number here asks this first: `"version": true` is not version 1."""
    return isinstance(v, (bool, np.bool_))


def _kind(name: str) -> str:
    if name.startswith(("int", "uint")):
        return "int"
    if name.startswith(("float", "bfloat", "half")):
        return "float"
    return name


class Spec:
    what = "a value"

    def check(self, v, dims: dict, path: str) -> None:
        raise NotImplementedError

    def fail(self, v, path: str, why: str | None = None):
        raise Invalid(f"{path} must be {self.what}, got {_describe(v)}" + (f" ({why})" if why else ""))


class Any(Spec):
    def check(self, v, dims, path):
        pass


class Opt(Spec):
    """None, or a value of `inner`."""

    def __init__(self, inner: Spec):
        self.inner, self.what = inner, f"None or {inner.what}"

    def check(self, v, dims, path):
        if v is not None:
            self.inner.check(v, dims, path)


class Const(Spec):
    """Exactly this value, of its kind: a bool matches only a bool (True is not 1) and a float never an integer
    (1.0 is not 1), as Int refuses a float."""

    def __init__(self, value):
        self.value, self.what = value, repr(value)

    def check(self, v, dims, path):
        if is_bool(v) != is_bool(self.value) or v != self.value or \
                isinstance(v, (float, np.floating)) != isinstance(self.value, (float, np.floating)):
            self.fail(v, path)


class Bool(Spec):
    what = "true or false"

    def check(self, v, dims, path):
        if not is_bool(v):
            self.fail(v, path)


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    return f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""


class Int(Spec):
    """An integer (not a bool) in [min, max]; dim: the name of the dimension it fixes."""

    def __init__(self, min: int | None = None, max: int | None = None, dim: str | None = None):
        self.min, self.max, self.dim = min, max, dim
        self.what = "an integer" + _bounds(min, max)

    def check(self, v, dims, path):
        if is_bool(v) or not isinstance(v, (int, np.integer)):
            self.fail(v, path)
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            self.fail(v, path)
        if self.dim:
            _bind(dims, self.dim, int(v), path)


class Num(Spec):
    """A finite real number (int or float) in [min, max] (open ends with min_open/max_open)."""

    def __init__(self, min: float | None = None, max: float | None = None, min_open=False, max_open=False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open
        lo = "" if min is None else f"{'>' if min_open else '>='} {min:g}"
        hi = "" if max is None else f"{'<' if max_open else '<='} {max:g}"
        self.what = "a finite number" + " and".join(f" {b}" for b in (lo, hi) if b)

    def check(self, v, dims, path):
        if is_bool(v) or not isinstance(v, (int, float, np.integer, np.floating)):
            self.fail(v, path)
        try:
            finite = math.isfinite(v)
        except OverflowError:   # an int beyond float's range (JSON integers have any number of digits)
            finite = False
        if not finite:
            self.fail(v, path, "beyond a float's range" if isinstance(v, int) else None)
        if self.min is not None and (v <= self.min if self.min_open else v < self.min):
            self.fail(v, path)
        if self.max is not None and (v >= self.max if self.max_open else v > self.max):
            self.fail(v, path)


class Str(Spec):
    """A string; pattern: a regular expression it must match in full; choices: the values allowed."""

    def __init__(self, pattern: str | None = None, choices: tuple[str, ...] | None = None, what: str | None = None):
        self.pattern, self.choices = pattern and re.compile(pattern), choices
        self.what = what or ("one of " + ", ".join(map(repr, choices)) if choices else "a string")

    def check(self, v, dims, path):
        if not isinstance(v, str):
            self.fail(v, path)
        if self.choices is not None and v not in self.choices:
            self.fail(v, path)
        if self.pattern is not None and not self.pattern.fullmatch(v):
            self.fail(v, path)


class List(Spec):
    """A list (or tuple) of items; length: an int, a dimension name, or None; min_len: at least this many."""

    def __init__(self, item: Spec, length: int | str | None = None, min_len: int = 0):
        self.item, self.length, self.min_len = item, length, min_len
        n = f"{length} " if length is not None else ""
        self.what = f"a list of {n}items, each {item.what}"

    def check(self, v, dims, path):
        if not isinstance(v, (list, tuple)):
            self.fail(v, path)
        if len(v) < self.min_len:
            raise Invalid(f"{path} must hold at least {self.min_len} item(s), got {len(v)}")
        if isinstance(self.length, int) and len(v) != self.length:
            raise Invalid(f"{path} must hold {self.length} items, got {len(v)}")
        if isinstance(self.length, str):
            _bind(dims, self.length, len(v), path, f"{path} holds {len(v)} items")
        for i, item in enumerate(v):
            self.item.check(item, dims, f"{path}[{i}]")


class Map(Spec):
    """A mapping whose keys and values fit `keys` and `values` (at least min_len entries)."""

    def __init__(self, values: Spec, keys: Spec | None = None, min_len: int = 0, what: str | None = None):
        self.values, self.keys, self.min_len = values, keys or Str(), min_len
        self.what = what or "an object"

    def check(self, v, dims, path):
        if not isinstance(v, Mapping):
            self.fail(v, path)
        if len(v) < self.min_len:
            raise Invalid(f"{path} must hold at least {self.min_len} entr{'y' if self.min_len == 1 else 'ies'}")
        for k, item in v.items():
            self.keys.check(k, dims, f"{path} key")
            self.values.check(item, dims, f"{path}[{brief(k, 40)}]")


class Obj(Spec):
    """A mapping with these required fields (and these optional ones); other entries are allowed unless strict (a
    record whose every entry is used as it is, e.g. a sampling plan: an entry it does not know would be ignored)."""

    def __init__(self, fields: dict[str, Spec], optional: dict[str, Spec] | None = None, what: str = "an object",
                 strict: bool = False):
        self.fields, self.optional, self.what, self.strict = fields, optional or {}, what, strict

    def check(self, v, dims, path):
        if not isinstance(v, Mapping):
            self.fail(v, path)
        missing = [k for k in self.fields if k not in v]
        if missing:
            raise Invalid(f"{path + ' ' if path else ''}lacks {', '.join(map(repr, missing))}")
        unknown = [k for k in v if k not in self.fields and k not in self.optional] if self.strict else []
        if unknown:
            raise Invalid(f"{path + ' ' if path else ''}has an entry it does not know: {brief(unknown[0], 60)}")
        for k, spec in {**self.fields, **self.optional}.items():
            if k in v:
                spec.check(v[k], dims, f"{path}.{k}" if path else k)


class Json(Spec):
    """A string holding JSON whose value fits `inner` (safetensors metadata values are strings)."""

    def __init__(self, inner: Spec):
        self.inner, self.what = inner, f"JSON text of {inner.what}"

    def check(self, v, dims, path):
        if not isinstance(v, str):
            self.fail(v, path)
        try:
            value = json_loads(v)
        except ValueError as e:
            raise Invalid(f"{path} is not JSON ({e})") from None
        except RecursionError:
            raise Invalid(f"{path} is not JSON a reader can take (nested too deep)") from None
        self.inner.check(value, dims, path)


_SCANS_LATER: contextvars.ContextVar[list | None] = contextvars.ContextVar("ddpm_scans_later", default=None)


def scan(check: Callable[[], None]) -> None:
    """Run `check`, a look at every value of an array (its min, max, NaNs), now; inside `shapes_first`, keep it for
    after the checks that read only shapes and dtypes."""
    later = _SCANS_LATER.get()
    if later is None:
        check()
    else:
        later.append(check)


@contextmanager
def shapes_first() -> Iterator[list[Callable[[], None]]]:
    """Within the block, specs check types, shapes and dtypes only, and their value scans (`scan`) are collected in
    the list yielded, to be run by the caller once the limits that follow from the shapes alone have passed: a
    np.broadcast_to view of one value may declare 2**40 of them, and scanning those takes minutes."""
    later: list[Callable[[], None]] = []
    token = _SCANS_LATER.set(later)
    try:
        yield later
    finally:
        _SCANS_LATER.reset(token)


class Array(Spec):
    """A numpy array or torch tensor. dtypes: accepted dtype names ("uint8", "float32") or kinds ("int", "float");
    shape: a tuple of ints, dimension names and None (any size), or None for any shape; finite: no NaN/inf (floats);
    min/max: bounds on every value (integers)."""

    def __init__(self, dtypes: tuple[str, ...], shape: tuple | None = None, finite: bool = False,
                 min: int | None = None, max: int | None = None):
        self.dtypes, self.shape, self.finite, self.min, self.max = dtypes, shape, finite, min, max
        dims = "" if shape is None else " of shape (" + ", ".join("*" if d is None else str(d) for d in shape) + \
            ("," if len(shape) == 1 else "") + ")"
        self.types = " or ".join(f"any {d} type" if d in ("int", "float") else d for d in dtypes)
        self.what = f"an array of {self.types}{dims}"

    def check(self, v, dims, path):
        if not (hasattr(v, "dtype") and hasattr(v, "shape")):
            self.fail(v, path)
        name = _dtype_name(v)
        if name not in self.dtypes and _kind(name) not in self.dtypes:
            raise Invalid(f"{path} must be {self.types}, got {name}")
        shape = tuple(v.shape)
        if self.shape is not None:
            if len(shape) != len(self.shape):
                self.fail(v, path)
            for d, want in zip(shape, self.shape):
                if isinstance(want, int) and d != want:
                    self.fail(v, path)
            for d, want in zip(shape, self.shape):
                if isinstance(want, str):
                    _bind(dims, want, d, path, f"{path} has shape {brief(shape)}")
        if (self.finite or self.min is not None or self.max is not None) and int(np.prod(shape)):
            scan(lambda: self._check_values(v, path))

    def _check_values(self, v, path):
        a = _as_numpy(v)
        if self.finite and a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise Invalid(f"{path} holds {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf)")
        if self.min is not None and a.min() < self.min or self.max is not None and a.max() > self.max:
            raise Invalid(f"{path} must hold values{_bounds(self.min, self.max)}, got values from {a.min()} to "
                          f"{a.max()}")


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):   # a torch tensor (bfloat16 has no numpy dtype)
        import torch

        t = v.detach().cpu()
        return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    return np.asarray(v)


def _bind(dims: dict, name: str, value: int, path: str, found: str | None = None) -> None:
    if name not in dims:
        dims[name] = (value, path)
        return
    want, source = dims[name]
    if value != want:
        raise Invalid(f"{found or f'{path} is {value}'}, but {name} = {want} (from {source})")


@dataclass
class Schema:
    """A format: what it is called (for messages), its required and optional entries, and what to do about a bad
    file (`hint`, appended to every message)."""

    what: str
    fields: dict[str, Spec]
    optional: dict[str, Spec] = field(default_factory=dict)
    hint: str = ""

    def check(self, obj, where, error=ValueError, dims: dict[str, int] | None = None) -> dict[str, int]:
        """Check `obj` (a mapping) against the schema; raise error(one line) at the first problem. Returns the named
        dimensions found (e.g. {"N": 10})."""
        found = {k: (v, "the caller") for k, v in (dims or {}).items()}
        hint = f"; {self.hint}" if self.hint else ""
        if not isinstance(obj, Mapping):
            raise error(f"{where}: not a {self.what} (it holds {_describe(obj)}, not named entries){hint}")
        try:
            Obj(self.fields, self.optional).check(obj, found, "")
        except Invalid as e:
            msg = str(e)
            if msg.startswith("lacks "):
                raise error(f"{where}: an incomplete {self.what}: it {msg}{hint}") from None
            raise error(f"{where}: {msg}{hint}") from None
        return {k: v for k, (v, _) in found.items()}

    def subset(self, *names: str, hint: str | None = None) -> "Schema":
        """The same format, requiring only these entries (what one reader needs)."""
        return Schema(self.what, {k: self.fields[k] for k in names}, {}, self.hint if hint is None else hint)


def check_value(spec: Spec, value: AnyT, where: str, error=ValueError) -> None:
    """One value against one spec (e.g. an option), raising error(one line)."""
    try:
        spec.check(value, {}, where)
    except Invalid as e:
        raise error(str(e)) from None
