"""What every engine is: the `Engine` protocol that runtime.generate, the API and `ddpm bench` rely on.

An engine runs one batch of a sampling plan (runtime.samplers.Plan) from noise it is given, so that every engine
gives the same digits for the same seed: x_T (B,C,H,W) float32 and the plan's noise z (B,Q,C,H,W) float32 or None
in, x_0 (B,C,H,W) float32 (or, from the onnx-generator engine, the images (B,H,W) uint8) out, on the host.
`runtime.engines.make_engine` makes one by name. The engines:

    runtime.eager.EagerEngine          torch: the plain per-step loop, the reference
    runtime.runner.RuntimeEngine       runtime-torch, onnx, trt: the preallocated runtime over a net (runtime.nets,
                                       runtime.trt)
    runtime.generator.GeneratorEngine  onnx-generator: the whole loop of one plan in one onnxruntime call

Each declares what it can do (`Supports`) instead of being probed, reports every row to ONE observation callback
of k-diffusion's kind (`StepCallback`), and has a lifetime: `close()` (or leaving a `with` block) frees what it
holds (runners and their buffers, onnxruntime sessions and IO bindings, TensorRT execution contexts, CUDA graphs),
closing twice is harmless, and a closed engine refuses work with `EngineClosed`, as Polygraphy's runners do.
`EngineCache` keeps the engines of a Model (api.Model.engine) and lets a job's batch hold a use of one, which the
Model's close() waits for before closing it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

from ..arguments import checked
from ..errors import DdpmError

if TYPE_CHECKING:
    from .samplers import Plan

# callback(i, t, x, x0_hat) after row i of the plan, whose integer timestep is t (plan.timesteps[i]); x and x0_hat
# are host copies (B,C,H,W) float32 of the state after the row and of the row's predicted clean image when the run
# was asked for its states (run(states=True)), else None (progress only); x0_hat is None on rows without a network
# call. As k-diffusion's samplers' `callback` (k_diffusion/sampling.py), with the step's values as arguments.
StepCallback = Callable[[int, int, "np.ndarray | None", "np.ndarray | None"], None]


class EngineClosed(DdpmError):
    """Work asked of an engine after its close()."""


class EngineInput(DdpmError, ValueError):
    """Inputs an engine cannot run (Engine.run): a shape, dtype or value outside what it takes."""


class EngineOutput(DdpmError):
    """What an engine's run returned is not what Engine.run promises (an engine object given to the API)."""


def check_output(engine, x, batch: int, image_shape: tuple[int, int, int]) -> None:
    """EngineOutput unless `x`, what `engine`.run returned for `batch` samples of `image_shape` (C, H, W), is x_0
    (batch, C, H, W) float or the images (batch, H, W) uint8 ((batch, H, W, C) for colour), as Engine.run says."""
    C, H, W = image_shape
    images = (batch, H, W) if C == 1 else (batch, H, W, C)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if isinstance(x, np.ndarray) and ((dtype.kind == "f" and shape == (batch, C, H, W))
                                      or (dtype == np.uint8 and shape == images)):
        return
    got = f"{dtype} of shape {tuple(shape)}" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
    raise EngineOutput(f"the {getattr(engine, 'name', type(engine).__name__)} engine returned {got} for a batch of "
                       f"{batch}, not x_0 {(batch, C, H, W)} float32 or the images {images} uint8 (Engine.run)")


def _run_args() -> dict:
    """Engine.run's argument specs (arguments.checked): one batch B of (C, H, W) images, a plan's Q noise slots."""
    from ..arguments import ARGS, PLAN, Duck, Func
    from ..schema import Array, Bool, Opt

    image = Array(("float",), ("B", "C", "H", "W"), finite=True)
    return {"x_T": image, "z": Opt(Array(("float",), ("B", "Q", "C", "H", "W"), finite=True)),
            "labels": Opt(Array(("int",), ("B",), min=0)), "plan": PLAN, "guidance": ARGS["guidance"],
            "callback": Opt(Func()), "y": Opt(image), "mask": Opt(image), "states": Bool(),
            "edit": Opt(Duck(("bind", "validate"), "an edit's projection (runtime.edits.Projection)"))}


def _float32(a):
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


@dataclass(frozen=True)
class Supports:
    """What an engine can do besides a plain batch. Every engine runs classifier-free guidance and any batch of
    samples whose network batch (runtime.generate.network_batch) is at most max_batch; its precision is its
    `dtype`."""

    edits: bool                    # run(edit=, y=, mask=): an edit's projection at its rows (runtime.edits)
    states: bool                   # run(states=True): the callback sees x and x0_hat after every row
    max_batch: int | None = None   # the largest network batch it runs (a TensorRT engine file's range); None: any
    plan_key: str | None = None    # the one plan it runs (runtime.runner.plan_key; onnx-generator); None: any


