"""ddpm: denoising diffusion on MNIST, from training to a preallocated inference runtime.

Layout (the repository root is this package):
  model/    the eps-UNet and its config, checkpoint files (shared by train/, export/ and runtime/)
  train/    MNIST data, the training loop
  runtime/  schedule tables, samplers, inference engines (never imports train/)
  export/   checkpoint -> ONNX -> TensorRT
  bench/    measurements
"""

__version__ = "0.2.0"

from .api import DdpmError, Model, load  # noqa: E402  (numpy-only imports: `import ddpm` never imports PyTorch)

__all__ = ["DdpmError", "Model", "load", "__version__"]
