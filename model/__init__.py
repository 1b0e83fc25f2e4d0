"""The eps-prediction UNet, its config, and checkpoint files. Shared by train/, export/ and runtime/."""

from .config import PRESETS, ModelConfig
from .unet import UNet

__all__ = ["ModelConfig", "PRESETS", "UNet"]