class Engine(Protocol):
    """One way of running a plan: name, where and in what precision, what it supports, `run`, `versions`, and a
    lifetime (`close`, `with`). Engines subclass this protocol explicitly and inherit `__enter__`, `__exit__` and
    `check_open`."""

    name: str             # the engine's name in runtime.engines.ENGINES
    device: str           # where its buffers and network live: "cpu", "cuda:0", ...
    dtype: str            # the network's input and output: "float32" or "float16"
    supports: Supports
    closed: bool          # True after close()
    # what the network computes in: "fp32", "fp16" or "int8" (model_int8.onnx's convolutions, float32 in and out)
    precision: str = "fp32"
    null_label: int | None = None                  # the largest label it takes (the unconditional one)
    # the weights it runs (model.io.weights_hash: export.json's and an ONNX file's checkpoint_hash), where known: a
    # Model takes only an engine of its own weights (pipeline.check_engine_fits)
    weights: str | None = None
    image_shape: tuple[int, int, int] | None = None   # the (C, H, W) of its images, where known

    @checked(error=EngineInput, **_run_args())
    def run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan, guidance: float,
            callback: StepCallback | None = None, edit=None, y: np.ndarray | None = None,
            mask: np.ndarray | None = None, states: bool = False) -> np.ndarray:
        """One batch: x_T (B,C,H,W) float32, z (B,Q,C,H,W) float32 or None (Q: the plan's noise slots, then the
        edit's), labels (B,) int64 or None (unconditional: the null label), guidance w >= 0 (classifier-free
        guidance, Ho & Salimans 2022) -> x_0 (B,C,H,W) float32 on the host, a copy the next run cannot overwrite
        (onnx-generator: the images (B,H,W) uint8). callback: see StepCallback; states: hand it x and x0_hat
        (Supports.states); edit, y, mask: an edit's projection with its known image and mask (Supports.edits,
        runtime.edits). Every engine's inputs are checked here, before any work (arrays of any float or integer
        dtype are taken as float32 and int64): EngineInput (a DdpmError and a ValueError, one line naming the
        argument) for inputs the engine cannot run, EngineClosed after close()."""
        self.check_open()
        if self.image_shape is not None and tuple(x_T.shape[1:]) != tuple(self.image_shape):
            raise EngineInput(f"engine.run(): x_T has shape {tuple(x_T.shape)}, this engine's images "
                              f"are {tuple(self.image_shape)}")
        if labels is not None and len(labels) and self.null_label is not None and int(np.max(labels)) > self.null_label:
            raise EngineInput(f"engine.run(): labels holds {int(np.max(labels))}, beyond this model's "
                              f"0..{self.null_label} ({self.null_label}: the unconditional label)")
        Q = plan.num_slots + (0 if edit is None else edit.num_slots)   # the plan's noise slots, then the edit's
        if (z is None) != (Q == 0) or (z is not None and z.shape[1] != Q):
            want = "None" if Q == 0 else f"an array of shape (B, {Q}, C, H, W)"
            raise EngineInput(f"engine.run(): the plan {plan.name}{'' if edit is None else ' with its edit'} draws "
                              f"{Q} noise slots besides x_T, so z must be {want}, got "
                              f"{None if z is None else tuple(z.shape)}")
        if labels is not None:
            labels = np.ascontiguousarray(labels, dtype=np.int64)
        return self._run(_float32(x_T), _float32(z), labels, plan, float(guidance), callback, edit, _float32(y),
                         _float32(mask), states)

    def _run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan, guidance: float,
             callback: StepCallback | None, edit, y: np.ndarray | None, mask: np.ndarray | None,
             states: bool) -> np.ndarray:
        """run()'s work, on inputs it has checked (contiguous float32 arrays, int64 labels, a float guidance)."""
        ...

    def versions(self) -> dict[str, str]:
        """The versions of what computes the digits (PyTorch, onnxruntime and its provider, TensorRT)."""
        ...

    def close(self) -> None:
        """Free what the engine holds; closing again does nothing. Runs still in flight in other threads finish
        first: what they hold is freed when they end."""
        ...

    def check_open(self) -> None:
        """EngineClosed when the engine is closed."""
        if self.closed:
            raise EngineClosed(f"the {self.name} engine is closed; make a new one (Model.engine, "
                               f"runtime.engines.make_engine)")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_label(engine) -> str:
    """The engine's name with its precision where that is not fp32 ("onnx", "onnx int8", "trt fp16"), as the last
    line of gen and the editing commands names what ran (`ddpm bench` names its int8 row the same way). Any object
    with a `name` (an engine given to the API that is not one of runtime.engines') is fp32 unless it says otherwise."""
    precision = getattr(engine, "precision", "fp32")
    return engine.name if precision == "fp32" else f"{engine.name} {precision}"


