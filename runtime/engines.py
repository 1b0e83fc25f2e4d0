"""Engines by name: what `ddpm gen --engine`, `ddpm eval` and `ddpm bench` run.

    torch          eager PyTorch, the plain per-step loop (the reference and the baseline)
    runtime-torch  the same PyTorch model inside the preallocated runtime (CUDA graph on a GPU)
    onnx           onnxruntime in the runtime (numpy buffers on a CPU, no PyTorch needed; CUDA EP with IO binding
                   when onnxruntime-gpu and a GPU exist)
    trt            TensorRT in the runtime (needs tensorrt and a GPU; runtime.trt picks the engine file)
    onnx-generator generator.onnx: the whole loop of one deterministic plan in one onnxruntime call (CPU;
                   runtime.generator, export/generator.py)

Every engine is a runtime.engine.Engine (run, versions, what it supports, close). Only `torch`, `runtime-torch`,
`trt` and GPUs import PyTorch; `onnx` on a CPU and `onnx-generator` run on the base install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import LimitReached, OptionError, import_refusal, raise_if_limit
from ..options import generator_refusal, precision_refusal
from .engine import Engine
from .nets import EngineUnavailable, OnnxNet
from .runner import RuntimeEngine
from .samplers import Plan

ENGINES = ("torch", "runtime-torch", "onnx", "trt", "onnx-generator")
NEEDS_EXPORT = ("onnx", "trt", "onnx-generator")
NEEDS_TORCH = ("torch", "runtime-torch", "trt")
from ..model.io import TORCH_HINT  # noqa: E402  (torch-free: model.io imports PyTorch lazily)


def _nvidia_driver_absent() -> bool:
    """True where no CUDA GPU can be visible (Linux without the NVIDIA driver, or CUDA_VISIBLE_DEVICES empty), so
    that `auto` need not import PyTorch (2-5 s) to find out."""
    import glob
    import os
    import sys

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version") \
        and not glob.glob("/dev/nvidia[0-9]*")


def have_torch() -> bool:
    """Whether PyTorch can be imported; errors.LimitReached when it is installed but a resource limit (ulimit -v)
    stops it from loading, or would abort it in native code (errors.import_refusal, checked before the import, as
    model.io.require does)."""
    refusal = import_refusal("torch", "PyTorch")
    if refusal is not None:
        raise LimitReached(refusal)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise_if_limit(e)
        return False
    return True


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when PyTorch sees a GPU, else 'cpu'; 'cpu', 'cuda', 'cuda:N' checked. OptionError (a
    ValueError naming option "device") otherwise."""
    name = str(name)
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise OptionError(f"unknown device {name!r}: auto, cpu, cuda or cuda:N", "device")
    if name == "cpu" or (name == "auto" and _nvidia_driver_absent()):
        return "cpu"
    cuda = False
    if have_torch():
        import torch

        cuda = torch.cuda.is_available()
        if cuda and name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise OptionError(f"no GPU {name} (this machine has {torch.cuda.device_count()})", "device")
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if not cuda:
        raise OptionError("no CUDA GPU is available" + ("" if have_torch() else f" (and no PyTorch: {TORCH_HINT})"),
                          "device")
    return name


def auto_engine(device: str) -> str:
    """What `--engine auto` runs: the fastest engine that needs nothing beyond the base install on this device.

    On a GPU the PyTorch model in the runtime (one CUDA graph); on a CPU onnxruntime (measured 1.6-2.4x faster than
    eager PyTorch, README "Benchmarks"). Both give the same digits as the eager reference (within 1 grey level).
    """
    return "runtime-torch" if str(device).startswith("cuda") else "onnx"


# build_trt(bundle, precision, min_batch, max_batch, opt_batch, log) -> the engine file it built and saved
# (export.trt.build_bundle_engine): what make_engine calls when no engine file of the export folder fits
BuildTrt = Callable[..., Path]


# int8 (export/int8.py): the rows whose noise level sigma = sqrt((1 - abar_t) / abar_t) is at most this run the fp32
# model. The last rows' x0_hat is the output, and their eps error, times sigma, lands in the digit with no later row
# to correct it. Measured on 500 digits of the default sampler (docs/int8.md): with every row int8, 99-100% of them
# have a pixel above 2 grey levels in their 1-pixel frame whichever Convs stay fp32 (fp32: 71.2%, 68.4% at another
# seed); with the last row (t = 124, sigma 0.43) fp32, 75.8%; with the last two (t = 249, sigma 0.95) 71.4%, as fp32,
# and a mean difference from the fp32 digits of 0.80 grey levels (1.44 with every row int8). 4 of the default plan's
# 12 network images per digit then run fp32. The plan's last network row runs fp32 whatever its sigma (the runner's
# last_t, runtime.nets.OnnxNet.bind): its x0_hat is the output in a plan of 1-3 trailing steps too.
INT8_FP32_SIGMA = 1.0


def int8_fp32_max_t(alphas_cumprod) -> int:
    """The largest t whose sigma is at most INT8_FP32_SIGMA (-1: none): the int8 engine runs t <= it in fp32."""
    import numpy as np

    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    below = np.flatnonzero(np.sqrt((1 - abar) / abar) <= INT8_FP32_SIGMA)
    return int(below[-1]) if len(below) else -1


