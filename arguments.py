"""The public API's arguments, checked in one place: one spec per argument name (schema.py's specs), applied by
`checked` to every public function of ddpm.api before it does any work.

    @checked(n=OPTIONAL_COUNT)            # an argument whose meaning differs in this function
    def edit(self, image, label=None, strength=0.6, n=None, ...): ...

    model.generate(2, steps=1.5)          # DdpmError: steps must be an integer >= 1, got 1.5

The same rules everywhere: an integer argument takes Python and numpy integers, never a bool or a float; a number
takes integers and floats, never a bool, NaN or inf (a numpy scalar of any width reaches the function as the Python
int or float it holds: `plain`); a string is checked against its choices; a flag is a bool. A
call that does not fit the signature (a missing or unknown argument) is a DdpmError too. What depends on the model
(steps <= T, a label below the number of classes) is checked where the model is known, also as a DdpmError; a
plan given to a method of a model is checked here against that model's schedule (PlanArg.fits). Only
the arguments a caller passes are checked: the defaults are known to be good.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
from typing import Callable

import numpy as np

from .errors import DdpmError, brief, raise_if_limit
from .options import MAX_GUIDANCE, MAX_LEVEL, MAX_SIGMA, MAX_THREADS, VARIANCES
from .schema import Any, Array, Bool, Int, Invalid, Num, Opt, Spec, Str, is_bool, scan, shapes_first


class OneOf(Spec):
    """One of a few allowed values of `inner` (e.g. the integers 2 and 4): those `_choices(name)` gives."""

    def __init__(self, inner: Spec, name: str):
        self.inner, self.name = inner, name

    @property
    def what(self) -> str:
        return " or ".join(map(str, _choices(self.name)))

    def check(self, v, dims, path):
        self.inner.check(v, dims, path)
        if v not in _choices(self.name):
            self.fail(v, path)


class PathArg(Spec):
    what = "a path (str or os.PathLike)"

    def check(self, v, dims, path):
        if not isinstance(v, (str, os.PathLike)) or not isinstance(os.fspath(v), str) or os.fspath(v) == "":
            self.fail(v, path)


class Func(Spec):
    what = "a function"

    def check(self, v, dims, path):
        if not callable(v):
            self.fail(v, path)


class Duck(Spec):
    """An object with these attributes (e.g. an engine object: name and run)."""

    def __init__(self, attrs: tuple[str, ...], what: str):
        self.attrs, self.what = attrs, what

    def check(self, v, dims, path):
        if not all(hasattr(v, a) for a in self.attrs):
            self.fail(v, path)


class Either(Spec):
    """A value of the first spec that takes it; the message names what all of them take."""

    def __init__(self, *specs: Spec):
        self.specs = specs

    @property
    def what(self) -> str:
        return " or ".join(s.what for s in self.specs)

    def check(self, v, dims, path):
        for s in self.specs:
            try:
                s.check(v, dims, path)
                return
            except Invalid:
                pass
        self.fail(v, path)


class Pair(Spec):
    """A tuple or list of two values of `inner`; ordered: the first below the second."""

    def __init__(self, inner: Spec, ordered: bool = False, what: str | None = None):
        self.inner, self.ordered = inner, ordered
        self.what = what or f"a pair of values, each {inner.what}"

    def check(self, v, dims, path):
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            self.fail(v, path)
        for x in v:
            try:
                self.inner.check(x, dims, path)
            except Invalid:
                self.fail(v, path)
        if self.ordered and not v[0] < v[1]:
            self.fail(v, path)


class Level(Spec):
    """A noise level in [0, MAX_LEVEL], or +inf (the top of a guidance interval); never NaN or a bool."""

    what = f"a number in 0..{MAX_LEVEL:g} or inf"

    def check(self, v, dims, path):
        if is_bool(v) or not isinstance(v, (int, float, np.integer, np.floating)):
            self.fail(v, path)
        # a Python int of any size compares with floats exactly; math.isnan would convert it (OverflowError)
        if (isinstance(v, (float, np.floating)) and math.isnan(v)) or v < 0 or MAX_LEVEL < v < math.inf:
            self.fail(v, path)


class ArrayLike(Spec):
    """Anything numpy turns into an array that fits `inner` (an Array spec): lists too."""

    def __init__(self, inner: Array):
        self.inner, self.what = inner, inner.what

    def check(self, v, dims, path):
        if isinstance(v, (str, bytes, os.PathLike)) or v is None:
            self.fail(v, path)
        a = _array(v)
        if a is None:
            self.fail(v, path)
        self.inner.check(a, dims, path)


def _array(v) -> np.ndarray | None:
    """np.asarray(v), or None where numpy cannot make an array of v: a ragged nested list, a closed PIL image, an
    object whose __array__ or __index__ raises (whatever it raises: the user's object, not ours). MemoryError goes
    on, for the resource-limit rule (errors.limit_message)."""
    try:
        return np.asarray(v)
    except MemoryError:
        raise
    except Exception:
        return None


def _ndim(v) -> int:
    """np.ndim(v), or -1 where numpy cannot make an array of v (_array)."""
    a = _array(v)
    return -1 if a is None else a.ndim


class Labels(Spec):
    """None, one class (an integer >= 0), or one per sample (a 1-D sequence of integers >= 0). The upper bound is
    the model's number of classes (Model.labels)."""

    what = "None, an integer >= 0, or a 1-D sequence of integers >= 0"

    def check(self, v, dims, path):
        if v is None:
            return
        a = None if isinstance(v, (str, bytes)) else _array(v)
        if a is None or a.ndim not in (0, 1):
            self.fail(v, path)
        if a.ndim == 0:
            Int(min=0).check(v, dims, path)
            return
        if a.dtype.kind not in "iu":
            self.fail(v, path)
        if len(a) > MAX_COUNT:   # one label per result, from its shape alone
            raise Invalid(f"{path} holds {len(a)} labels, more than the {MAX_COUNT} results one call makes")

        def values():
            if a.size and a.min() < 0:
                self.fail(v, path)
        scan(values)


class Picture(Spec):
    """A picture file, a (H, W) array, or a stack (N, H, W) of them; what it holds is checked when it is read
    (api._read)."""

    def __init__(self, names: str | None = None):
        self.names = names   # the _choices of words that are not files (inpaint's mask: "half", the halves)

    @property
    def what(self) -> str:
        what = "a picture file or a (H, W) or (N, H, W) uint8 array"
        return f"one of {', '.join(_choices(self.names))}, {what}" if self.names else what

    def check(self, v, dims, path):
        if isinstance(v, (str, os.PathLike)):
            if v == "":
                self.fail(v, path)
            return
        if isinstance(v, bytes) or v is None or _ndim(v) not in (2, 3):
            self.fail(v, path)


def _choices(name: str) -> tuple:
    """Choices that live with the code that uses them (imported late: `import ddpm` stays light, and some modules
    import this one)."""
    if name == "engine":
        from .runtime.engines import ENGINES

        return ("auto", *ENGINES)
    if name == "sampler":
        from .runtime.samplers import SAMPLERS

        return SAMPLERS
    if name == "spacing":
        from .runtime.samplers import SPACINGS

        return SPACINGS
    if name == "form":
        from .export.generator import FORMS   # numpy-only at import time

        return FORMS
    if name == "half":
        from .runtime.images import HALVES

        return HALVES
    if name == "factor":
        from .runtime.edits import FACTORS

        return FACTORS
    if name == "method":
        from .runtime.edits import UPSCALERS

        return UPSCALERS
    raise KeyError(name)


class Lazy(Spec):
    """Str(choices=...) whose choices are read when first needed; what: a description with "{}" where the choices
    go (read only when a message needs it)."""

    def __init__(self, name: str, what: str | None = None):
        self.name, self._spec, self._what = name, None, what

    @property
    def what(self) -> str:
        return self._what.format(", ".join(_choices(self.name))) if self._what else f"one of the {self.name}s"

    def check(self, v, dims, path):
        if self._spec is None:
            self._spec = Str(choices=_choices(self.name))
        self._spec.check(v, dims, path)


def _is_plan(v) -> bool:
    from .runtime.samplers import Plan

    return isinstance(v, Plan)


class PlanArg(Spec):
    what = "a sampler plan (Model.plan)"

    def check(self, v, dims, path):
        if not _is_plan(v):
            self.fail(v, path)
        # its name names the files and records made for it (a generator, export.json's "generators"), which hold
        # one printable line of 1..200 characters (runtime.bundle's _NAME)
        if not (isinstance(v.name, str) and 1 <= len(v.name) <= 200 and v.name.isprintable()):
            raise Invalid(f"{path} must be {self.what} named in one printable line of 1..200 characters, got the "
                          f"name {brief(v.name)}")

    @staticmethod
    def fits(model, plan, path) -> None:
        """Invalid unless `plan` was made for the schedule of `model` (api.Model): its network's prediction, every
        row's t in 0..T-1 and the abar of every row that calls the network equal to the model's abar_t there (a
        re-noising row of RePaint starts from a lower noise level than its t's). A plan of another schedule (another
        T, beta recipe or prediction) would run the network at noise levels it was not trained for."""
        sched = model.schedule
        t = np.asarray(plan.timesteps)
        why = None
        if plan.prediction != sched.prediction:
            why = f"for a network predicting {plan.prediction}, this one predicts {sched.prediction}"
        elif t.size and not ((t >= 0) & (t < sched.T)).all():
            why = f"with timesteps up to {int(t.max())}, this model's T is {sched.T}"
        elif not np.allclose(plan.abar[plan.calls_net], sched.alphas_cumprod[t[plan.calls_net]], rtol=1e-9, atol=0):
            why = f"for another noise schedule (its abar differs from this model's {sched.name} T={sched.T} one)"
        if why:
            raise Invalid(f"{path}: a plan made {why}: make it with this model's plan()")


PLAN = PlanArg()
MAX_COUNT = 2**32   # results of one call: far beyond any memory (784 bytes each), below numpy's array limits
COUNT = Int(min=0, max=MAX_COUNT)
OPTIONAL_COUNT = Opt(COUNT)
ENGINE_NAME = Lazy("engine", "an engine name ({})")
# an engine object: what the pipeline reads of one (runtime.engine.Engine); pipeline.check_engine_fits checks that it
# runs the model it is given to
ENGINE = Either(ENGINE_NAME, Duck(("name", "device", "supports", "run"),
                                  "an engine object (model.engine(...): name, device, supports, run)"))
DEVICE = Str(pattern=r"auto|cpu|cuda|cuda:[0-9]+", what="auto, cpu, cuda or cuda:N")

# Every argument of every public function, by name. `checked` refuses at import time a function with an argument
# missing here, so a new argument cannot go unchecked.
ARGS: dict[str, Spec] = {
    # Model.__exit__'s three: whatever the `with` statement passes (the exception's type, value and traceback)
    "exc_type": Any(), "exc": Any(), "tb": Any(),
    # what to draw
    "n": COUNT,
    "label": Labels(),
    "uncond": Bool(),
    "guidance": Num(min=0, max=MAX_GUIDANCE),
    "seed": Int(min=0, max=2**64 - 1),
    "start": Int(min=0, max=2**64 - 1),
    "batch": Int(min=1),
    "progress": Bool(),
    # the sampler (Model.plan)
    "sampler": Lazy("sampler"),
    "steps": Opt(Int(min=1)),
    "eta": Num(min=0, max=1),
    "variance": Str(choices=VARIANCES),
    "spacing": Opt(Lazy("spacing")),
    "guidance_interval": Opt(Pair(Level(), ordered=True, what=f"None or a pair (lo, hi) with 0 <= lo < hi <= {MAX_LEVEL:g} or hi inf")),
    "guidance_rescale": Num(min=0, max=1),
    "top": Opt(Int(min=0)),
    "plan": Opt(PLAN),
    # where it runs (Model.engine)
    "engine": ENGINE,
    "name": ENGINE_NAME,
    "device": DEVICE,
    "fp16": Bool(),
    "int8": Bool(),
    "cuda_graph": Bool(),
    "threads": Opt(Int(min=1, max=MAX_THREADS)),
    "max_batch": Int(min=1),
    "dist": Opt(Duck(("rank", "world", "barrier"), "a torchrun context (rank, world, barrier)")),
    "log": Opt(Func()),
    "form": Lazy("form"),
    # editing
    "image": Picture(),
    "mask": Picture(names="half"),
    "strength": Num(min=0, max=1),
    "factor": OneOf(Int(), "factor"),
    "method": Lazy("method"),
    "sigma": Num(min=0, max=MAX_SIGMA, min_open=True),
    "jump": Int(min=1),
    "resample": Int(min=1),
    "size": Opt(Pair(Int(min=1, max=4096), what="None or a pair (H, W) of integers in 1..4096 (runtime.images)")),
    # files
    "path": Opt(PathArg()),
    "export": Opt(PathArg()),
    "data": Opt(PathArg()),
    "download": Bool(),
    # evaluate
    "images": ArrayLike(Array(("uint8",), ("N", 28, 28))),
    "labels": ArrayLike(Array(("int",), ("N",), min=-1)),   # below the classifier's class count: check_samples
}


_GIVEN: contextvars.ContextVar[frozenset] = contextvars.ContextVar("ddpm_given", default=frozenset())


def exact(v):
    """An argument of a subclass of int, float or str as the plain value it holds, read with the base type's own
    method (int.__int__, float.__float__, str.__str__ return an exact copy for a subclass), so that no override of
    the user's subclass runs in the checks or in the library (a comparison that raises, an __eq__ that lies);
    anything else as it is."""
    for base in (int, float, str):
        if isinstance(v, base) and type(v) is not base and not isinstance(v, bool):
            return getattr(base, f"__{base.__name__}__")(v)
    return v


def plain(v):
    """A numpy scalar as the Python int or float it holds (one level into a tuple or list too), -0.0 as 0.0, anything
    else as it is: an argument that passed its check is used as a Python number, so arithmetic on it (n * 784 for
    np.uint8 n) cannot overflow the scalar's dtype, and a zero names one plan ("eta0", never "eta-0")."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) + 0.0
    if isinstance(v, (tuple, list)) and any(isinstance(e, (np.integer, np.floating, float)) for e in v):
        return type(v)(plain(e) for e in v)
    return v


def given() -> frozenset:
    """The names of the arguments the caller passed to the innermost `checked` function running now (not those left
    at their defaults): how a model's recorded plan (options.recorded_plan) yields to what the caller asked for."""
    return _GIVEN.get()


def _raise_unreadable(where: str, name: str, spec: Spec, value, e: Exception):
    """The argument's DdpmError for an exception its own object raised while it was checked (an __array__,
    __fspath__, __len__ or comparison of the user's that raises), or LimitReached when a resource limit caused it."""
    raise_if_limit(e, f"{where}()")
    raise DdpmError(f"{where}(): {name} must be {spec.what}, got a {type(value).__name__} that raised "
                    f"{type(e).__name__} when read") from None


def checked(_fn=None, limits: Callable[[dict], None] | None = None, error: type[DdpmError] = DdpmError,
            **overrides: Spec):
    """Check the arguments of every call of the decorated function against ARGS (or `overrides`, for an argument
    that means something else here) before it runs; `error` (a DdpmError) with one line naming the argument
    otherwise.

    The checks run in two passes: first every argument's type, shape and dtype (which bind the named dimensions,
    e.g. N), then `limits` (a function of those dimensions, {name: (size, argument)}, raising a DdpmError: the
    limits that follow from shapes alone), and only then the scans of the arrays' values (schema.shapes_first)."""
    def deco(fn):
        sig = inspect.signature(fn)
        specs = {}
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            spec = overrides.get(p.name, ARGS.get(p.name))
            if spec is None:
                raise TypeError(f"{fn.__qualname__}: argument {p.name!r} has no spec in ddpm.arguments.ARGS")
            specs[p.name] = spec
        where = fn.__qualname__.replace("Model.", "model.").replace("Engine.", "engine.") if "." in fn.__qualname__ else f"ddpm.{fn.__name__}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise error(f"{where}(): {e}") from None
            dims: dict = {}
            model = bound.arguments.get("self")
            with shapes_first() as scans:
                for name, value in bound.arguments.items():
                    if name != "self":
                        value = exact(value)
                        try:
                            specs[name].check(value, dims, name)
                            if _is_plan(value) and hasattr(model, "schedule"):
                                PlanArg.fits(model, value, name)
                        except Invalid as e:
                            raise error(f"{where}(): {e}") from None
                        except Exception as e:   # the user's object raised while it was looked at
                            _raise_unreadable(where, name, specs[name], value, e)
                        bound.arguments[name] = plain(value)
            if limits is not None:
                limits(dims)
            try:
                for values in scans:
                    values()
            except Invalid as e:
                raise error(f"{where}(): {e}") from None
            token = _GIVEN.set(frozenset(bound.arguments) - {"self"})
            try:
                return fn(*bound.args, **bound.kwargs)
            except DdpmError:
                raise
            except Exception as e:   # a resource limit the checks did not foresee: an allocation, a native library
                raise_if_limit(e, f"{where}()")   # that an import cannot map under ulimit -v, too many open files
                raise
            finally:
                _GIVEN.reset(token)
        wrapper.specs = specs
        return wrapper
    return deco if _fn is None else deco(_fn)


__all__ = ["ARGS", "checked", "given"]