class CountedEngine(Engine):
    """An engine whose close() lets the runs in flight finish: `run` wraps its work in `with self.in_use():`, and
    what the engine holds is freed (`_free`) by close() when no run is in flight, else when the last one ends. As
    runtime.runner.RuntimeEngine does with its busy runners, so that closing from one thread never pulls the model
    or session from under another thread's run."""

    closed = False
    _busy = 0
    _use_lock = threading.Lock()   # replaced per engine by _init_uses

    def _init_uses(self) -> None:
        self.closed, self._busy, self._use_lock = False, 0, threading.Lock()

    def _free(self) -> None:
        """Drop what the engine holds (called once, with no run in flight)."""

    class _Use:
        def __init__(self, engine: "CountedEngine"):
            self.engine = engine

        def __enter__(self):
            e = self.engine
            with e._use_lock:
                e.check_open()
                e._busy += 1
            return e

        def __exit__(self, *exc) -> None:
            e = self.engine
            with e._use_lock:
                e._busy -= 1
                last = e.closed and e._busy == 0
            if last:
                e._free()

    def in_use(self) -> "CountedEngine._Use":
        """A context for one run: EngineClosed when the engine is closed; the engine is not freed inside it."""
        return CountedEngine._Use(self)

    def close(self) -> None:
        """Free what the engine holds now, or when the runs in flight end; closing again does nothing."""
        with self._use_lock:
            if self.closed:
                return
            self.closed = True
            last = self._busy == 0
        if last:
            self._free()


class EngineCache:
    """The engines one owner made (api.Model.engine), one per key, kept until close(); thread-safe.

    A job's batch runs under a use of its engine (`use`), which close() respects: close() drops every engine from
    the cache at once (a later `get` makes a new one) and closes an engine in use when its last use ends, so that a
    batch never starts on an engine its owner closed after the job picked it up. An engine's own close() is its
    holder's: the cache makes a new one for the next `get` or `use` that finds it closed. Making an engine (an
    export, a TensorRT build) holds up close() and other makes, never a batch on an engine already made."""

    def __init__(self):
        self._making = threading.RLock()   # held while an engine is made, and by close(): one engine per key
        self._lock = threading.Lock()      # guards _kept and _uses; held for bookkeeping only
        self._kept: dict = {}              # key -> engine
        self._uses: dict = {}              # id(engine) -> [engine, uses in flight, closed by close() once unused]

    def _open(self, eng) -> bool:
        return any(kept is eng for kept in self._kept.values()) and not eng.closed

    def get(self, key, make: Callable[[], Engine]) -> Engine:
        """The kept engine of `key`, made by make() (and kept) when there is none or it was closed."""
        with self._lock:
            eng = self._kept.get(key)
            if eng is not None and not eng.closed:
                return eng
        with self._making:
            with self._lock:
                eng = self._kept.get(key)
                if eng is not None and not eng.closed:
                    return eng
            eng = make()
            with self._lock:
                self._kept[key] = eng
            return eng

    def _take(self, eng) -> list:
        entry = self._uses.setdefault(id(eng), [eng, 0, False])
        entry[1] += 1
        return entry

    @contextmanager
    def use(self, eng: Engine, renew: Callable[[], Engine]) -> Iterator[Engine]:
        """A use of `eng` for one batch: `eng` while it is kept and open, else renew() (get's engine of its key,
        e.g. Model.engine). close() closes the engine yielded only when the block ends."""
        with self._lock:
            entry = self._take(eng) if self._open(eng) else None
        if entry is None:   # dropped by close(), or closed: renewed with close() held off
            with self._making:
                eng = renew()
                with self._lock:
                    entry = self._take(eng)
        try:
            yield eng
        finally:
            with self._lock:
                entry[1] -= 1
                last = entry[1] == 0
                if last:
                    del self._uses[id(eng)]
            if last and entry[2]:
                eng.close()

    def close(self) -> None:
        """Close every kept engine: now when no batch uses it, else when its last use ends; closing again does
        nothing. The cache stays usable: `get` makes new engines."""
        with self._making, self._lock:
            engines, self._kept = list(self._kept.values()), {}
            now = []
            for eng in engines:
                entry = self._uses.get(id(eng))
                if entry is None:
                    now.append(eng)
                else:
                    entry[2] = True
        for eng in now:
            eng.close()
