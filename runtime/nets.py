"""Noise predictors for the preallocated runtime. A net hands out *bound calls*, each tied to one runner's buffers:

    call = net.bind(x_in, t_in, y_in, eps_out, last_t)   # once, when the runner is built
    call()                                               # eps_out <- eps_theta(x_in, t_in, y_in), every step

last_t is the t of the runner's plan's last network row, whose x0_hat is the output: a net that runs a reduced
precision model (int8: OnnxNet with fp32_path) runs the rows at t <= last_t at full precision; the others ignore it.

Every bound call owns its binding (onnxruntime IO bindings, a TensorRT execution context with its own shapes and
addresses, the torch tensors), so two runners of one net never see each other's buffers; its `close()` drops them.
A net's `close()` drops what the net holds (the model copy, the onnxruntime session); its runners close first. Buffers: x_in/eps_out
(N,C,H,W) in the net's dtype, t_in/y_in (N,) int64, all on the net's device, as the arrays of `net.make_ops()`
(numpy on a CPU for onnxruntime; torch tensors otherwise). Nothing is returned and nothing is allocated by the
caller. On a GPU every net works on its own CUDA stream (`stream_context()`), never the legacy default stream.
`max_batch` is the largest network batch a net runs (None: any). The TensorRT net is runtime.trt.TrtNet.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DdpmError, brief, clip, raise_if_limit
from .ops import NumpyOps, TorchOps

class EngineUnavailable(DdpmError):
    """An engine that cannot run here; the message names what is missing."""


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # no affinity masks on macOS and Windows
        return os.cpu_count() or 1


# onnxruntime's CPU thread pool, chosen on a busy machine (bench/threads.py, bench/threads.md): as many intra-op
# threads as CPUs this process may use (onnxruntime's own default counts the machine's physical cores, whatever the
# affinity mask), and the pool's threads sleep when idle instead of spinning: a spinning pool burns the CPU time
# that other processes need and then waits for it, which costs far more under load than the wake-ups cost when
# the machine is quiet.
ORT_THREADS: int | None = None   # None: cpu_count()
ORT_SPINNING = False


_IMPORT_LOCK = threading.Lock()   # fd 2 is the process's: one quiet import at a time


@contextmanager
def stderr_silenced():
    """While the block runs, what is written to file descriptor 2 (by C and C++ code too) is dropped, and Python's
    warnings are held and issued after it. Unchanged when no descriptor is left for the swap."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):   # no descriptor left, or no stderr
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        os.dup2(null, 2)
        os.close(null)
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("default")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def import_onnxruntime(what: str):
    """The onnxruntime module for `what` (e.g. "the onnx engine"). Imported once without its own output: on import
    onnxruntime's environment, and the cpuinfo library under it, print warnings to stderr when the process is short
    of something (descriptors under `ulimit -n`: 9 lines before the error), before any of its logging settings can
    be made; its default logger is then set to errors only (sessions log fatal errors only, ort_cpu_options). An
    error is an exception, reported in one line. Raises errors.LimitReached when a resource limit stopped the
    import, EngineUnavailable when onnxruntime is not installed."""
    with _IMPORT_LOCK:
        try:
            if "onnxruntime" in sys.modules:
                import onnxruntime as ort
            else:
                with stderr_silenced():
                    import onnxruntime as ort
                ort.set_default_logger_severity(3)
        except ImportError as e:
            raise_if_limit(e)
            raise EngineUnavailable(f"{what} needs onnxruntime: pip install onnxruntime") from None
        except OSError as e:   # a file of the package that cannot be opened, e.g. too many open files
            raise_if_limit(e)
            raise
    return ort


