"""Build a TensorRT engine from an exported ONNX file (TensorRT 10 and 11 Python API).

Written against the documented API but NOT run in this project's workplace (TensorRT cannot be installed here):
see the README. The calls are type-checked against the TensorRT 10.13 stubs in the test suite
(tests/test_trt_typing.py, which also lists what the stubs cannot see of TensorRT 11). Both versions build a
*strongly typed* network, so the engine's precision is the ONNX file's (fp32 model.onnx or fp16 model_fp16.onnx):
TensorRT 11 removed BuilderFlag.FP16 and always types strongly (its STRONGLY_TYPED creation flag is ignored); on 10
the STRONGLY_TYPED creation flag gives the same behaviour.

Each engine file is saved as runtime.trt names it (engine_file_paths: <onnx stem>_b<min>-<max>.plan beside a
.plan.json recording the TensorRT version, the GPU, the ONNX file's sha256 and the batch range: one optimisation
profile, min, opt, max). `ensure_engine` reuses any current engine file whose batch range covers the one asked for
(runtime.trt.find_engine: `ddpm export --trt` builds 1-256; `gen --batch 64` with guidance asks for 1-128 and reuses
it), and builds one when none does; `build_bundle_engine` is the builder that runtime.engines.make_engine is handed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.io import atomic_write
from ..runtime.trt import TensorRTUnavailable, engine_file_paths, find_engine, gpu_name, import_trt  # noqa: F401

DEFAULT_OPT_BATCH = 64   # the optimisation batch of `ddpm export --trt`, which does not know the batch to come


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


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
    data = getattr(onnx_path, "data", None)   # the bytes an export folder's check read (runtime.bundle.CheckedPath)
    if not (parser.parse(data, str(onnx_path)) if data is not None else parser.parse_from_file(str(onnx_path))):
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
    engine_file, info = engine_file_paths(onnx_path, min_batch, max_batch)
    meta = {"tensorrt": trt.__version__, "gpu": gpu, "onnx": onnx_path.name, "onnx_sha256": onnx_sha256,
            "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch, "workspace_gib": workspace_gib}
    _write(engine_file, engine_bytes)
    _write(info, (json.dumps(meta, indent=1) + "\n").encode())
    if timing_cache is not None:
        _write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return engine_file


def _write(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
    atomic_write(path, write)


def build_bundle_engine(bundle, precision: str, min_batch: int, max_batch: int, opt_batch: int,
                        log=print) -> Path:
    """Build and save the engine file of an export folder's (runtime.bundle.Bundle) ONNX file of `precision` for
    batches min_batch..max_batch, optimised for opt_batch, with the folder's timing cache (build_engine)."""
    return build_engine(bundle.onnx_path(precision), bundle.meta["files"][precision]["sha256"], min_batch, opt_batch,
                        max_batch, timing_cache=bundle.root / "timing.cache", log=log)


def ensure_engine(bundle, precision: str, min_batch: int, max_batch: int, opt_batch: int | None = None,
                  log=print) -> Path:
    """The engine file for (precision, batches min_batch..max_batch) in an export folder (runtime.bundle.Bundle).

    Reuses a current engine file whose batch range covers the request (runtime.trt.find_engine); otherwise builds
    one for exactly min_batch..max_batch, optimised for opt_batch: the batch the network will run at
    (runtime.generate.network_batch); default min(max(min_batch, 64), max_batch). ValueError for an empty range or
    an opt_batch outside it; TensorRTUnavailable without TensorRT or a GPU.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"a TensorRT batch range needs 1 <= min <= max, got {min_batch}..{max_batch}")
    opt = min(max(min_batch, DEFAULT_OPT_BATCH), max_batch) if opt_batch is None else opt_batch
    if not min_batch <= opt <= max_batch:
        raise ValueError(f"the optimisation batch {opt} is outside the batch range {min_batch}..{max_batch}")
    engine_file, why = find_engine(bundle, precision, min_batch, max_batch, opt)
    if engine_file is not None:
        return engine_file
    log(f"TensorRT engine for batch {min_batch}..{max_batch}: {why}; building one")
    return build_bundle_engine(bundle, precision, min_batch, max_batch, opt, log)
