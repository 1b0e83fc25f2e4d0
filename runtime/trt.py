"""TensorRT at run time: which engine file of an export folder to run, and the net that runs it (TensorRT 10/11 API).

An engine file is a serialized TensorRT engine built from one ONNX file of the export folder for one batch range,
saved as <onnx stem>_b<min>-<max>.plan (".plan": TensorRT's and Triton's suffix for a serialized engine) beside a
.plan.json recording the TensorRT version, the GPU, the ONNX file's sha256 and the batch range (one optimisation
profile: min, opt, max). `find_engine` picks a current engine file whose range covers the batches asked for; an
engine file of another TensorRT version, GPU or ONNX file is stale and never used. Building one is export's
(export/trt.py), which the runtime does not import: runtime.engines.make_engine is handed the builder.

Written against the documented API but NOT run in this project's workplace (TensorRT cannot be installed here):
see the README. The calls are type-checked against the TensorRT 10.13 stubs (tests/test_trt_typing.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import brief, raise_if_limit
from ..schema import json_loads
from .nets import EngineUnavailable, TorchOps, _CudaStream, _is_cuda, check_io

if TYPE_CHECKING:   # annotations only: TensorRT is imported where it is used (its stubs type-check the calls)
    import tensorrt as trt

ENGINE_SUFFIX = ".plan"
INFO_SUFFIX = ".plan.json"
INSTALL_HINT = ("TensorRT is not installed: `pip install '.[gpu]'` in a clone of ddpm (or NVIDIA's `tensorrt` wheels)"
                " on a machine with an NVIDIA GPU and driver")


class TensorRTUnavailable(EngineUnavailable):
    """TensorRT or a GPU for it is missing; the message says which."""


def import_trt():
    """The tensorrt module, or TensorRTUnavailable with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise_if_limit(e)   # installed, but its libraries cannot be mapped under a memory limit
        raise TensorRTUnavailable(INSTALL_HINT) from None
    return trt


