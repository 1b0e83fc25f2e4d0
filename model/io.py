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

import contextlib
import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DdpmError, LimitReached, brief, clip, import_refusal, memory_limited, raise_if_limit
from ..files import file_kind, input_path, readable_name, refused
from ..files import atomic_write  # noqa: F401  (re-exported: model.io.atomic_write is used across the package)
from ..runtime.bundle import MAX_STEP, PLAN
from ..schema import Any, Array, Const, DuplicateKey, Int, Json, Map, Obj, Schema, json_loads, repeated
from .config import ModelConfig

FORMAT = "ddpm-model"
CKPT_FORMAT = "ddpm-ckpt"
MODEL_FILE = "model.safetensors"
CKPT_FILE = "ckpt.pt"


class CheckpointError(DdpmError):
    """A checkpoint that is missing, unreadable or not one of ours; the message says which and why."""


class WeightsChanged(CheckpointError):
    """The weights file a Model was loaded from holds other weights when it is read again (a run that is training
    rewrote it, or a relative path now names another file). `path`: that file. The message is the API's advice
    (load it again); the command line words its own from `path`."""

    def __init__(self, path):
        self.path = path
        super().__init__(f"{path} changed since ddpm.load() read it; load it again")


class TorchMissing(DdpmError):
    """What was asked for needs PyTorch, which is not installed; the message says what to install."""


TORCH_HINT = ("install it with the extra, in the ddpm folder: pip install \".[torch]\" (on Linux without a GPU, "
              "first pip install torch --index-url https://download.pytorch.org/whl/cpu; README, Install)")


def require(module: str, what: str, needs: str, hint: str = TORCH_HINT, missing: type[DdpmError] = TorchMissing):
    """The imported top-level `module` (e.g. "torch"), or `missing` with one line "<what> needs <needs>: <hint>"
    (e.g. "exporting to ONNX needs the onnx package: install it with ..."); LimitReached instead when a resource
    limit stopped the import of an installed package (errors.raise_if_limit), or would abort it in native code
    (errors.import_refusal: checked before the import)."""
    refusal = import_refusal(module, needs)
    if refusal is not None:
        raise LimitReached(refusal)
    try:
        return __import__(module)   # the import statement's hook (builtins.__import__): a replacement is honoured
    except ImportError as e:
        raise_if_limit(e)
        raise missing(f"{what} needs {needs}: {hint}") from None


def require_torch(what: str):
    """The torch module, or TorchMissing naming `what` and the install command."""
    return require("torch", what, "PyTorch")


def require_onnx(what: str):
    """The onnx module (the [torch] extra's exporter and checker), or TorchMissing naming `what` and the install
    command."""
    return require("onnx", what, "the onnx package")


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


def _write_bytes(path: str, data) -> None:
    """Write serialised weights to `path` with Python's own file I/O, so that a failure is an OSError with its
    errno (files.atomic_write names a full disk or the file-size limit from it)."""
    with open(path, "wb") as f:
        f.write(data)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `tensors` (name -> torch tensor) and `metadata` (str -> str), with one byte layout for
    the same input: safetensors.torch.save writes the metadata in a hash map's order, which changes from one call
    to the next, so the header is written again here with the metadata's keys sorted. The format: an 8-byte
    little-endian header length, the JSON header padded with spaces to a multiple of 8 bytes, then the data, whose
    offsets count from the data's start and so stay valid."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_model(path: str | os.PathLike, cfg: ModelConfig, state: dict, **info) -> None:
    """Write inference weights + config as safetensors (atomically), the same bytes for the same weights, config
    and info (safetensors_bytes)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict())}
    meta.update({k: json.dumps(v) for k, v in info.items()})
    data = safetensors_bytes(tensors, meta)
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write a full training checkpoint (atomically). Serialised in memory first and written by Python, so that a
    failed write (a full disk, the file-size limit) is an OSError with its errno: torch's own file writer reports
    those as a RuntimeError without one."""
    import io

    torch = require_torch("writing a training checkpoint")
    buf = io.BytesIO()
    torch.save(dict(state, format=CKPT_FORMAT), buf)
    atomic_write(path, lambda tmp: _write_bytes(tmp, buf.getbuffer()))


