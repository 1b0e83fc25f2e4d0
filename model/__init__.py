"""The eps-prediction UNet, its config, and checkpoint files. Shared by train/, export/ and runtime/.

`ModelConfig` and `PRESETS` need no PyTorch; `UNet` is imported from model.unet on first use (it needs PyTorch).
"""

from .config import PRESETS, ModelConfig

__all__ = ["ModelConfig", "PRESETS", "UNet"]


def __getattr__(name):
    if name == "UNet":
        from .unet import UNet

        return UNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
