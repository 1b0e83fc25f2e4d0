"""Typed model config: stored in every checkpoint and used to rebuild the network (no pickled code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..runtime.schedule import PREDICTIONS
from ..schema import Bool, Int, List, Num, Schema, Str


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28                 # images are image_size x image_size
    in_channels: int = 1                 # greyscale MNIST
    base_channels: int = 32              # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # channels per resolution level (28, 14, 7 for MNIST)
    num_res_blocks: int = 1              # residual blocks per level on the way down (one more on the way up)
    attention: bool = True               # self-attention in the middle block (lowest resolution)
    num_classes: int = 10                # class labels 0..num_classes-1; index num_classes means "no label"
    dropout: float = 0.0                 # dropout inside residual blocks (training only)
    groups: int = 8                      # GroupNorm groups
    schedule: str = "linear"             # beta schedule the network was trained with: linear | cosine
    timesteps: int = 1000                # T, number of diffusion steps
    prediction: str = "eps"              # the network's output: eps (the noise) or v (Salimans & Ho 2022)

    @property
    def null_label(self) -> int:
        """The reserved class index meaning "no label" (unconditional / classifier-free guidance)."""
        return self.num_classes

    @property
    def time_dim(self) -> int:
        return 4 * self.base_channels

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict, without the fields of LATER_FIELDS that hold their default: a config stored
        before such a field existed means its default, and keeps its identity (model.io.weights_hash)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        if "channel_mults" in d:
            d["channel_mults"] = tuple(int(m) for m in d["channel_mults"])
        return cls(**d)

    def validate(self) -> "ModelConfig":
        """The config itself if a UNet can be built from it; ValueError (one line) naming the first bad field."""
        CONFIG.check(self.to_dict(), "model config", ValueError)
        if self.base_channels % 2:
            raise ValueError(f"base_channels must be even (the sinusoidal timestep embedding), got "
                             f"{self.base_channels}")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mults) - 1}")
        for c in {self.base_channels * m for m in self.channel_mults}:
            if c % self.groups:
                raise ValueError(f"{c} channels are not divisible into {self.groups} GroupNorm groups")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r} (linear or cosine)")
        if self.timesteps < 2:
            raise ValueError("timesteps must be >= 2")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} ({' or '.join(PREDICTIONS)})")
        return self


# Fields added after files were first written, with the value their absence means; to_dict leaves them out at it.
LATER_FIELDS = {"prediction": "eps"}


# What a stored config must hold (checkpoints, export.json): every field typed and in range.
CONFIG = Schema("model config", {
    "image_size": Int(min=1), "in_channels": Int(min=1), "base_channels": Int(min=2),
    "channel_mults": List(Int(min=1), min_len=1), "num_res_blocks": Int(min=0), "attention": Bool(),
    "num_classes": Int(min=1), "dropout": Num(min=0, max=1, max_open=True), "groups": Int(min=1),
    "schedule": Str(choices=("linear", "cosine")), "timesteps": Int(min=2),
}, optional={"prediction": Str(choices=PREDICTIONS)})

# small: trains usefully on 2 CPU cores; large: for a GPU.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention=True, groups=4),
    "small": ModelConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention=True),
    "large": ModelConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention=True, dropout=0.1),
}