def ort_cpu_options(ort, threads: int | None = None, spinning: bool | None = None):
    """onnxruntime SessionOptions for the CPU: `threads` intra-op threads (None: ORT_THREADS, else cpu_count(); 0:
    onnxruntime's own default), one inter-op thread, sequential execution, full graph optimisation, spinning of
    idle pool threads as `spinning` (None: ORT_SPINNING). `ort`: the onnxruntime module."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads if threads is not None else (ORT_THREADS if ORT_THREADS is not None
                                                                    else cpu_count())
    so.inter_op_num_threads = 1
    so.log_severity_level = 4   # fatal only: an error reaches Python as an exception, which the CLI reports in one line
    spin = ORT_SPINNING if spinning is None else spinning
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    return so


def recorded_weights(sess, key: str) -> str | None:
    """The checkpoint_hash that an ONNX file's own record (its metadata_props entry `key`: "ddpm" for an eps model,
    "ddpm_generator" for a generator; export/onnx_export.py, export/generator.py) names, read from the onnxruntime
    session; None when the file holds no such record."""
    import json

    try:
        record = json.loads(sess.get_modelmeta().custom_metadata_map.get(key, "null"))
    except (ValueError, AttributeError):
        return None
    value = record.get("checkpoint_hash") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def ort_session(ort, path, so, providers):
    """ort.InferenceSession of the file `path` (any name the OS can give, files.readable_name), or of the bytes a
    runtime.bundle.CheckedPath holds (those an export folder's check read: not the file again, which may have been
    replaced since). Raises EngineUnavailable for a file onnxruntime cannot load; a failure that a resource limit
    caused (out of memory, too many open files: errors.limit_message) is raised as it is, for the CLI to name the
    limit."""
    from ..errors import limit_message
    from ..files import readable_name

    data = getattr(path, "data", None)
    try:
        # no fallback: onnxruntime would print an "EP Error" block and retry with the same CPU provider
        if data is not None:
            return ort.InferenceSession(data, so, providers=providers, enable_fallback=0)
        with readable_name(path) as name:
            return ort.InferenceSession(name, so, providers=providers, enable_fallback=0)
    except Exception as e:   # onnxruntime raises its own exception types for bad files
        if limit_message(e) is not None:
            raise
        raise EngineUnavailable(f"onnxruntime cannot load {path}: {clip(e)}") from None


class _CudaStream:
    """Mixin: the net's own CUDA stream (TensorRT warns that the legacy default stream adds device syncs)."""

    stream = None
    device: Any

    def _make_stream(self) -> None:
        if _is_cuda(self.device):
            import torch

            self.stream = torch.cuda.Stream(torch.device(self.device))

    def stream_context(self):
        if self.stream is None:
            return nullcontext()
        import torch

        return torch.cuda.stream(self.stream)


class TorchNet(_CudaStream):
    """The PyTorch model itself (fp32 or fp16) inside the runtime: torch tensors, CUDA-graph capturable."""

    name = "runtime-torch"
    graph_capturable = True      # its kernels run on torch's current stream, so a CUDA graph can capture them
    max_batch = None

    def __init__(self, model, device, dtype: str = "float32"):
        import torch

        from ..model.io import copy_to

        self.device = torch.device(device)
        self.dtype = dtype
        self.model = copy_to(model, self.device, getattr(torch, dtype))   # the caller's model stays as it was
        self._make_stream()

    def make_ops(self) -> TorchOps:
        return TorchOps(self.device)

    def bind(self, x_in, t_in, y_in, eps_out, last_t: int = -1) -> _TorchCall:
        return _TorchCall(self.model, (x_in, t_in, y_in), eps_out)

    def versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}

    def close(self) -> None:
        """Drop the model copy (its weights) and the stream."""
        self.model = None
        self.stream = None


class _TorchCall:
    """One runner's call of the PyTorch model on its tensors: eps_out <- model(x_in, t_in, y_in)."""

    def __init__(self, model, inputs: tuple, eps_out):
        self.model, self.inputs, self.eps_out = model, inputs, eps_out

    def __call__(self) -> None:
        import torch

        with torch.no_grad():
            self.eps_out.copy_(self.model(*self.inputs))

    def close(self) -> None:
        """Drop the model and the tensors it was bound to."""
        self.model = self.inputs = self.eps_out = None