def gpu_name() -> str:
    """The current CUDA device's name (what an engine file is built for); TensorRTUnavailable without a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible")
    return torch.cuda.get_device_name()


# ------------------------------------------------------------------------------------------------ engine files
def engine_file_paths(onnx_path: Path, min_batch: int, max_batch: int) -> tuple[Path, Path]:
    """(engine file, its .plan.json) of the engine built from onnx_path for batches min_batch..max_batch."""
    engine = onnx_path.with_name(f"{onnx_path.stem}_b{min_batch}-{max_batch}{ENGINE_SUFFIX}")
    return engine, engine.with_suffix(INFO_SUFFIX)


def engine_files(onnx_path: Path) -> list[tuple[Path, dict]]:
    """Every engine file built from this ONNX file in its folder: (engine file, its .plan.json contents), sorted by
    name. Engine files whose .plan.json is missing or unreadable, or either of which links outside the folder, are
    left out (they cannot be checked, so never reused)."""
    name = re.compile(rf"{re.escape(onnx_path.stem)}_b\d+-\d+{re.escape(ENGINE_SUFFIX)}")
    found = []
    for engine in sorted(onnx_path.parent.glob(f"{onnx_path.stem}_b*{ENGINE_SUFFIX}")):
        info = engine.with_suffix(INFO_SUFFIX)
        if not name.fullmatch(engine.name) or not engine.is_file() or not info.is_file() \
                or {engine.resolve().parent, info.resolve().parent} != {onnx_path.parent.resolve()}:   # links out
            continue
        try:
            meta = json_loads(info.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            found.append((engine, meta))
    return found


def choose_engine(candidates: list[tuple[Path, dict]], want: dict, min_batch: int, max_batch: int,
                  opt_batch: int) -> tuple[Path | None, str]:
    """The engine file to reuse for batches min_batch..max_batch, or (None, why none fits).

    candidates: (engine file, .plan.json contents) as from engine_files; want: what the engine must have been built
    for ({"tensorrt": version, "gpu": name, "onnx_sha256": hash}). Usable: built for `want` and its batch range
    covers min_batch..max_batch. Among usable engine files, one optimised for opt_batch first, then the narrowest
    range.
    """
    usable, why = [], []
    for engine, meta in candidates:
        stale = [f"{k}={brief(meta.get(k))}, this machine has {v!r}" for k, v in want.items() if meta.get(k) != v]
        lo, hi = meta.get("min_batch"), meta.get("max_batch")
        if stale:
            why.append(f"{engine.name} is stale (built for {stale[0]})")
        elif not (isinstance(lo, int) and isinstance(hi, int) and lo <= min_batch and max_batch <= hi):
            why.append(f"{engine.name} covers batch {lo}..{hi}")
        else:
            usable.append((meta.get("opt_batch") != opt_batch, hi - lo, engine.name, engine))
    if usable:
        return min(usable)[3], ""
    return None, "; ".join(why) or "no engine built yet"


def find_engine(bundle, precision: str, min_batch: int, max_batch: int, opt_batch: int) -> tuple[Path | None, str]:
    """The current engine file of an export folder (runtime.bundle.Bundle) for (precision, batches
    min_batch..max_batch), preferring one optimised for opt_batch (choose_engine); (None, why none fits) otherwise.
    TensorRTUnavailable without TensorRT or a GPU."""
    trt = import_trt()
    want = {"tensorrt": trt.__version__, "gpu": gpu_name(), "onnx_sha256": bundle.meta["files"][precision]["sha256"]}
    return choose_engine(engine_files(bundle.onnx_path(precision)), want, min_batch, max_batch, opt_batch)


# ---------------------------------------------------------------------------------------------------- the net
def trt_check(ok, what: str) -> None:
    """Every TensorRT call that reports success as a bool goes through here."""
    if not ok:
        raise RuntimeError(f"TensorRT: {what} failed")


def trt_engine_io(engine: trt.ICudaEngine) -> tuple[dict[str, tuple[str, str]], tuple[int, int] | None]:
    """What a deserialized TensorRT engine takes and gives: name -> (mode "input"/"output", dtype "float32",
    "float16", "int64" or TensorRT's name), and the batch range (min, max) of its optimisation profile 0, read from
    the input x (None when the engine has no input x; check_io then names what it has)."""
    trt = import_trt()
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT64: "int64"}
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        io[name] = (mode, names.get(dtype, str(dtype)))
    if io.get("x", ("",))[0] != "input":
        return io, None
    lo, _opt, hi = engine.get_tensor_profile_shape("x", 0)   # the min, opt and max shapes of profile 0
    return io, (lo[0], hi[0])


class TrtNet(_CudaStream):
    """A TensorRT engine file: one execution context per bound call, shapes and addresses set once,
    execute_async_v3 on the net's stream. close() drops the engine and its runtime (every runner's context is
    dropped first, by the runner's close)."""

    name = "trt"
    graph_capturable = True      # enqueued on torch's current stream (the capture stream during capture)

    def __init__(self, engine_path: Path, device):
        import torch

        if not _is_cuda(device):
            raise EngineUnavailable("the trt engine needs a CUDA GPU")
        trt = import_trt()
        self.trt, self.device = trt, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {engine_path}; rebuild it with "
                                    f"`ddpm export --trt`")
        self.runtime: trt.Runtime | None = runtime
        self.engine: trt.ICudaEngine | None = engine
        self.path = Path(engine_path)
        self.io_types, self.batch_range = trt_engine_io(engine)
        check_io(self.io_types, None, str(engine_path))   # now, not when the first runner binds it
        self.dtype = self.io_types["x"][1]
        self.max_batch = self.batch_range[1] if self.batch_range is not None else None
        self._make_stream()

    def make_ops(self) -> TorchOps:
        return TorchOps(self.device)

    def bind(self, x_in, t_in, y_in, eps_out, last_t: int = -1) -> _TrtCall:
        """A call with its own execution context: input shapes and all four tensor addresses set once, here.
        EngineUnavailable when the buffers' names, modes, dtypes or batch do not fit the engine."""
        bufs = {"x": x_in, "t": t_in, "y": y_in, "eps": eps_out}
        check_io(self.io_types, bufs, str(self.path))
        n = x_in.shape[0]
        if self.batch_range is not None and not self.batch_range[0] <= n <= self.batch_range[1]:
            lo, hi = self.batch_range
            raise EngineUnavailable(f"{self.path} runs batches {lo}..{hi}, this runner needs {n}; build an engine "
                                    f"file that covers it (`ddpm export --trt --batch 1-{n}`)")
        assert self.engine is not None, "bind after close"   # RuntimeEngine refuses work once closed
        context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT: create_execution_context failed (out of GPU memory?)")
        for name in ("x", "t", "y"):
            trt_check(context.set_input_shape(name, tuple(bufs[name].shape)),
                      f"set_input_shape({name}, {tuple(bufs[name].shape)}) (outside the engine's batch range?)")
        for name, buf in bufs.items():
            trt_check(context.set_tensor_address(name, buf.data_ptr()), f"set_tensor_address({name})")
        # infer_shapes, not all_binding_shapes_specified: the latter does not see shapes set by name (TensorRT 10 docs)
        missing = context.infer_shapes()
        if missing:
            raise RuntimeError(f"TensorRT: shapes of {', '.join(missing)} are not specified")
        return _TrtCall(context, bufs)

    def versions(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__}

    def close(self) -> None:
        """Drop the engine, then the runtime that deserialized it (TensorRT frees them when the last reference
        goes: its Python API has no destroy())."""
        self.engine = None
        self.runtime = None
        self.stream = None


class _TrtCall:
    """One runner's TensorRT execution context, bound to its buffers; enqueued on torch's current stream (the
    net's stream, or the capture stream while a CUDA graph is captured)."""

    def __init__(self, context: trt.IExecutionContext, bufs: dict):
        self.context: trt.IExecutionContext | None = context
        self.bufs: dict | None = bufs

    def __call__(self) -> None:
        import torch

        assert self.context is not None, "call after close"   # the runner refuses work once closed
        trt_check(self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream), "execute_async_v3")

    def close(self) -> None:
        """Drop the execution context (freed with its last reference) and the buffers it was bound to."""
        self.context = None
        self.bufs = None