# The entries of the formats (schema.py), checked when read. Weights must be finite: a diverged run's NaN weights
# would otherwise sample black images and even pass the export's parity check. PLAN: the plan a distilled student was
# made for (train/distill.py recorded_plan; runtime.bundle.PLAN), in its model files' metadata and, for the latest
# student, in the distillation's ckpt.pt.
_WEIGHTS = Map(Array(("float",), finite=True), min_len=1, what="a state dict of float tensors")
CKPT = Schema("ddpm training checkpoint", {
    "format": Const(CKPT_FORMAT),
    "step": Int(min=0, max=MAX_STEP),
    "model_config": Map(Any(), what="a model config (an object)"),
    "ema": _WEIGHTS,                                    # the EMA weights: what inference uses
    "model": _WEIGHTS,                                  # the trained weights, for --resume
    "opt": Obj({"state": Map(Any(), keys=Any()), "param_groups": Any()}, what="an optimizer state"),
    "torch_rng": Array(("uint8",), (None,)),
}, optional={"train_config": Map(Any())},
    hint="it was not written completely by `ddpm train`; use an earlier checkpoint or train again")
# what loading the model needs, and a distilled student's plan
CKPT_WEIGHTS = Schema(CKPT.what, CKPT.subset("format", "step", "model_config", "ema").fields, {"plan": PLAN},
                      CKPT.hint)
MODEL_META = Schema("ddpm model (model.safetensors metadata)", {
    "format": Const(FORMAT),
    "config": Json(Map(Any(), what="a model config (an object)")),
}, optional={"step": Json(Int(min=0, max=MAX_STEP)), "plan": Json(PLAN)}, hint="re-save it with `ddpm train` or use its ckpt.pt")


_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", re.S)


def _load_failure(e: Exception) -> str:
    """What torch.load(weights_only=True) found wrong with a file, for one line: its reason alone when it refused
    what a plain file of tensors never holds (a foreign pickle, code to run, not a pickle at all), without its
    advice to load with weights_only=False, which would run the code of a file of unknown origin."""
    text = str(e)
    if isinstance(e, (LookupError, AttributeError, TypeError, AssertionError)):
        # torch's reader tripping over bytes it cannot parse (a text file: IndexError "list index out of range"):
        # its words are about its own code, not the file
        return "its bytes are not a PyTorch file"
    if isinstance(e, EOFError):   # "Ran out of input", or nothing at all for an empty file
        return "it ends before a PyTorch file would: empty or cut short"
    if "weights_only" not in text:
        return f"{type(e).__name__}: {clip(e)}"
    found = _UNPICKLER.search(text)
    reason = f": {clip(found.group(1), 120)}" if found and found.group(1).strip() else ""
    return f"not a PyTorch file of tensors alone{reason}"


def load_checkpoint(path: str | os.PathLike, schema: Schema = CKPT) -> dict:
    """The dict of a ckpt.pt, read with weights_only=True (no code runs), checked against `schema` (default: all a
    resume needs; CKPT_WEIGHTS: what loading the model needs). Raises CheckpointError, TorchMissing."""
    path = input_path(path, CheckpointError, name=f"checkpoint {path}")   # a file: not a folder, a pipe, a dead link
    kind = file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a ddpm checkpoint (ckpt.pt) or model file (.safetensors)")
    torch = require_torch(f"reading {path.name}")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign/corrupt files
        raise CheckpointError(f"{path} is not a readable ddpm checkpoint ({_load_failure(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a ddpm training checkpoint")
    _check_storage(path, ckpt)
    schema.check(ckpt, path, CheckpointError)
    return ckpt


MAX_CKPT_PICKLE = 64 << 20   # bytes: a ckpt.pt's pickle (its structure; the tensors are stored apart) is ~100 KB


class _Anything:
    """What `checkpoint_step` makes of every class and stored object a ckpt.pt's pickle names (tensors, storages,
    OrderedDict): nothing is built, no code of the pickle runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setitem__(self, key, value):
        pass

    def __setstate__(self, state):
        pass


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ckpt.pt, read from its archive's pickle alone: without PyTorch, without the tensors (a few
    hundred kilobytes at most), so that a run stopped by a resource limit (when PyTorch may not even import) can
    still name the checkpoint it continues from. None when `path` is not a readable ckpt.pt of ours."""
    import pickle
    import zipfile

    class Skeleton(pickle.Unpickler):
        def find_class(self, module, name):
            return _Anything

        def persistent_load(self, pid):
            return None

    try:
        with zipfile.ZipFile(path) as zf:
            member = next((m for m in zf.infolist() if m.filename.endswith("/data.pkl")), None)
            if member is None or repeated(zf.namelist()) is not None or \
                    member.compress_type != zipfile.ZIP_STORED or member.file_size > MAX_CKPT_PICKLE:
                return None
            with zf.open(member) as f:
                ckpt = Skeleton(f).load()
    except Exception:   # not a zip, not a pickle, cut short: no step to name
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        return None
    step = ckpt.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


