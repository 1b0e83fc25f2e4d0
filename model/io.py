"""Checkpoint files.

Two kinds, both written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written checkpoint behind:
  * `ckpt.pt`: full training state (model, EMA, optimizer, step, configs) as plain tensors and Python values,
    read back with `torch.load(weights_only=True)` (no pickled code);
  * `model.safetensors`: the EMA weights for inference, the config as JSON in the safetensors metadata.
`load_model` takes either file, or a run folder holding them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .unet import UNet

FORMAT = "ddpm-model"
CKPT_FORMAT = "ddpm-ckpt"
MODEL_FILE = "model.safetensors"
CKPT_FILE = "ckpt.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of ours; the message says which and why."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file ordinary permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_hash(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the config and the weights (name, dtype, shape, bytes): the same for .pt and .safetensors."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(path: str | os.PathLike, cfg: ModelConfig, state: dict[str, torch.Tensor], **info) -> None:
    """Write inference weights + config as safetensors (atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict())}
    meta.update({k: json.dumps(v) for k, v in info.items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write a full training checkpoint (atomically)."""
    atomic_write(path, lambda tmp: torch.save(dict(state, format=CKPT_FORMAT), tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign/corrupt files
        raise CheckpointError(f"{path} is not a readable ddpm checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a ddpm training checkpoint")
    return ckpt


@dataclass
class LoadedModel:
    model: UNet            # on CPU, eval mode, float32
    cfg: ModelConfig
    hash: str              # weights_hash of (cfg, weights)
    path: Path             # the file actually read
    info: dict             # extra metadata (step, ...)


def resolve_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CKPT_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds neither {MODEL_FILE} nor {CKPT_FILE}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, EMA weights, info) from a model.safetensors, a ckpt.pt, or a run folder."""
    path = resolve_model_path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is a safetensors file but not a ddpm model (no '{FORMAT}' metadata)")
        info = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "config")}
        cfg_dict = json.loads(meta["config"])
    else:
        ckpt = load_checkpoint(path)
        state, cfg_dict, info = ckpt["ema"], ckpt["model_config"], {"step": ckpt["step"]}
    try:
        cfg = ModelConfig.from_dict(cfg_dict).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None
    return cfg, state, info


def load_model(path: str | os.PathLike) -> LoadedModel:
    cfg, state, info = read_weights(path)
    model = UNet(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    return LoadedModel(model.eval(), cfg, weights_hash(cfg, state), resolve_model_path(path), info)


def copy_to(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of `model` on `device` (and `dtype`), in eval mode.

    Module.to() moves and converts in place, so whoever needs the model elsewhere (an engine on the GPU, an fp16
    engine, the export on the CPU) takes a copy and leaves the caller's model as it was.
    """
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def default_model_path() -> Path:
    """The default model shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default.safetensors"
