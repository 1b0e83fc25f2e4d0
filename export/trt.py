"""Build a TensorRT engine from an exported ONNX file (TensorRT 10 and 11 Python API).

Written against the documented API but NOT run in this project's workplace (TensorRT cannot be installed here):
see the README. The calls are type-checked against the TensorRT 10.13 stubs in the test suite
(tests/test_trt_typing.py, which also lists what the stubs cannot see of TensorRT 11). Both versions build a
*strongly typed* network, so the engine's precision is the ONNX file's (fp32 model.onnx or fp16 model_fp16.onnx):
TensorRT 11 removed BuilderFlag.FP16 and always types strongly (its STRONGLY_TYPED creation flag is ignored); on 10
the STRONGLY_TYPED creation flag gives the same behaviour.

Each engine is saved as <onnx stem>_b<min>-<max>.plan beside a .plan.json recording the TensorRT version, the GPU,
the ONNX file's sha256 and the batch range (one optimisation profile: min, opt, max). `ensure_engine` reuses any
current engine whose batch range covers the one asked for (`ddpm export --trt` builds 1-256; `gen --batch 64` with
guidance asks for 1-128 and reuses it), and builds one when none does. An engine of another TensorRT version, GPU
or ONNX file is stale and never used: one is built in its place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import brief
from ..model.io import atomic_write


class TensorRTUnavailable(Exception):
    pass


INSTALL_HINT = ("TensorRT is not installed: `pip install 'ddpm[gpu]'` (or NVIDIA's `tensorrt` wheels)"
                " on a machine with an NVIDIA GPU and driver")
DEFAULT_OPT_BATCH = 64   # the optimisation batch of `ddpm export --trt`, which does not know the batch to come


def import_trt():
    """The tensorrt module, or TensorRTUnavailable with the install hint."""
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
    """(engine file, its .plan.json) of the engine built from onnx_path for batches min_batch..max_batch."""
    plan = onnx_path.with_name(f"{onnx_path.stem}_b{min_batch}-{max_batch}.plan")
    return plan, plan.with_suffix(".plan.json")


def engine_files(onnx_path: Path) -> list[tuple[Path, dict]]:
    """Every engine built from this ONNX file in its folder: (engine file, its .plan.json contents), sorted by name.
    Engines whose .plan.json is missing or unreadable, or either of which links outside the folder, are left out
    (they cannot be checked, so never reused)."""
    name = re.compile(rf"{re.escape(onnx_path.stem)}_b\d+-\d+\.plan")
    found = []
    for plan in sorted(onnx_path.parent.glob(f"{onnx_path.stem}_b*.plan")):
        info = plan.with_suffix(".plan.json")
        if not name.fullmatch(plan.name) or not info.is_file() \
                or {plan.resolve().parent, info.resolve().parent} != {onnx_path.parent.resolve()}:   # links out
            continue
        try:
            meta = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            found.append((plan, meta))
    return found


def choose_engine(candidates: list[tuple[Path, dict]], want: dict, min_batch: int, max_batch: int,
                  opt_batch: int) -> tuple[Path | None, str]:
    """The engine to reuse for batches min_batch..max_batch, or (None, why none fits).

    candidates: (engine file, .plan.json contents) as from engine_files; want: what the engine must have been built
    for ({"tensorrt": version, "gpu": name, "onnx_sha256": hash}). Usable: built for `want` and its batch range
    covers min_batch..max_batch. Among usable engines, one optimised for opt_batch first, then the narrowest range.
    """
    usable, why = [], []
    for plan, meta in candidates:
        stale = [f"{k}={brief(meta.get(k))}, this machine has {v!r}" for k, v in want.items() if meta.get(k) != v]
        lo, hi = meta.get("min_batch"), meta.get("max_batch")
        if stale:
            why.append(f"{plan.name} is stale (built for {stale[0]})")
        elif not (isinstance(lo, int) and isinstance(hi, int) and lo <= min_batch and max_batch <= hi):
            why.append(f"{plan.name} covers batch {lo}..{hi}")
        else:
            usable.append((meta.get("opt_batch") != opt_batch, hi - lo, plan.name, plan))
    if usable:
        return min(usable)[3], ""
    return None, "; ".join(why) or "no engine built yet"


def build_engine(onnx_path: Path, onnx_sha256: str, min_batch: int = 1, opt_batch: int = DEFAULT_OPT_BATCH,
                 max_batch: int = 256, workspace_gib: float = 4.0, timing_cache: Path | None = None,
                 log=print) -> Path:
    """ONNX -> serialized engine with one optimisation profile over batch [min, max], tuned for opt_batch.

    Every input keeps its ONNX shape after the batch dimension (x: (B,1,28,28), t and y: (B,)). Writes the engine
    and its .plan.json atomically; returns the engine file. RuntimeError when TensorRT cannot parse or build.
    """
    trt = import_trt()
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if trt_major(trt) < 11:   # 11 is always strongly typed (the flag is kept there but ignored)
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
        rest = [tensor.shape[k] for k in range(1, len(tensor.shape))]   # (C,H,W) for x, () for t and y
        profile.set_shape(tensor.name, trt.Dims([min_batch, *rest]), trt.Dims([opt_batch, *rest]),
                          trt.Dims([max_batch, *rest]))
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building TensorRT {trt.__version__} engine for {onnx_path.name} on {gpu}, batch {min_batch}..{max_batch} "
        f"(optimised for {opt_batch})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_bytes = bytes(serialized)
    plan, info = plan_paths(onnx_path, min_batch, max_batch)
    meta = {"tensorrt": trt.__version__, "gpu": gpu, "onnx": onnx_path.name, "onnx_sha256": onnx_sha256,
            "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch, "workspace_gib": workspace_gib}
    _write(plan, engine_bytes)
    _write(info, (json.dumps(meta, indent=1) + "\n").encode())
    if timing_cache is not None:
        _write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return plan


def _write(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
    atomic_write(path, write)


def ensure_engine(bundle, precision: str, min_batch: int, max_batch: int, opt_batch: int | None = None,
                  log=print) -> Path:
    """The engine file for (precision, batches min_batch..max_batch) in an export folder (runtime.bundle.Bundle).

    Reuses a current engine whose batch range covers the request (choose_engine); otherwise builds one for exactly
    min_batch..max_batch, optimised for opt_batch: the batch the network will run at (2 x the sample batch with
    guidance); default min(max(min_batch, 64), max_batch). ValueError for an empty range or an opt_batch outside it;
    TensorRTUnavailable without TensorRT or a GPU.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"a TensorRT batch range needs 1 <= min <= max, got {min_batch}..{max_batch}")
    opt = min(max(min_batch, DEFAULT_OPT_BATCH), max_batch) if opt_batch is None else opt_batch
    if not min_batch <= opt <= max_batch:
        raise ValueError(f"the optimisation batch {opt} is outside the batch range {min_batch}..{max_batch}")
    trt = import_trt()
    onnx_path = bundle.onnx_path(precision)
    sha = bundle.meta["files"][precision]["sha256"]
    want = {"tensorrt": trt.__version__, "gpu": gpu_name(), "onnx_sha256": sha}
    plan, why = choose_engine(engine_files(onnx_path), want, min_batch, max_batch, opt)
    if plan is not None:
        return plan
    log(f"TensorRT engine for batch {min_batch}..{max_batch}: {why}; building one")
    return build_engine(onnx_path, sha, min_batch, opt, max_batch, timing_cache=bundle.root / "timing.cache", log=log)