MAX_CKPT_DEPTH = 32   # levels of nested dicts and lists in a ckpt.pt (`ddpm train` writes 4: opt.state.N.exp_avg)


def _check_storage(path: Path, obj) -> None:
    """Every tensor in `obj` (nested dicts and lists) must be a dense (strided, not quantized or nested) view whose
    storage holds all its elements (a sparse tensor has no storage to measure):
    an expanded or strided view (stride 0) declares more numbers than the file stores, and looking at its values
    (the finiteness check, a copy) would allocate by the declared shape. Nesting deeper than MAX_CKPT_DEPTH is
    refused too. Walked with an explicit stack, so that no nesting can exhaust Python's recursion limit.
    CheckpointError otherwise."""
    import torch

    stack = [(obj, "", 0)]
    while stack:
        obj, where, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized or getattr(obj, "is_nested", False):
                kind = "a quantized" if obj.is_quantized else "a nested" if getattr(obj, "is_nested", False) else \
                    f"a {str(obj.layout).removeprefix('torch.')}"
                raise CheckpointError(f"{path}: {clip(where, 80) or 'a tensor'} is {kind} tensor, not a dense one; it "
                                      f"was not written by `ddpm train`: use an earlier checkpoint or train again")
            need = obj.numel() * obj.element_size()
            have = obj.untyped_storage().nbytes() - obj.storage_offset() * obj.element_size()
            if obj.numel() and (not obj.is_contiguous() or have < need):
                raise CheckpointError(f"{path}: {clip(where, 80) or 'a tensor'} declares shape {brief(obj.shape)} "
                                      f"but its storage holds {max(have, 0) // max(obj.element_size(), 1)} numbers; "
                                      f"it was not written by `ddpm train`: use an earlier checkpoint or train again")
            continue
        if isinstance(obj, dict):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
        else:
            continue
        if depth >= MAX_CKPT_DEPTH:
            raise CheckpointError(f"{path}: {clip(where, 80)} nests lists or dicts more than {MAX_CKPT_DEPTH} levels "
                                  f"deep; it was not written by `ddpm train`: use an earlier checkpoint or train again")
        stack.extend((v, w, depth + 1) for w, v in reversed(items))


@dataclass
class LoadedModel:
    model: "UNet"          # noqa: F821 (model.unet.UNet) on CPU, eval mode, float32
    cfg: ModelConfig
    hash: str              # weights_hash of (cfg, weights)
    path: Path             # the file actually read
    info: dict             # extra metadata (step, ...)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The weights file `path` names: `path` itself, or in a run folder its model.safetensors, else its ckpt.pt.
    CheckpointError when there is none, or when what is there is not a file that can be read (files.input_path:
    a folder, a pipe, a dangling link; one line that says which)."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CKPT_FILE):
            if os.path.lexists(path / name):
                return input_path(path / name, CheckpointError, name=f"checkpoint {path / name}")
        raise CheckpointError(f"{path} holds neither {MODEL_FILE} nor {CKPT_FILE}")
    return input_path(path, CheckpointError, name=f"checkpoint {path}")


# safetensors' own bound on a header's length (its MAX_HEADER_SIZE): a longer one it refuses by itself
_MAX_HEADER = 100_000_000