_ORT_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_ORT_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
IO = (("x", "input"), ("t", "input"), ("y", "input"), ("eps", "output"))


def _buffer_dtype(buf) -> str:
    return str(buf.dtype).replace("torch.", "")


def check_io(found: dict, bufs: dict | None, what: str) -> None:
    """found: name -> (mode, dtype) of the model's I/O; bufs: name -> buffer (None: names and modes only, as soon as
    the model is loaded). Raise EngineUnavailable on mismatch."""
    want = {name: mode for name, mode in IO}
    if set(found) != set(want):
        raise EngineUnavailable(f"{what} has inputs/outputs {brief(sorted(found))}, the runtime needs x, t, y -> "
                                f"eps; re-export it with `ddpm export`")
    for name, mode in want.items():
        got_mode, got_dtype = found[name]
        if got_mode != mode:
            raise EngineUnavailable(f"{what}: tensor {name!r} is an {got_mode}, the runtime binds it as an {mode}")
        if bufs is None:
            if got_dtype not in _ORT_TYPES:
                raise EngineUnavailable(f"{what}: tensor {name!r} has type {brief(got_dtype)}, which the runtime "
                                        f"cannot bind; "
                                        f"re-export it with `ddpm export`")
            continue
        if got_dtype != _buffer_dtype(bufs[name]):
            raise EngineUnavailable(f"{what}: tensor {name!r} is {got_dtype}, the runner's buffer is "
                                    f"{_buffer_dtype(bufs[name])}")