def int8_fp32_rows(plan: Plan, alphas_cumprod):
    """(S,) bool: the rows of `plan` that the int8 engine runs with the fp32 model: those at t <= int8_fp32_max_t
    and those at or below the plan's last network row (runtime.nets.OnnxNet.bind's rule). generator.onnx's int8 form
    (export/generator.py) calls model.onnx on these rows and model_int8.onnx on the others."""
    import numpy as np

    ts = np.asarray(plan.timesteps, dtype=np.int64)
    net_rows = np.flatnonzero(plan.calls_net)
    last_t = int(ts[net_rows[-1]]) if len(net_rows) else -1
    return ts <= max(int8_fp32_max_t(alphas_cumprod), last_t)


def make_engine(name: str, *, device: str = "cpu", model=None, null_label: int = 10, bundle=None, fp16: bool = False,
                cuda_graph: bool = True, max_batch: int = 512, threads: int | None = None, plan: Plan | None = None,
                build_trt: BuildTrt | None = None, log=print, int8: bool = False) -> Engine:
    """An engine ready to run (runtime.engine.Engine; close it, or use it in a `with` block, to free it).

    model: a torch UNet, needed by torch/runtime-torch; bundle: an export folder (runtime.bundle.Bundle), needed by
    onnx/trt/onnx-generator, whose null label and image shape win over null_label and the model's. max_batch: the
    largest batch the network will run at (runtime.generate.network_batch); trt runs an engine file that covers
    1..max_batch (runtime.trt.find_engine), and when there is none has build_trt build one optimised for max_batch
    (None: EngineUnavailable naming `ddpm export --trt`). plan: the plan the engine will run, which onnx-generator
    needs to find its generator.onnx. threads: onnxruntime's CPU threads (runtime.nets.ort_cpu_options). log(line):
    where a one-time build says what it does. int8: the onnx engine on a CPU with the export's model_int8.onnx
    (its rows at sigma <= INT8_FP32_SIGMA, and each plan's last network row, with model.onnx: int8_fp32_rows), or
    onnx-generator with the plan's int8 generator (the same rows in one model). Raises EngineUnavailable with what
    is missing.
    """
    device = str(device)
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    why = precision_refusal(name, device, fp16, int8)   # options.Sampling refuses the same before any file look-up
    if why:
        raise EngineUnavailable(why)
    if (name in NEEDS_TORCH or (device.startswith("cuda") and name != "onnx-generator")) and not have_torch():
        raise EngineUnavailable(f"the {name} engine{' on a GPU' if name == 'onnx' else ''} needs PyTorch: {TORCH_HINT}")
    if name in ("torch", "runtime-torch") and model is None:
        raise EngineUnavailable(f"the {name} engine needs the PyTorch model (a checkpoint), not only an export")
    if name in NEEDS_EXPORT and bundle is None:
        raise EngineUnavailable(f"the {name} engine needs an export folder (`ddpm export`)")
    if name == "onnx-generator":
        from .generator import GeneratorEngine

        why, _ = generator_refusal(name, device, fp16)   # options.Sampling refuses the same as a usage error
        if why:
            raise EngineUnavailable(why)
        return GeneratorEngine.from_bundle(bundle, threads, plan, int8)
    if name == "torch":
        from .eager import EagerEngine

        if fp16:
            raise EngineUnavailable("the eager torch engine is the fp32 reference; use --engine runtime-torch --fp16")
        return EagerEngine(model, null_label, device)
    precision = "fp16" if fp16 else "fp32"
    if int8:
        net = OnnxNet(bundle.onnx_path("int8"), device, threads, fp32_path=bundle.onnx_path("fp32"),
                      fp32_max_t=int8_fp32_max_t(bundle.meta["alphas_cumprod"]))
    elif name == "runtime-torch":
        from .nets import TorchNet

        net = TorchNet(model, device, "float16" if fp16 else "float32")
    elif name == "onnx":
        net = OnnxNet(bundle.onnx_path(precision), device, threads)
    else:
        from .trt import TrtNet, find_engine

        if not device.startswith("cuda"):
            raise EngineUnavailable("the trt engine needs a CUDA GPU (none selected or available)")
        path, why = find_engine(bundle, precision, 1, max_batch, max_batch)
        if path is None:
            if build_trt is None:
                raise EngineUnavailable(f"no TensorRT engine file in {bundle.root} runs batch 1..{max_batch} "
                                        f"({why}); build one with `ddpm export --trt --batch 1-{max_batch}`")
            log(f"TensorRT engine for batch 1..{max_batch}: {why}; building one")
            path = build_trt(bundle, precision, 1, max_batch, max_batch, log)
        net = TrtNet(path, device)
    if bundle is not None:
        null_label, image_shape = bundle.null_label, bundle.image_shape
    else:
        image_shape = model.cfg.image_shape   # the model's (C, H, W)
    return RuntimeEngine(net, null_label, image_shape, cuda_graph=cuda_graph)


def engine_versions(engine: Engine) -> dict[str, str]:
    """The versions behind an engine's digits: PyTorch's (when installed) and the engine's own (Engine.versions)."""
    v = {}
    if have_torch():
        import torch

        v["torch"] = torch.__version__
    v.update(engine.versions())
    return v