def check_header(path: Path, error: type[DdpmError] = CheckpointError,
                 hint: str = "re-save it with `ddpm train`") -> None:
    """`error` when the safetensors header (8-byte little-endian length, then JSON)
    holds a key twice (a tensor name or a metadata entry that readers would take differently: schema.json_loads),
    or when its tensors' data does not end where the file does (bytes after it, e.g. a file grown to GBs: refused
    from the header, before safetensors maps the whole file). A header that is not JSON, too long or malformed is
    left to safetensors' own message."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n > min(_MAX_HEADER, size):
                return
            header = json_loads(f.read(n))
    except DuplicateKey as e:
        raise error(f"{path} is not a readable safetensors file ({e}); {hint}") from None
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(header, dict):
        return
    ends = [entry.get("data_offsets") for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict)]
    ends = [e[1] for e in ends if isinstance(e, list) and len(e) == 2 and isinstance(e[1], int)]
    end = 8 + n + max(ends, default=0)
    if end < size:
        raise error(f"{path} is not a readable safetensors file ({size - end:,} bytes after its tensors' data, which "
                    f"ends at byte {end:,} of {size:,}); {hint}")


def _read_safetensors(path: Path, framework: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a ddpm model.safetensors; framework "pt" (torch tensors) or "np" (numpy arrays)."""
    from safetensors import SafetensorError, safe_open

    from ..runtime.nets import stderr_silenced

    # under a memory limit, an allocation that fails inside the Rust reader panics: Rust prints the panic to the
    # standard error before Python sees it, so that output is dropped and the panic named as the limit
    quiet = stderr_silenced() if memory_limited() else contextlib.nullcontext()
    kind = file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a safetensors model file")
    check_header(path)
    try:
        with quiet, readable_name(path) as name, safe_open(name, framework=framework) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise_if_limit(e)
        raise CheckpointError(f"{path} is not a readable safetensors file ({clip(e)})") from None
    except BaseException as e:
        if type(e).__name__ == "PanicException" and memory_limited():   # pyo3's, a BaseException
            raise MemoryError(f"reading {path}") from None
        raise
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ddpm model (no '{FORMAT}' metadata)")
    MODEL_META.check(meta, path, CheckpointError)
    _WEIGHTS_FILE.check({"weights": state}, path, CheckpointError)
    return meta, state


_WEIGHTS_FILE = Schema("ddpm model", {"weights": _WEIGHTS}, hint="use an earlier checkpoint or train again")


def _parse_meta(path: Path, meta: dict) -> tuple[dict, dict]:
    """(config dict, info) from a model.safetensors' metadata, every entry JSON."""
    out = {}
    for k, v in meta.items():
        if k == "format":
            continue
        try:
            out[k] = json_loads(v)
        except ValueError:
            raise CheckpointError(f"{path}: metadata entry {brief(k)} is not JSON") from None
        except RecursionError:   # arrays or objects nested thousands deep: the decoder recurses per level
            raise CheckpointError(f"{path}: metadata entry {brief(k)} nests JSON arrays or objects too deeply; "
                                  f"re-save it with `ddpm train` or use its ckpt.pt") from None
    cfg_dict = out.pop("config")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{path}: the stored config is not a JSON object")
    return cfg_dict, out


def stored_config(path: Path, cfg_dict) -> ModelConfig:
    """The config a model.safetensors or ckpt.pt stores, validated; CheckpointError otherwise. Such a file holds
    this project's UNet (network "ddpm"), which is built from the config: another network (a diffusers UNet2DModel)
    is read from its own folder, and its name here would skip the checks of the UNet's architecture and size."""
    try:
        cfg = ModelConfig.from_dict(cfg_dict).validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid model config ({clip(e)})") from None
    if cfg.network != "ddpm":
        raise CheckpointError(f"{path}: its config names the network {cfg.network!r}, but a model file of ddpm holds "
                              f"ddpm's UNet (network 'ddpm'); a diffusers model is read from its folder "
                              f"(docs/diffusers.md)")
    return cfg


def check_plan(path: Path, cfg: ModelConfig, info: dict) -> None:
    """CheckpointError unless the plan the file records (info["plan"], a distilled student's; PLAN checked its
    entries alone) fits the model (options.recorded_plan_refusal). A file's plan is not an option the user gave, so
    its faults are the file's, told before any option is resolved from it."""
    plan = info.get("plan")
    from ..options import recorded_plan_refusal

    why = recorded_plan_refusal(plan, cfg)
    if why:
        raise CheckpointError(f"{path}: {why}; it was not written by `ddpm distill`; distil the student again")


def check_fits(path: Path, cfg: ModelConfig, state: dict) -> None:
    """CheckpointError unless the weights hold as many numbers as the network of `cfg` has parameters, checked from
    the config alone before a network is built from it (a small file cannot make a large network be built)."""
    from math import prod

    from .config import param_count

    held, want = sum(prod(tuple(t.shape)) for t in state.values()), param_count(cfg)
    if held != want:
        raise CheckpointError(f"{path}: weights do not fit the stored config (it describes a network of {want} "
                              f"parameters, the file holds {held} numbers)")


