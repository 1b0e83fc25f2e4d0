"""`ddpm export --diffusers DIR`: a model of this project as a diffusers DDPMPipeline folder.

    DIR/model_index.json                          the pipeline: a DDPMPipeline of a UNet2DModel and a DDPMScheduler
    DIR/unet/config.json                          UNet2DModel's config (unet_config)
    DIR/unet/diffusion_pytorch_model.safetensors  its weights, renamed (unet_state)
    DIR/scheduler/scheduler_config.json           DDPMScheduler's config: schedule, T, prediction (scheduler_config)
    DIR/ddpm.json                                 what ddpm wrote: the checkpoint hash, the model config, the files,
                                                  a distilled student's plan (read back: Model.recorded)

The network maps onto diffusers' UNet2DModel one layer to one layer (diffusers' unet_2d.py, unet_2d_blocks.py,
resnet.py, embeddings.py, checked with 0.42.1): conv_in, the sinusoidal embedding (sin then cos, frequencies
10000^(-i/half): flip_sin_to_cos False, freq_shift 0) and its two-layer MLP, the class embedding of num_classes + 1
rows (the last one is the null label), a DownBlock2D per level (residual blocks, a stride-2 convolution below all but
the last), the mid block (residual block, single-head self-attention, residual block), an UpBlock2D per level (one
block more, the skip concatenated after the activation, nearest upsampling and a convolution above all but the
first), GroupNorm-SiLU-conv out. One thing differs: diffusers' ResnetBlock2D applies SiLU to the embedding before
its projection, which the `ddpm` block (ModelConfig.block) does not; SiLU cannot be undone, so only a model with the
`diffusers` block (`ddpm train --block diffusers`) is exported, and any other is refused in one line
(DiffusersExportError). The folder is built beside DIR, checked with diffusers itself when it is installed (eps
within TOLERANCE of this network's) and renamed into place (files.publish_dir).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DdpmError, raise_if_limit
from ..files import building_dir, is_temporary, publish_dir
from ..model.config import ModelConfig
from ..runtime.schedule import Schedule

DIFFUSERS_VERSION = "0.42.1"   # the diffusers this mapping was checked with (tests/test_diffusers_export.py)
MARKER = "ddpm.json"            # a folder with it is one this module wrote, and may be replaced
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
FILES = ("model_index.json", UNET_CONFIG, UNET_WEIGHTS, SCHEDULER_CONFIG, MARKER)
TOLERANCE = 1e-4   # max |eps_diffusers - eps_ddpm| on random inputs, float32 on the CPU
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}   # ModelConfig.prediction -> DDPMScheduler's name


class DiffusersExportError(DdpmError):
    """A model that no UNet2DModel computes, a folder that may not be replaced, or a written folder whose network
    diffusers does not compute as this one; the message says which and what to do."""


def check_exportable(cfg: ModelConfig) -> None:
    """DiffusersExportError (one line: why, and what would export) unless UNet2DModel computes the network of `cfg`;
    a model read from a diffusers folder (network "diffusers") already is one: nothing to export."""
    if cfg.network == "diffusers":
        raise DiffusersExportError(
            "this model was read from a diffusers folder: nothing to export, use that folder itself with diffusers")
    if cfg.block != "diffusers":
        raise DiffusersExportError(
            "this model's residual blocks add the embedding's projection without the SiLU that diffusers' "
            "ResnetBlock2D applies first, so no UNet2DModel computes it; a model trained with `ddpm train --block "
            "diffusers` exports to diffusers")
    if cfg.channel_mults[0] != 1:
        raise DiffusersExportError(
            f"UNet2DModel sizes its timestep embedding by its first level's channels, this model by base_channels "
            f"({cfg.base_channels}, x{cfg.channel_mults[0]} at the first level); a model whose channel_mults start "
            f"with 1 exports to diffusers")


def unet_config(cfg: ModelConfig) -> dict:
    """UNet2DModel's config.json for the network of `cfg` (check_exportable first): every field that shapes the
    network is written, none left to diffusers' defaults."""
    channels = [cfg.base_channels * m for m in cfg.channel_mults]
    levels = len(channels)
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "center_input_sample": False,
        # model.unet.timestep_embedding: [sin, cos] of t * 10000^(-i/half), i = 0..half-1, base_channels wide
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 0, "time_embedding_dim": None,
        "down_block_types": ["DownBlock2D"] * levels, "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["UpBlock2D"] * levels,
        "block_out_channels": channels, "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": cfg.dropout, "act_fn": "silu",
        "attention_head_dim": channels[-1],   # one head over the mid block's channels (model.unet.SelfAttention)
        "add_attention": cfg.attention,
        "norm_num_groups": cfg.groups, "attn_norm_num_groups": None, "norm_eps": 1e-5,   # GroupNorm32's eps
        "resnet_time_scale_shift": "default",
        "class_embed_type": None, "num_class_embeds": cfg.num_classes + 1,   # the last row: the null label
        "num_train_timesteps": None,
    }