class OnnxNet(_CudaStream):
    """onnxruntime with IO binding to the runner's buffers: CUDA EP on a GPU (onnxruntime-gpu), else the CPU EP.

    CPU: numpy buffers (no PyTorch needed), the batch run in slices of at most `chunk` images, one call each, every
    slice bound once to views of the runner's buffers. Per image, onnxruntime's CPU convolutions are fastest at about
    16 images: a 128-image call is 25-40% slower per image, its activations no longer fit the caches (README
    "Benchmarks"). GPU: torch tensors, the whole batch in one call, on the net's stream.
    """

    name = "onnx"
    # ORT launches on the stream it was created with, not on a capture stream: the runner does not capture it
    # (onnxruntime's own CUDA-graph mode would be the way, see README)
    graph_capturable = False
    max_batch = None
    CPU_CHUNK = 16

    def __init__(self, onnx_path: Path, device="cpu", threads: int | None = None, chunk: int | None = None,
                 spinning: bool | None = None, fp32_path: Path | None = None, fp32_max_t: int = -1):
        ort = import_onnxruntime("the onnx engine")
        self.device = str(device)
        so = ort_cpu_options(ort, threads, spinning)   # threads, spinning: None = the defaults above
        if _is_cuda(self.device):
            import torch

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable("the onnx engine on a GPU needs onnxruntime-gpu (this onnxruntime has "
                                        f"{', '.join(ort.get_available_providers())}): pip install 'ddpm[gpu]'")
            self.stream = stream = torch.cuda.Stream(torch.device(self.device))
            # ORT launches on the net's stream, so the runner's in-place ops and ORT's kernels stay ordered
            # without any host synchronisation.
            providers = [("CUDAExecutionProvider", {"device_id": torch.device(self.device).index or 0,
                                                    "user_compute_stream": str(stream.cuda_stream),
                                                    "do_copy_in_default_stream": "0"})]
        else:
            providers = ["CPUExecutionProvider"]
        self.sess = ort_session(ort, onnx_path, so, providers)
        self.path = Path(onnx_path)
        self.weights = recorded_weights(self.sess, "ddpm")   # the weights it computes (Engine.weights)
        # rows at t <= fp32_max_t run the fp32 model at fp32_path instead (the int8 model's last rows: runtime.engines),
        # and so do those at or below the plan's last network row (bind's last_t)
        self.fp32_max_t = fp32_max_t
        self.fp32_sess = None if fp32_path is None else ort_session(ort, fp32_path, so, providers)
        io = {a.name: ("input", _ORT_NAMES.get(a.type, a.type)) for a in self.sess.get_inputs()}
        io.update({a.name: ("output", _ORT_NAMES.get(a.type, a.type)) for a in self.sess.get_outputs()})
        self.io_types = io
        check_io(io, None, str(onnx_path))   # now, not when the first runner binds it inside a generation
        self.dtype = io["x"][1]
        # with fp32_path the model at onnx_path is model_int8.onnx: float32 in and out, int8 convolutions
        self.precision = "int8" if fp32_path is not None else "fp16" if self.dtype == "float16" else "fp32"
        self.provider = self.sess.get_providers()[0]
        self.chunk = chunk or (None if _is_cuda(self.device) else self.CPU_CHUNK)

    def make_ops(self):
        return TorchOps(self.device) if _is_cuda(self.device) else NumpyOps()

    def bind(self, x_in, t_in, y_in, eps_out, last_t: int = -1):
        """A call with its own IO bindings: one per slice of the batch (one in all on a GPU), each to views of the
        given buffers. With fp32_path, its rows at t <= max(fp32_max_t, last_t) run the fp32 model: those at sigma
        <= runtime.engines.INT8_FP32_SIGMA, and always the plan's last network row (last_t), whose x0_hat is the
        output, whatever its sigma (a plan of 1-3 trailing steps, a distilled student)."""
        bufs = {"x": x_in, "t": t_in, "y": y_in, "eps": eps_out}
        check_io(self.io_types, bufs, str(self.path))
        if _is_cuda(self.device):
            import torch

            dev, idx, ptr = "cuda", torch.device(self.device).index or 0, (lambda a: a.data_ptr())
        else:
            dev, idx, ptr = "cpu", 0, (lambda a: a.ctypes.data)
        n = x_in.shape[0]
        step = self.chunk or n

        def bound(sess):
            bindings = []
            for lo in range(0, n, step):
                b = sess.io_binding()
                for name, buf in bufs.items():
                    part = buf[lo:lo + step]
                    bind = b.bind_output if name == "eps" else b.bind_input
                    bind(name, dev, idx, _ORT_TYPES[_buffer_dtype(buf)], list(part.shape), ptr(part))
                bindings.append(b)
            return bindings

        call = _OnnxCall(self.sess, bound(self.sess), bufs)
        if self.fp32_sess is not None:
            call.fp32 = _OnnxCall(self.fp32_sess, bound(self.fp32_sess), bufs)
            call.fp32_max_t = max(self.fp32_max_t, last_t)
        return call

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "provider": self.provider}

    def close(self) -> None:
        """Drop the onnxruntime session (onnxruntime frees it, its arena and its CUDA provider with the last
        reference; the runners' IO bindings are cleared and dropped first) and the stream."""
        self.sess = self.fp32_sess = None
        self.stream = None


class _OnnxCall:
    """One runner's bound onnxruntime call (it keeps the buffers alive with the bindings). With `fp32` (another
    _OnnxCall on the same buffers), a call whose t (the runner's t_in holds one row's t) is at most fp32_max_t
    runs that one instead."""

    fp32: "_OnnxCall | None" = None
    fp32_max_t = -1

    def __init__(self, sess, bindings, bufs):
        self.sess, self.bindings, self.bufs = sess, bindings, bufs

    def __call__(self) -> None:
        if self.fp32 is not None and int(self.bufs["t"][0]) <= self.fp32_max_t:
            self.fp32()
            return
        for b in self.bindings:
            self.sess.run_with_iobinding(b)

    def close(self) -> None:
        """Clear the IO bindings (onnxruntime's references to the buffers) and drop them, the session and the
        buffers."""
        for b in self.bindings:
            b.clear_binding_inputs()
            b.clear_binding_outputs()
        if self.fp32 is not None:
            self.fp32.close()
        self.sess, self.bindings, self.bufs, self.fp32 = None, [], None, None
