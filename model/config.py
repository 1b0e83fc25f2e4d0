"""Typed model config: stored in every checkpoint and used to rebuild the network (no pickled code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import brief
from ..runtime.schedule import MAX_T, PREDICTIONS, RECIPES
from ..schema import Bool, Int, List, Num, Opt, Schema, Str


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28                 # images are image_size x image_size
    in_channels: int = 1                 # greyscale MNIST
    base_channels: int = 32              # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # channels per resolution level (28x28, 14x14, 7x7 for MNIST)
    num_res_blocks: int = 1              # residual blocks per level on the way down (one more on the way up)
    attention: bool = True               # self-attention in the middle block (lowest resolution)
    num_classes: int = 10                # class labels 0..num_classes-1; index num_classes means "no label"
    dropout: float = 0.0                 # dropout inside residual blocks (training only)
    groups: int = 8                      # GroupNorm groups
    schedule: str = "linear"             # beta recipe the network was trained with (runtime.schedule.RECIPES)
    timesteps: int = 1000                # T, number of diffusion steps
    prediction: str = "eps"              # the network's output: eps (the noise) or v (Salimans & Ho 2022)
    block: str = "ddpm"                  # residual block: ddpm | diffusers (SiLU on the embedding first; BLOCKS)
    beta_range: tuple[float, float] | None = None   # (beta_start, beta_end) of linear/scaled_linear; None: DDPM's
    betas: tuple[float, ...] | None = field(default=None, repr=False)   # beta_t of the "table" schedule (T of them)
    network: str = "ddpm"                # the network: ddpm (model.unet.UNet) | diffusers (a UNet2DModel imported
                                         # from a diffusers folder, model/diffusers.py: the fields above base_channels
                                         # .. groups do not describe it)

    @property
    def null_label(self) -> int:
        """The reserved class index meaning "no label" (unconditional / classifier-free guidance)."""
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network denoises: (1, 28, 28) for MNIST."""
        return (self.in_channels, self.image_size, self.image_size)

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
            raise ValueError(f"unknown model config fields: {brief(sorted(map(str, unknown)))}")
        d = dict(d)
        for k in ("channel_mults", "beta_range", "betas"):   # JSON's list -> the field's tuple; nothing converted:
            if isinstance(d.get(k), list):                     # the types are validate()'s to check (1.9 is no int)
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self) -> "ModelConfig":
        """The config itself if a UNet can be built from it; ValueError (one line) naming the first bad field, or the
        size of a network over MAX_PARAMS parameters or MAX_ACTIVATION_BYTES of activations per image (checked from
        the config alone, before anything is built)."""
        CONFIG.check(self.to_dict(), "model config", ValueError)
        if self.schedule not in RECIPES:
            raise ValueError(f"unknown schedule {self.schedule!r} ({', '.join(RECIPES)})")
        if self.timesteps < 2:
            raise ValueError("timesteps must be >= 2")
        from ..runtime.schedule import make_betas

        make_betas(self.schedule, self.timesteps, self.beta_range, self.betas)   # the recipe is complete
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} ({' or '.join(PREDICTIONS)})")
        if self.network != "ddpm":   # another network's architecture is its own file's (checked where it is read)
            return self
        if self.base_channels % 2:
            raise ValueError(f"base_channels must be even (the sinusoidal timestep embedding), got "
                             f"{self.base_channels}")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mults) - 1}")
        for c in {self.base_channels * m for m in self.channel_mults}:
            if c % self.groups:
                raise ValueError(f"{c} channels are not divisible into {self.groups} GroupNorm groups")
        if param_count(self) > MAX_PARAMS:
            raise ValueError(f"a network of {param_count(self) / 1e6:.0f} M parameters, more than the "
                             f"{MAX_PARAMS / 1e6:.0f} M a model may have here")
        if activation_bytes(self) > MAX_ACTIVATION_BYTES:
            raise ValueError(f"a network that needs {activation_bytes(self) >> 20} MiB of activations per image, more "
                             f"than the {MAX_ACTIVATION_BYTES >> 20} MiB a model may need here")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r} ({' or '.join(BLOCKS)})")
        return self


# The residual blocks a UNet may have (ModelConfig.block, model.unet.ResBlock): both add a projection of the
# time+class embedding to the activations after the first convolution; "diffusers" applies SiLU to the embedding
# first, as Ho et al.'s code and diffusers' ResnetBlock2D do, so that such a network is a UNet2DModel
# (export/diffusers.py).
BLOCKS = ("ddpm", "diffusers")