def scheduler_config(cfg: ModelConfig) -> dict:
    """DDPMScheduler's scheduler_config.json for the schedule of `cfg` (runtime.schedule.make_betas): its named
    schedule when that gives the same betas (linear: beta_start, beta_end scaled by 1000/T; cosine:
    squaredcos_cap_v2), else the betas themselves (trained_betas: a linear schedule clipped at 0.999, T < 21)."""
    sched = Schedule.of(cfg)
    conf = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": cfg.timesteps, "trained_betas": None,
            "variance_type": "fixed_small",   # beta~_t, the posterior variance (the samplers' "small")
            "clip_sample": True, "clip_sample_range": 1.0,   # x0_hat clipped to the data range, as the samplers do
            "prediction_type": PREDICTION_TYPES[cfg.prediction],
            "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
    if cfg.schedule == "cosine":
        return {**conf, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02}
    scale = 1000.0 / cfg.timesteps
    start, end = scale * 1e-4, scale * 0.02
    if np.array_equal(np.linspace(start, end, cfg.timesteps), sched.betas):   # nothing clipped
        return {**conf, "beta_schedule": "linear", "beta_start": start, "beta_end": end}
    return {**conf, "beta_schedule": "linear", "beta_start": start, "beta_end": end,
            "trained_betas": sched.betas.tolist()}


def unet_state(cfg: ModelConfig, state: dict) -> dict:
    """The weights of model.unet.UNet(cfg) (`state`, its state_dict: name -> torch tensor) under UNet2DModel's
    names, float32 and contiguous; the attention's 1x1 qkv convolution split into to_q, to_k, to_v linears. The
    walk follows UNet.__init__'s; KeyError when `state` lacks a weight it needs."""
    import torch

    out = {}

    def put(theirs: str, ours: str, linear: bool = False) -> None:
        for p in ("weight", "bias"):
            t = state[f"{ours}.{p}"].detach().to("cpu", torch.float32)
            out[f"{theirs}.{p}"] = (t.flatten(1) if linear and p == "weight" else t).contiguous()

    def resblock(theirs: str, ours: str) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "emb"), ("norm2", "norm2"),
                     ("conv2", "conv2")):
            put(f"{theirs}.{a}", f"{ours}.{b}")
        if f"{ours}.skip.weight" in state:
            put(f"{theirs}.conv_shortcut", f"{ours}.skip")

    put("conv_in", "conv_in")
    put("time_embedding.linear_1", "time_mlp.0")
    put("time_embedding.linear_2", "time_mlp.2")
    out["class_embedding.weight"] = state["label_emb.weight"].detach().to("cpu", torch.float32).contiguous()
    levels, i = len(cfg.channel_mults), 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            resblock(f"down_blocks.{level}.resnets.{j}", f"down.{i}")
            i += 1
        if level < levels - 1:
            put(f"down_blocks.{level}.downsamplers.0.conv", f"down.{i}")
            i += 1
    resblock("mid_block.resnets.0", "mid1")
    resblock("mid_block.resnets.1", "mid2")
    if cfg.attention:
        a = "mid_block.attentions.0"
        put(f"{a}.group_norm", "mid_attn.norm")
        put(f"{a}.to_out.0", "mid_attn.proj", linear=True)
        w, b = state["mid_attn.qkv.weight"].detach().flatten(1), state["mid_attn.qkv.bias"].detach()
        for k, name in enumerate(("to_q", "to_k", "to_v")):   # SelfAttention: q, k, v are qkv's thirds in order
            rows = slice(k * w.shape[1], (k + 1) * w.shape[1])
            out[f"{a}.{name}.weight"] = w[rows].to("cpu", torch.float32).contiguous()
            out[f"{a}.{name}.bias"] = b[rows].to("cpu", torch.float32).contiguous()
    i = 0
    for n, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            resblock(f"up_blocks.{n}.resnets.{j}", f"up.{i}")
            i += 1
        if level > 0:
            put(f"up_blocks.{n}.upsamplers.0.conv", f"up.{i}.1")   # up.{i} = (nearest upsampling, convolution)
            i += 1
    put("conv_norm_out", "norm_out")
    put("conv_out", "conv_out")
    return out


@dataclass(frozen=True)
class DiffusersExport:
    out: Path                 # the pipeline folder
    checked: float | None     # max |eps_diffusers - eps_ddpm| on random inputs; None: diffusers is not installed


