"""Noise predictors for the preallocated runtime: each binds its inputs/outputs ONCE to buffers the runner owns.

    net = SomeNet(...); net.bind(x_in, t_in, y_in, eps_out); net()   # eps_out <- eps_theta(x_in, t_in, y_in)

After bind() the net reads its inputs from and writes its output into those exact buffers on every call; nothing is
returned and nothing is allocated by the caller. Buffers: x_in/eps_out (N,C,H,W) in the net's dtype, t_in/y_in (N,)
int64, all on the net's device. Rebinding is needed only when the runner allocates new buffers (another batch size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.io import copy_to


class EngineUnavailable(Exception):
    """An engine that cannot run here; the message names what is missing."""


class TorchNet:
    """The PyTorch model itself (fp32 or fp16) inside the runtime: same buffers, CUDA-graph capturable."""

    name = "runtime-torch"
    computes_with_torch = True   # the runner must leave torch's CPU threads to it
    graph_capturable = True      # its kernels run on torch's current stream, so a CUDA graph can capture them

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model = copy_to(model, device, dtype)   # the caller's model (the eager reference) stays fp32
        self.device, self.dtype = device, dtype

    def bind(self, x_in, t_in, y_in, eps_out) -> None:
        self.io = (x_in, t_in, y_in, eps_out)

    @torch.no_grad()
    def __call__(self) -> None:
        x_in, t_in, y_in, eps_out = self.io
        eps_out.copy_(self.model(x_in, t_in, y_in))

    def versions(self) -> dict:
        return {"torch": torch.__version__}


_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OnnxNet:
    """onnxruntime with IO binding to the runner's buffers: CUDA EP on a GPU (onnxruntime-gpu), else the CPU EP.

    GPU: the whole batch in one call. CPU: the batch in slices of at most `chunk` images, one call each, every slice
    bound once to views of the runner's buffers. Per image, onnxruntime's CPU convolutions are fastest at about 16
    images: a 128-image call is 25-40% slower per image, its activations no longer fit the caches (README
    "Benchmarks").
    """

    name = "onnx"
    computes_with_torch = False
    # ORT launches on the stream it was created with, not on a capture stream: the runner does not capture it
    # (onnxruntime's own CUDA-graph mode would be the way, see README)
    graph_capturable = False
    CPU_CHUNK = 16

    def __init__(self, onnx_path: Path, device: torch.device, threads: int | None = None, chunk: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineUnavailable("the onnx engine needs onnxruntime: pip install onnxruntime") from None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable("the onnx engine on a GPU needs onnxruntime-gpu (this onnxruntime has "
                                        f"{', '.join(ort.get_available_providers())}): pip install 'ddpm[gpu]'")
            # ORT launches on torch's current stream, so the runner's in-place ops and ORT's kernels stay ordered
            # without any host synchronisation.
            stream = torch.cuda.current_stream(device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0, "user_compute_stream": str(stream),
                                                    "do_copy_in_default_stream": "0"})]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.sess = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as e:   # onnxruntime raises its own exception types for bad files
            raise EngineUnavailable(f"onnxruntime cannot load {onnx_path}: {e}") from None
        self.device = device
        self.dtype = torch.float16 if self.sess.get_inputs()[0].type == "tensor(float16)" else torch.float32
        self.provider = self.sess.get_providers()[0]
        self.chunk = chunk or (None if device.type == "cuda" else self.CPU_CHUNK)

    def bind(self, x_in, t_in, y_in, eps_out) -> None:
        """One IO binding per slice of the batch (one in all on a GPU), each to views of the runner's buffers."""
        dev, idx = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        n = x_in.shape[0]
        step = self.chunk or n
        self.bindings = []
        for lo in range(0, n, step):
            b = self.sess.io_binding()
            for name, buf in (("x", x_in), ("t", t_in), ("y", y_in), ("eps", eps_out)):
                part = buf[lo:lo + step]
                bind = b.bind_output if name == "eps" else b.bind_input
                bind(name, dev, idx, _ORT_TYPES[buf.dtype], list(part.shape), part.data_ptr())
            self.bindings.append(b)
        self.io = (x_in, t_in, y_in, eps_out)   # keep the buffers alive with the bindings

    def __call__(self) -> None:
        for b in self.bindings:
            self.sess.run_with_iobinding(b)

    def versions(self) -> dict:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "provider": self.provider}


def trt_check(ok, what: str) -> None:
    """Every TensorRT call that reports success as a bool goes through here."""
    if not ok:
        raise RuntimeError(f"TensorRT: {what} failed")


class TrtNet:
    """A TensorRT engine: tensor addresses bound once, execute_async_v3 on torch's current stream.

    Written against the TensorRT 10/11 Python API; not run in this project's workplace (see README).
    """

    name = "trt"
    computes_with_torch = False
    graph_capturable = True      # enqueued on torch's current stream (the capture stream during capture)

    def __init__(self, plan_path: Path, device: torch.device):
        from ..export.trt import TensorRTUnavailable, import_trt

        if device.type != "cuda":
            raise EngineUnavailable("the trt engine needs a CUDA GPU")
        try:
            trt = import_trt()
        except TensorRTUnavailable as e:
            raise EngineUnavailable(str(e)) from None
        self.trt, self.device = trt, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {plan_path}; rebuild it with `ddpm export --trt`")
        self.context = self.engine.create_execution_context()
        self.dtype = torch.float16 if self.engine.get_tensor_dtype("x") == trt.DataType.HALF else torch.float32

    def bind(self, x_in, t_in, y_in, eps_out) -> None:
        for name, buf in (("x", x_in), ("t", t_in), ("y", y_in)):
            trt_check(self.context.set_input_shape(name, tuple(buf.shape)), f"set_input_shape({name}, {tuple(buf.shape)})")
        for name, buf in (("x", x_in), ("t", t_in), ("y", y_in), ("eps", eps_out)):
            trt_check(self.context.set_tensor_address(name, buf.data_ptr()), f"set_tensor_address({name})")
        self.io = (x_in, t_in, y_in, eps_out)

    def __call__(self) -> None:
        trt_check(self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream), "execute_async_v3")

    def versions(self) -> dict:
        return {"tensorrt": self.trt.__version__}
