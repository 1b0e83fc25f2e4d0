"""Build a TensorRT engine from an exported ONNX file (TensorRT 10 and 11 Python API).

Written against the documented API but NOT run in this project's workplace (TensorRT cannot be installed here):
see the README. Both versions build a *strongly typed* network, so the engine's precision is the ONNX file's
(fp32 model.onnx or fp16 model_fp16.onnx): TensorRT 11 removed BuilderFlag.FP16 and always types strongly; on 10 the
STRONGLY_TYPED creation flag gives the same behaviour.

Each engine is saved as <onnx stem>_b<min>-<max>.plan beside a .plan.json recording the TensorRT version, the GPU
and the batch range, so a stale engine (other TensorRT or GPU) is detected and rebuilt instead of crashing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.io import atomic_write
from ..schema import Int, Schema, Str

# <engine>.plan.json: what the engine was built for; an engine whose record fails this is rebuilt
PLAN_INFO = Schema("TensorRT engine record (.plan.json)", {
    "tensorrt": Str(), "gpu": Str(), "onnx_sha256": Str(pattern=r"[0-9a-f]{64}"),
    "min_batch": Int(min=1), "max_batch": Int(min=1),
})


class TensorRTUnavailable(Exception):
    pass


INSTALL_HINT = ("TensorRT is not installed: `pip install 'ddpm[gpu]'` (or NVIDIA's `tensorrt` wheels)"
                " on a machine with an NVIDIA GPU and driver")


def import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(INSTALL_HINT) from None
    return trt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible")
    return torch.cuda.get_device_name()


def plan_paths(onnx_path: Path, min_batch: int, max_batch: int) -> tuple[Path, Path]:
    plan = onnx_path.with_name(f"{onnx_path.stem}_b{min_batch}-{max_batch}.plan")
    return plan, plan.with_suffix(".plan.json")


def plan_is_current(onnx_path: Path, min_batch: int, max_batch: int, onnx_sha256: str) -> tuple[bool, str]:
    """(usable, why not) for an existing engine file."""
    trt = import_trt()
    plan, info = plan_paths(onnx_path, min_batch, max_batch)
    if not plan.is_file() or not info.is_file():
        return False, "no engine built yet"
    try:
        meta = json.loads(info.read_text())
        PLAN_INFO.check(meta, info, ValueError)
    except (OSError, ValueError) as e:   # damaged or from another version: build the engine again
        return False, f"{info.name} is unusable ({e})"
    want = {"tensorrt": trt.__version__, "gpu": gpu_name(), "onnx_sha256": onnx_sha256}
    for k, v in want.items():
        if meta.get(k) != v:
            return False, f"engine built for {k}={meta.get(k)!r}, this machine has {v!r}"
    return True, ""


def build_engine(onnx_path: Path, onnx_sha256: str, min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256,
                 workspace_gib: float = 4.0, timing_cache: Path | None = None, log=print) -> Path:
    """ONNX -> serialized engine with one optimisation profile over batch [min, max]; returns the .plan path."""
    trt = import_trt()
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if trt_major(trt) < 11:   # 11 is always strongly typed and has no such flag to set
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]   # (C,H,W) for x, () for t and y
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building TensorRT {trt.__version__} engine for {onnx_path.name} on {gpu}, batch {min_batch}..{max_batch}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan, info = plan_paths(onnx_path, min_batch, max_batch)
    atomic_write(plan, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    meta = {"tensorrt": trt.__version__, "gpu": gpu, "onnx": onnx_path.name, "onnx_sha256": onnx_sha256,
            "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch, "workspace_gib": workspace_gib}
    atomic_write(info, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    if cache is not None:
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize())))
    return plan


def ensure_engine(bundle, precision: str, min_batch: int, max_batch: int, log=print) -> Path:
    """The engine for (precision, batch range) in an export folder, built or rebuilt if missing or stale."""
    onnx_path = bundle.onnx_path(precision)
    sha = bundle.meta["files"][precision]["sha256"]
    ok, why = plan_is_current(onnx_path, min_batch, max_batch, sha)
    if not ok:
        log(f"TensorRT engine: {why}; building it")
        build_engine(onnx_path, sha, min_batch, min(max(min_batch, 64), max_batch), max_batch,
                     timing_cache=bundle.root / "timing.cache", log=log)
    return plan_paths(onnx_path, min_batch, max_batch)[0]
