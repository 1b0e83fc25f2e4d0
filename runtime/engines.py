"""Engines by name: what `ddpm gen --engine`, `ddpm eval` and `ddpm bench` run.

    torch          eager PyTorch, the plain per-step loop (the reference and the baseline)
    runtime-torch  the same PyTorch model inside the preallocated runtime (CUDA graph on a GPU)
    onnx           onnxruntime in the runtime (CUDA EP with IO binding when onnxruntime-gpu and a GPU exist, else CPU)
    trt            TensorRT in the runtime (needs tensorrt and a GPU)
"""

from __future__ import annotations

import torch

from .generate import EagerEngine
from .nets import EngineUnavailable, OnnxNet, TorchNet, TrtNet
from .runner import RuntimeEngine

ENGINES = ("torch", "runtime-torch", "onnx", "trt")
NEEDS_EXPORT = ("onnx", "trt")


def auto_engine(device: torch.device | str) -> str:
    """What `--engine auto` runs: the fastest engine that needs nothing beyond the base install on this device.

    On a GPU the PyTorch model in the runtime (one CUDA graph); on a CPU onnxruntime (measured 1.6-2.4x faster than
    eager PyTorch, README "Benchmarks"). Both give the same digits as the eager reference (within 1 grey level).
    """
    return "runtime-torch" if torch.device(device).type == "cuda" else "onnx"


def make_engine(name: str, device: torch.device | str, model: torch.nn.Module | None = None, null_label: int = 10,
                bundle=None, fp16: bool = False, cuda_graph: bool = True, threads: int | None = None,
                max_batch: int = 512, log=print):
    """An engine ready to run. `model` is needed by torch/runtime-torch, `bundle` (an export folder) by onnx/trt."""
    device = torch.device(device)
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    if name == "torch":
        if fp16:
            raise EngineUnavailable("the eager torch engine is the fp32 reference; use --engine runtime-torch --fp16")
        return EagerEngine(model, null_label, device)
    if name == "runtime-torch":
        net = TorchNet(model, device, torch.float16 if fp16 else torch.float32)
    elif name == "onnx":
        net = OnnxNet(bundle.onnx_path("fp16" if fp16 else "fp32"), device, threads)
    else:
        from ..export.trt import TensorRTUnavailable, ensure_engine

        if device.type != "cuda":
            raise EngineUnavailable("the trt engine needs a CUDA GPU (none selected or available)")
        try:
            plan = ensure_engine(bundle, "fp16" if fp16 else "fp32", 1, max_batch, log=log)
        except TensorRTUnavailable as e:
            raise EngineUnavailable(str(e)) from None
        net = TrtNet(plan, device)
    null = bundle.null_label if bundle is not None else null_label
    shape = bundle.image_shape if bundle is not None else (1, 28, 28)
    return RuntimeEngine(net, null, shape, cuda_graph=cuda_graph)


def engine_versions(engine) -> dict:
    net = getattr(engine, "net", None)
    v = {"torch": torch.__version__}
    if net is not None:
        v.update(net.versions())
    return v
