"""Checkpoint files.

Two kinds, both written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written checkpoint behind:
  * `ckpt.pt`: full training state (model, EMA, optimizer, step, configs) as plain tensors and Python values,
    read back with `torch.load(weights_only=True)` (no pickled code);
  * `model.safetensors`: the EMA weights for inference, the config as JSON in the safetensors metadata.
`load_model` takes either file, or a run folder holding them. Only `load_model`, the checkpoint functions and
`copy_to` need PyTorch; a model.safetensors can be identified (`read_model_info`) with numpy alone.
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

from .config import ModelConfig

FORMAT = "ddpm-model"
CKPT_FORMAT = "ddpm-ckpt"
MODEL_FILE = "model.safetensors"
CKPT_FILE = "ckpt.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of ours; the message says which and why."""


class TorchMissing(Exception):
    """What was asked for needs PyTorch, which is not installed; the message says what to install."""


TORCH_HINT = "pip install 'ddpm[torch]'"


def require_torch(what: str):
    """The torch module, or TorchMissing naming `what` and the install command."""
    try:
        import torch
    except ImportError:
        raise TorchMissing(f"{what} needs PyTorch: {TORCH_HINT}") from None
    return torch


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


def weights_hash(cfg: ModelConfig, state: dict) -> str:
    """sha256 over the config and the weights (name, dtype, shape, bytes): the same for .pt and .safetensors, and for
    torch tensors and numpy arrays of the same values (dtypes are named as torch names them, e.g. torch.float32)."""
    import numpy as np

    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        t = state[name]
        if hasattr(t, "detach"):   # a torch tensor
            import torch

            dtype, shape = str(t.dtype), tuple(t.shape)
            t = t.detach().to("cpu").contiguous()
            data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        else:
            a = np.ascontiguousarray(t)
            dtype, shape, data = f"torch.{a.dtype.name}", tuple(a.shape), a.tobytes()
        h.update(f"{name}|{dtype}|{shape}".encode())
        h.update(data)
    return h.hexdigest()


def save_model(path: str | os.PathLike, cfg: ModelConfig, state: dict, **info) -> None:
    """Write inference weights + config as safetensors (atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict())}
    meta.update({k: json.dumps(v) for k, v in info.items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write a full training checkpoint (atomically)."""
    torch = require_torch("writing a training checkpoint")
    atomic_write(path, lambda tmp: torch.save(dict(state, format=CKPT_FORMAT), tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    torch = require_torch(f"reading {path.name}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign/corrupt files
        raise CheckpointError(f"{path} is not a readable ddpm checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a ddpm training checkpoint")
    return ckpt


@dataclass
class LoadedModel:
    model: "UNet"          # noqa: F821 (model.unet.UNet) on CPU, eval mode, float32
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


def _read_safetensors(path: Path, framework: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a ddpm model.safetensors; framework "pt" (torch tensors) or "np" (numpy arrays)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ddpm model (no '{FORMAT}' metadata)")
    if "config" not in meta:
        raise CheckpointError(f"{path} is a ddpm model without its config (no 'config' metadata)")
    return meta, state


def _parse_meta(path: Path, meta: dict) -> tuple[dict, dict]:
    """(config dict, info) from a model.safetensors' metadata, every entry JSON."""
    out = {}
    for k, v in meta.items():
        if k == "format":
            continue
        try:
            out[k] = json.loads(v)
        except ValueError:
            raise CheckpointError(f"{path}: metadata entry {k!r} is not JSON") from None
    cfg_dict = out.pop("config")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{path}: the stored config is not a JSON object")
    return cfg_dict, out


def _config(path: Path, cfg_dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(cfg_dict).validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    """(config, EMA weights as torch tensors, info) from a model.safetensors, a ckpt.pt, or a run folder."""
    path = resolve_model_path(path)
    require_torch(f"loading {path.name}")
    if path.suffix == ".safetensors":
        meta, state = _read_safetensors(path, "pt")
        cfg_dict, info = _parse_meta(path, meta)
    else:
        ckpt = load_checkpoint(path)
        missing = [k for k in ("ema", "model_config", "step") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete ddpm training checkpoint")
        state, cfg_dict, info = ckpt["ema"], ckpt["model_config"], {"step": ckpt["step"]}
    return _config(path, cfg_dict), state, info


def read_model_info(path: str | os.PathLike) -> tuple[ModelConfig, str, dict, Path]:
    """(config, weights_hash, info, file) of a model without PyTorch where possible (model.safetensors is read with
    numpy; a ckpt.pt needs PyTorch). Raises CheckpointError, TorchMissing."""
    path = resolve_model_path(path)
    if path.suffix == ".safetensors":
        meta, state = _read_safetensors(path, "np")
        cfg_dict, info = _parse_meta(path, meta)
        cfg = _config(path, cfg_dict)
        return cfg, weights_hash(cfg, state), info, path
    cfg, state, info = read_weights(path)
    return cfg, weights_hash(cfg, state), info, path


def load_model(path: str | os.PathLike) -> LoadedModel:
    """The model of a model.safetensors, ckpt.pt or run folder, on the CPU in fp32 (needs PyTorch)."""
    cfg, state, info = read_weights(path)
    from .unet import UNet

    model = UNet(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    return LoadedModel(model.eval(), cfg, weights_hash(cfg, state), resolve_model_path(path), info)


def copy_to(model, device, dtype=None):
    """A copy of `model` on `device` (and `dtype`), in eval mode.

    Module.to() moves and converts in place, so whoever needs the model elsewhere (an engine on the GPU, an fp16
    engine, the export on the CPU) takes a copy and leaves the caller's model as it was.
    """
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def default_model_path() -> Path:
    """The default model shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default.safetensors"