def _check_archive(path: Path) -> None:
    """A ckpt.pt is a zip archive that torch.save writes uncompressed, each member once: refuse a compressed member
    (its declared size could inflate far beyond the file) and a name held twice (schema.repeated) before torch
    reads any of it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return   # not a zip (an old or foreign format): torch.load reports it
    twice = repeated(m.filename for m in members)
    if twice is not None:
        raise CheckpointError(f"{path}: holds two members named {brief(twice)} (zip readers pick differently); "
                              f"not written by `ddpm train`")
    size = path.stat().st_size
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise CheckpointError(f"{path}: member {brief(m.filename)} declares {m.file_size} bytes "
                                  f"{'compressed' if m.compress_type != zipfile.ZIP_STORED else ''} in a file of "
                                  f"{size}; not written by `ddpm train`".replace("  ", " "))


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    """(config, EMA weights as torch tensors, info) from a model.safetensors, a ckpt.pt, or a run folder."""
    path = resolve_model_path(path)
    require_torch(f"loading {path.name}")
    if path.suffix == ".safetensors":
        meta, state = _read_safetensors(path, "pt")
        cfg_dict, info = _parse_meta(path, meta)
    else:
        ckpt = load_checkpoint(path, CKPT_WEIGHTS)
        state, cfg_dict, info = ckpt["ema"], ckpt["model_config"], {"step": ckpt["step"]}
        if "plan" in ckpt:   # a distillation's: its latest student, with the plan it was distilled for
            info["plan"] = ckpt["plan"]
        elif "distilled" in ckpt:
            raise CheckpointError(f"{path} is a distillation's checkpoint that does not record its student's plan; "
                                  f"load {MODEL_FILE} or student<steps>.safetensors beside it")
    cfg = stored_config(path, cfg_dict)
    check_fits(path, cfg, state)
    check_plan(path, cfg, info)
    return cfg, state, info


def read_model_info(path: str | os.PathLike) -> tuple[ModelConfig, str, dict, Path]:
    """(config, weights_hash, info, file) of a model without PyTorch where possible (model.safetensors and a diffusers
    folder, model/diffusers.py, are read with numpy; a ckpt.pt needs PyTorch). Raises CheckpointError,
    TorchMissing."""
    from . import diffusers

    why = refused(path)   # a name too long, a folder that cannot be searched: one line before anything looks there
    if why is not None:
        raise CheckpointError(f"checkpoint {why}")
    if diffusers.is_diffusers_folder(path):
        return diffusers.read_info(path)
    path = resolve_model_path(path)
    if path.suffix == ".safetensors":
        meta, state = _read_safetensors(path, "np")
        cfg_dict, info = _parse_meta(path, meta)
        cfg = stored_config(path, cfg_dict)
        check_fits(path, cfg, state)
        check_plan(path, cfg, info)
        return cfg, weights_hash(cfg, state), info, path
    cfg, state, info = read_weights(path)
    return cfg, weights_hash(cfg, state), info, path


def load_model(path: str | os.PathLike, expected_hash: str | None = None) -> LoadedModel:
    """The model of a model.safetensors, ckpt.pt, run folder or diffusers folder (model/diffusers.py: needs diffusers
    too), on the CPU in fp32 (needs PyTorch). expected_hash: the weights_hash an earlier read of `path` gave
    (api.load): CheckpointError when the weights read now are others (the file was rewritten, or a relative path
    now names another file), so that they never run under the identity of the ones read before."""
    from . import diffusers

    if diffusers.is_diffusers_folder(path):
        return _expected(diffusers.load(path), path, expected_hash)
    cfg, state, info = read_weights(path)
    from .unet import UNet

    model = UNet(cfg)
    path = resolve_model_path(path)
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # a tensor of another shape
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e)]
        raise CheckpointError(f"{path}: weights do not fit the stored config ({clip(lines[0])})") from None
    if res.missing_keys or res.unexpected_keys:
        parts = [f"{what} {', '.join(clip(k, 60) for k in keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", res.missing_keys), ("unexpected", res.unexpected_keys)) if keys]
        raise CheckpointError(f"{path}: weights do not fit the stored config ({'; '.join(parts)})")
    return _expected(LoadedModel(model.eval(), cfg, weights_hash(cfg, state), path, info), path, expected_hash)


def _expected(loaded: LoadedModel, path, expected_hash: str | None) -> LoadedModel:
    if expected_hash is not None and loaded.hash != expected_hash:
        raise WeightsChanged(path)
    return loaded


def copy_to(model, device, dtype=None):
    """A copy of `model` on `device` (and `dtype`), in eval mode.

    Module.to() moves and converts in place, so whoever needs the model elsewhere (an engine on the GPU, an fp16
    engine, the export on the CPU) takes a copy and leaves the caller's model as it was.
    """
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def default_model_path() -> Path:
    """The default model shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default.safetensors"
