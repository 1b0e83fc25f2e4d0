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

from .api import DdpmError, Model, load  # noqa: E402  (numpy-only imports: `import ddpm` never imports PyTorch)
from .evaluation import evaluate  # noqa: E402  (the evaluator imports PyTorch when it runs)

__all__ = ["DdpmError", "Model", "evaluate", "load", "__version__"]