def export_diffusers(model, out: str | Path, log=print) -> DiffusersExport:
    """Write `model` (api.Model of a checkpoint whose network is model.unet.UNet) as a diffusers DDPMPipeline folder
    at `out` (module docstring): built in a temporary folder beside it, checked with diffusers when it is installed
    (check_with_diffusers), then renamed into place. An existing `out` is replaced only when it is empty or holds
    nothing but what this function writes (its ddpm.json says so). log(line): progress.

    Raises DiffusersExportError (a model UNet2DModel cannot hold: check_exportable; an `out` it may not replace; a
    check that failed), files.OutputError (`out` not writable, the disk full); nothing is written then."""
    from ..model.unet import UNet

    check_exportable(model.cfg)
    net = model.torch_model
    if not isinstance(net, UNet):
        raise DiffusersExportError("only a network of this project (model.unet.UNet) is exported to diffusers")
    out = Path(out)
    _check_replaceable(out)
    with building_dir(out) as tmp:
        _write(tmp, model.cfg, net, model.hash, model.recorded)
        checked = check_with_diffusers(tmp, net, model.cfg)
        if checked is None:
            log("not checked with diffusers (it is not installed here: pip install diffusers)")
        else:
            log(f"checked with diffusers: max |eps difference| {checked:.3g} (tolerance {TOLERANCE:g})")
        publish_dir(tmp, out)
    return DiffusersExport(out, checked)


def _check_replaceable(out: Path) -> None:
    """DiffusersExportError unless `out` is missing, empty, or a folder this module wrote that holds nothing else."""
    if not out.is_dir():
        return   # missing; what else is there is files.output_path's to refuse (temp_dir)
    names = sorted(e.name for e in os.scandir(out) if not is_temporary(e.name))
    if not names:
        return
    if not (out / MARKER).is_file():
        raise DiffusersExportError(f"{out} exists and is not a folder written by `ddpm export --diffusers` (no "
                                   f"{MARKER}); choose another folder, or empty it")
    ours = {"model_index.json", "unet", "scheduler", MARKER}
    foreign = [n for n in names if n not in ours] + [
        f"{sub}/{e.name}" for sub in ("unet", "scheduler") if (out / sub).is_dir()
        for e in os.scandir(out / sub) if f"{sub}/{e.name}" not in FILES and not is_temporary(e.name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DiffusersExportError(f"{out} holds files `ddpm export --diffusers` did not write ({shown}), which "
                                   f"replacing it would lose; move them, or choose another folder")


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"   # as diffusers' save_pretrained writes its configs


def _write(tmp: Path, cfg: ModelConfig, net, weights_hash: str, plan: dict | None = None) -> None:
    """The pipeline folder's files (module docstring) into the empty folder `tmp`; plan: the plan the model records
    (a distilled student's, Model.recorded), kept in ddpm.json, where loading the folder finds it."""
    from ..model.io import safetensors_bytes
    from ..runtime.bundle import file_sha256

    (tmp / "unet").mkdir()
    (tmp / "scheduler").mkdir()
    (tmp / "model_index.json").write_text(_json({
        "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    (tmp / UNET_CONFIG).write_text(_json(unet_config(cfg)))
    (tmp / UNET_WEIGHTS).write_bytes(safetensors_bytes(unet_state(cfg, net.state_dict()), {"format": "pt"}))
    (tmp / SCHEDULER_CONFIG).write_text(_json(scheduler_config(cfg)))
    files = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
             for name in FILES if name != MARKER}
    (tmp / MARKER).write_text(_json({
        "format": "ddpm-diffusers-export", "checkpoint_hash": weights_hash, "model_config": cfg.to_dict(),
        "null_class": cfg.null_label, "files": files, **({"plan": plan} if plan else {})}))


def check_with_diffusers(folder: Path, net, cfg: ModelConfig, batch: int = 6, seed: int = 0) -> float | None:
    """Load `folder` with diffusers' UNet2DModel.from_pretrained and return the max |eps| difference from `net`
    (model.unet.UNet, any device and dtype: compared as a float32 CPU copy) on `batch` random x ~ N(0, I), t over
    0..T-1 (both ends included) and labels over 0..num_classes (the null label included). None when diffusers is
    not installed. Raises DiffusersExportError when the difference exceeds TOLERANCE."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise_if_limit(e)   # installed, but its libraries cannot be mapped under a memory limit
        return None
    import torch

    from ..model.io import copy_to

    theirs = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
    ours = copy_to(net, "cpu", torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cfg.image_shape, generator=g)
    t = torch.randint(0, cfg.timesteps, (batch,), generator=g)
    t[0], t[-1] = 0, cfg.timesteps - 1
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    y[-1] = cfg.null_label
    with torch.no_grad():
        err = (theirs(x, t, class_labels=y).sample - ours(x, t, y)).abs().max().item()
    if not err <= TOLERANCE:
        raise DiffusersExportError(f"diffusers' UNet2DModel computes another network from the written folder "
                                   f"(max |eps difference| {err:.3g} > {TOLERANCE:g}); nothing written")
    return err