# Fields added after files were first written, with the value their absence means; to_dict leaves them out at it.
LATER_FIELDS = {"prediction": "eps", "block": "ddpm", "beta_range": None, "betas": None, "network": "ddpm"}
NETWORKS = ("ddpm", "diffusers")


# The largest network a config may describe, checked before anything is built from it: far above the `large`
# preset (6.1 M parameters, 2.7 MiB of activations per image by activation_bytes), far below what would exhaust a
# machine's memory.
MAX_PARAMS = 1 << 28                 # 268 M parameters: 1 GiB of float32 weights
MAX_ACTIVATION_BYTES = 1 << 30       # float32 activations of one image in one forward pass (activation_bytes)

# What a stored config must hold (checkpoints, export.json): every field typed and in range (each bound far above
# any model of this project; MAX_PARAMS and MAX_ACTIVATION_BYTES bound their combination).
CONFIG = Schema("model config", {
    "image_size": Int(min=1, max=1024), "in_channels": Int(min=1, max=64), "base_channels": Int(min=2, max=4096),
    "channel_mults": List(Int(min=1, max=64), min_len=1), "num_res_blocks": Int(min=0, max=32), "attention": Bool(),
    "num_classes": Int(min=1, max=100_000), "dropout": Num(min=0, max=1, max_open=True), "groups": Int(min=1),
    "schedule": Str(choices=RECIPES), "timesteps": Int(min=2, max=MAX_T),
}, optional={"prediction": Str(choices=PREDICTIONS), "block": Str(choices=BLOCKS),
             "beta_range": Opt(List(Num(min=0, max=1, min_open=True, max_open=True), length=2)),
             "betas": Opt(List(Num(min=0, max=1, min_open=True, max_open=True), min_len=2)),
             "network": Str(choices=NETWORKS)})


def _res_block_params(cin: int, cout: int, emb: int) -> int:
    """model.unet.ResBlock: two GroupNorms, two 3x3 convolutions, the embedding projection, a 1x1 skip when
    cin != cout."""
    return 2 * cin + (9 * cin * cout + cout) + (emb * cout + cout) + 2 * cout + (9 * cout * cout + cout) \
        + (cin * cout + cout if cin != cout else 0)


def param_count(cfg: ModelConfig) -> int:
    """The number of parameters of model.unet.UNet(cfg), computed from the config alone (nothing is built)."""
    ch, emb = cfg.base_channels, cfg.time_dim
    n = (ch * emb + emb) + (emb * emb + emb) + (cfg.num_classes + 1) * emb + (9 * cfg.in_channels * ch + ch)
    skips, cur = [ch], ch
    for level, mult in enumerate(cfg.channel_mults):
        for _ in range(cfg.num_res_blocks):
            n += _res_block_params(cur, ch * mult, emb)
            cur = ch * mult
            skips.append(cur)
        if level < len(cfg.channel_mults) - 1:
            n += 9 * cur * cur + cur
            skips.append(cur)
    n += 2 * _res_block_params(cur, cur, emb)
    if cfg.attention:
        n += 2 * cur + (3 * cur * cur + 3 * cur) + (cur * cur + cur)
    for level, mult in reversed(list(enumerate(cfg.channel_mults))):
        for _ in range(cfg.num_res_blocks + 1):
            n += _res_block_params(cur + skips.pop(), ch * mult, emb)
            cur = ch * mult
        if level > 0:
            n += 9 * cur * cur + cur
    return n + 2 * cur + (9 * cur * cfg.in_channels + cfg.in_channels)


def activation_bytes(cfg: ModelConfig) -> int:
    """An upper estimate of the float32 activations one image needs in one forward pass of UNet(cfg): the skips kept
    for the up path, a few of the largest activations alive at once, and the attention matrix (HW x HW) at the
    lowest resolution."""
    ch, size = cfg.base_channels, cfg.image_size
    widest, kept = 0, ch * size * size
    for level, mult in enumerate(cfg.channel_mults):
        side = size >> level
        widest = max(widest, 2 * ch * mult * side * side)   # an up block's input: activation and skip together
        kept += (cfg.num_res_blocks + 1) * ch * mult * side * side
    low = (size >> (len(cfg.channel_mults) - 1)) ** 2
    return 4 * (kept + 4 * widest + (low * low if cfg.attention else 0))

# small: trains usefully on 2 CPU cores; large: for a GPU.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention=True, groups=4),
    "small": ModelConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention=True),
    "large": ModelConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention=True, dropout=0.1),
}
