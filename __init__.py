"""ddpm: denoising diffusion on MNIST, from training to a preallocated inference runtime.

Layout (the repository root is this package):
  model/    the eps-UNet and its config, checkpoint files (shared by train/, export/ and runtime/)
  train/    MNIST data, the training loop
  runtime/  schedule tables, samplers, inference engines (never imports train/)
  export/   checkpoint -> ONNX -> TensorRT
  bench/    measurements
"""

__version__ = "0.2.0"

import os as _os

# PyTorch's OpenMP threads sleep at once when idle instead of spinning (read when PyTorch loads, which the CLI and
# the API do after this): on a busy machine spinning threads take the CPU time the work needs, 5-20x slower
# (bench/threads.md). An OMP_WAIT_POLICY of the user's is kept; it has no effect if PyTorch was imported first.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The same for numpy's OpenBLAS threads, which start when numpy loads and spin about 2^28 cycles between calls
# before they sleep: 2^4 cycles instead (OpenBLAS's least), about 40 ms of CPU saved in every `ddpm` command that
# loads numpy. Read when numpy loads; a value of the user's is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# The public names and the submodules are imported on first use (PEP 562): `import ddpm` costs nothing, so that the
# `ddpm` command (cli.py) handles SIGTERM before numpy and the rest load (most of a second). The API imports numpy
# only; the evaluator imports PyTorch when it runs.
_PUBLIC = {"DdpmError": "errors", "Model": "api", "load": "api", "evaluate": "evaluation"}

__all__ = ["DdpmError", "Model", "evaluate", "load", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _PUBLIC:
        try:
            module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        except Exception as e:   # numpy or a native library that cannot load under a resource limit: LimitReached
            from .errors import raise_if_limit   # (standard library only: loads where the rest cannot)

            raise_if_limit(e, f"ddpm.{name}")
            raise
        value = getattr(module, name)
        globals()[name] = value
        return value
    if not name.startswith("_"):   # a submodule not imported yet: ddpm.api, ddpm.runtime, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
