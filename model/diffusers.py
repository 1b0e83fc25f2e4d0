"""A diffusers model folder as a model of this project: the network is diffusers' own UNet2DModel, the schedule comes
from its scheduler config, and the rest of the toolkit (every engine, the editing modes, the exporter, the
generator, the web page) runs it through the same eps(x, t, y) interface as its own UNet.

Two layouts are read (docs/diffusers.md):

    DIR/model_index.json                       a DDPMPipeline / DDIMPipeline folder (what save_pretrained writes)
    DIR/unet/config.json                       the UNet2DModel's config ...
    DIR/unet/diffusion_pytorch_model.safetensors   ... and weights (safetensors only: no pickled code is read)
    DIR/scheduler/scheduler_config.json        T, the betas' recipe, the prediction type
    DIR/ddpm.json                              optional: {"null_class": K-1} for a class-conditional model whose last
                                               class index was trained as "no label" (classifier-free guidance)

or a bare unet folder (config.json + weights), whose companions are looked for by one rule (_companion): in the
folder itself (scheduler_config.json, ddpm.json), else where its pipeline folder holds them (../scheduler/,
../ddpm.json). Without a scheduler config diffusers' DDPMScheduler defaults are used; one notice line on stderr
says which.

The wrapper (`DiffusersEps`) adapts the discrete-time model the way k-diffusion's external.py adapts one
(DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser): the network is called at the integer timestep t and its output is
eps or v as the scheduler's prediction_type says (the runtime's plans take either, runtime.schedule.x0_coefficients).
What the runtime cannot follow is refused with one line naming the field (`DiffusersError`). Reading the configs and
the weights' identity needs numpy alone; building the network needs PyTorch and diffusers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

from ..errors import clip
from ..files import input_path
from ..runtime.bundle import PLAN
from ..runtime.schedule import MAX_T
from ..schema import Any, Int, Opt, Schema, is_bool, json_loads
from .config import MAX_PARAMS, ModelConfig
from .io import CheckpointError, LoadedModel, TorchMissing, check_plan, require, weights_hash

INDEX_FILE = "model_index.json"
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")   # the pipelines whose UNet2DModel denoises the pictures themselves
LATENT_PARTS = ("vqvae", "vae", "text_encoder")      # what a latent or text-conditioned pipeline has besides its unet
UNET_CONFIG = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
DECLARATION = "ddpm.json"     # the user's declarations beside model_index.json (or in the unet folder)
# ddpm.json: the one field loading reads, the null class, checked; and what `ddpm export --diffusers` records beside
# it, the provenance of the folder it wrote (the ddpm checkpoint's weights hash and ModelConfig, the files as
# written), which nothing reads: the model run is the folder's own config.json, weights and scheduler config, each
# checked, and named by a hash over them (read_info). Any other field is refused (a misspelt "null_class" would
# otherwise leave a conditional model without its null class, silently).
DECLARATION_SCHEMA = Schema("ddpm declaration (ddpm.json)", {}, optional={
    "null_class": Opt(Int(min=0)),
    "format": Any(), "checkpoint_hash": Any(), "model_config": Any(), "files": Any(),   # not read: see above
    "plan": PLAN,   # the plan a distilled student was made for (`ddpm export --diffusers` of one): Model.recorded
}, hint="it holds {\"null_class\": K-1} (docs/diffusers.md)")
MAX_CONFIG_BYTES = 16 << 20   # a config JSON: a trained_betas table of MAX_T numbers is ~2 MB
MAX_LAYERS = 32     # layers_per_block: as many residual blocks per level as a ddpm model may have (num_res_blocks)
MAX_LEVELS = 16     # block_out_channels: resolution levels (1024 pixels halve to 1 in 11)
DIFFUSERS_HINT = "pip install diffusers (the model's network is diffusers' UNet2DModel)"

# diffusers' DDPMScheduler defaults: what a folder without a scheduler config is sampled with
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "prediction_type": "epsilon"}
# diffusers' beta_schedule -> runtime.schedule's recipe
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
# scheduler config fields that do not change the model or the maths the runtime runs (how diffusers' own pipeline
# picks its sampling grid, or settings of a feature that is off): accepted as they are
SAMPLING_ONLY = {"timestep_spacing", "steps_offset", "sample_max_value", "dynamic_thresholding_ratio",
                 "variance_type", "set_alpha_to_one", "clip_sample_range", "clip_sample", "thresholding",
                 "rescale_betas_zero_snr"}
# (field, value diffusers may hold, what the runtime does instead): values the runtime follows; any other is refused
FOLLOWED = {
    "clip_sample": ((True,), "the runtime clips x0_hat to [-1, 1] on every step"),
    "clip_sample_range": ((1, 1.0), "the runtime clips x0_hat to [-1, 1]"),
    "thresholding": ((False,), "the runtime has no dynamic thresholding"),
    "rescale_betas_zero_snr": ((False,), "a zero terminal SNR gives abar_{T-1} = 0, where eps predicts nothing"),
    "set_alpha_to_one": ((True,), "the runtime's DDIM ends at abar = 1 (the clean image)"),
    "variance_type": ((None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
                      "the runtime models the fixed variances beta~_t (--variance small) and beta_t (large)"),
    "timestep_spacing": (("leading", "linspace", "trailing"), "the runtime's spacings are linspace and trailing"),
}
SCHEDULE_FIELDS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "prediction_type"}
UNET_FOLLOWED = {"time_embedding_type": ("positional", "learned"), "class_embed_type": (None,)}
_noticed: set = set()


class DiffusersError(CheckpointError):
    """A diffusers folder this toolkit cannot run as it is; the message names the file and the field."""


class DiffusersMissing(TorchMissing):
    """The diffusers package is needed (to build a diffusers folder's network) and is not installed."""


def _there(path: Path) -> bool:
    """Whether anything is at `path` (a file, a folder, a pipe, a link, dangling or not): what the reader then
    finds there is read through files.input_path, which names anything that is not a file instead of taking it as
    missing (and never opens a pipe)."""
    return os.path.lexists(path)


def is_diffusers_folder(path) -> bool:
    """Whether `path` is a folder laid out as a diffusers pipeline (model_index.json, whatever is there: one that is
    not a readable file is then named as such by the reader) or a bare UNet2DModel folder (config.json beside
    diffusion_pytorch_model.* weights)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return _there(p / INDEX_FILE) or _there(p / UNET_CONFIG) and any(
        f.name.startswith("diffusion_pytorch_model.") for f in p.iterdir())


def _json(path: Path) -> dict:
    """A config file's JSON object; DiffusersError (one line) when it is missing, not a file (a folder, a pipe, a
    dangling link: files.input_path), too large or not an object."""
    path = input_path(path, DiffusersError)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise DiffusersError(f"{path} holds more than {MAX_CONFIG_BYTES >> 20} MiB; not a diffusers config")
        d = json_loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise DiffusersError(f"{path} is not readable JSON ({clip(e)})") from None
    if not isinstance(d, dict):
        raise DiffusersError(f"{path} is not a JSON object")
    return d


def locate(path) -> tuple[Path, Path | None, Path | None]:
    """(unet folder, scheduler config or None, ddpm.json or None) of a diffusers folder (module docstring).
    DiffusersError for a pipeline whose unet is not a UNet2DModel."""
    p = Path(path)
    if _there(p / INDEX_FILE):
        index = _json(p / INDEX_FILE)
        unet = index.get("unet")
        latent = sorted(k for k in LATENT_PARTS if index.get(k) not in (None, [None, None]))
        if latent or index.get("_class_name") not in PIXEL_PIPELINES:
            what = f"a latent pipeline (its {', '.join(latent)})" if latent else \
                f"a {clip(index.get('_class_name'), 40)}"
            raise DiffusersError(f"{p / INDEX_FILE} describes {what}; ddpm runs the pixel-space UNet2DModel of a "
                                 f"{' or '.join(PIXEL_PIPELINES)} folder")
        if unet is None:
            raise DiffusersError(f"{p / INDEX_FILE} names no unet (a {index.get('_class_name', 'pipeline')}); ddpm "
                                 f"runs the UNet2DModel of a DDPMPipeline or DDIMPipeline folder")
        if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
            raise DiffusersError(f"{p / INDEX_FILE}: unet is {clip(unet, 80)}, not a UNet2DModel; ddpm runs the pixel "
                                 f"models of DDPMPipeline and DDIMPipeline folders")
        sched = p / "scheduler" / SCHEDULER_CONFIG
        return p / "unet", sched if _there(sched) else None, (p / DECLARATION if _there(p / DECLARATION) else None)
    return p, _companion(p, SCHEDULER_CONFIG, f"scheduler/{SCHEDULER_CONFIG}"), _companion(p, DECLARATION, DECLARATION)


def _companion(unet_dir: Path, own: str, in_pipeline: str) -> Path | None:
    """Where a bare unet folder's companion file is, by one rule for each of them (the scheduler config, ddpm.json):
    `own` in the folder itself, else `in_pipeline` in its parent (the pipeline folder that a unet/ folder is part
    of: pipe/unet reads pipe/scheduler/scheduler_config.json and pipe/ddpm.json, as pipe does); None when neither is
    there (whatever is there is read through files.input_path: a folder or a pipe is named, not skipped)."""
    for path in (unet_dir / own, unet_dir.parent / in_pipeline):
        if _there(path):
            return path
    return None


def _number(value, where: str, lo: float, hi: float) -> float:
    if is_bool(value) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise DiffusersError(f"{where} is {clip(value, 40)}, not a number in ({lo:g}, {hi:g})")
    return float(value)


def schedule_fields(sched: dict, where: str) -> dict:
    """The ModelConfig fields (schedule, timesteps, prediction, beta_range, betas) of a diffusers scheduler config;
    DiffusersError naming the field for one the runtime cannot follow (FOLLOWED, an unknown prediction type or beta
    schedule, or a field this reader does not know: it may change the maths)."""
    for k, v in sched.items():
        if k.startswith("_") or k in SCHEDULE_FIELDS:
            continue
        if k not in SAMPLING_ONLY:
            raise DiffusersError(f"{where}: field {k!r} is not one ddpm knows, and it may change the sampling maths; "
                                 f"remove it if it does not (docs/diffusers.md)")
        if k in FOLLOWED and v not in FOLLOWED[k][0]:
            raise DiffusersError(f"{where}: {k} {json.dumps(v)} cannot be followed ({FOLLOWED[k][1]})")
    if sched.get("steps_offset", 0) and sched.get("timestep_spacing", "leading") == "leading":
        raise DiffusersError(f"{where}: steps_offset {json.dumps(sched['steps_offset'])} cannot be followed (the "
                             f"runtime's grids have no offset; set it to 0)")
    T = sched.get("num_train_timesteps", DDPM_DEFAULTS["num_train_timesteps"])
    if is_bool(T) or not isinstance(T, int) or not 2 <= T <= MAX_T:
        raise DiffusersError(f"{where}: num_train_timesteps is {clip(T, 40)}, not an integer in 2..{MAX_T}")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise DiffusersError(f"{where}: prediction_type {json.dumps(pred)[:40]} cannot be followed (the runtime "
                             f"takes epsilon or v_prediction models)")
    out = {"timesteps": T, "prediction": PREDICTION_TYPES[pred], "beta_range": None, "betas": None}
    table = sched.get("trained_betas")
    if table is not None:
        if not isinstance(table, list) or len(table) != T:
            raise DiffusersError(f"{where}: trained_betas must be a list of num_train_timesteps = {T} numbers")
        out.update(schedule="table", betas=tuple(_number(b, f"{where}: trained_betas[{i}]", 0, 1)
                                                 for i, b in enumerate(table)))
        return out
    name = sched.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES:
        raise DiffusersError(f"{where}: beta_schedule {json.dumps(name)[:40]} cannot be followed (the runtime has "
                             f"{', '.join(BETA_SCHEDULES)} and trained_betas)")
    out["schedule"] = BETA_SCHEDULES[name]
    if out["schedule"] != "cosine":
        out["beta_range"] = tuple(_number(sched.get(k, DDPM_DEFAULTS[k]), f"{where}: {k}", 0, 1)
                                  for k in ("beta_start", "beta_end"))
    return out


def _declaration(path: Path | None) -> dict:
    """What a ddpm.json declares, checked (DECLARATION_SCHEMA: its fields and no others); {} without one.
    DiffusersError for any other content."""
    if path is None:
        return {}
    d = _json(path)
    unknown = set(d) - set(DECLARATION_SCHEMA.optional)
    if unknown:
        raise DiffusersError(f"{path}: unknown field(s) {', '.join(sorted(map(clip, unknown)))}; it holds "
                             f"{{\"null_class\": K-1}} and, for a distilled student, its \"plan\"")
    DECLARATION_SCHEMA.check(d, path, DiffusersError)
    return d


def _declared_null(path: Path | None, classes: int) -> int | None:
    """The null class a ddpm.json declares ({"null_class": K-1}), or None without one. DiffusersError for any other
    content (_declaration): the null class must be the last index (ddpm's labels are 0..K-2 and the null label K-1)."""
    null = _declaration(path).get("null_class")
    if null is None:
        return None
    if null != classes - 1:
        raise DiffusersError(f"{path}: null_class must be the last class index {classes - 1} (num_class_embeds - 1), "
                             f"got {clip(null, 40)}")
    return null


def _declared_plan(path: Path | None) -> dict | None:
    """The plan a ddpm.json records (`ddpm export --diffusers` of a distilled student: PLAN), or None without one.
    DiffusersError for content DECLARATION_SCHEMA refuses (_declaration)."""
    return _declaration(path).get("plan")


def model_config(unet: dict, sched: dict, unet_where: str, sched_where: str, declaration: Path | None) -> ModelConfig:
    """The ModelConfig of a UNet2DModel config and a scheduler config (network "diffusers"); DiffusersError (one line
    naming the field) for what the runtime cannot follow."""
    size = unet.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if is_bool(size) or not isinstance(size, int) or not 1 <= size <= 1024:
        raise DiffusersError(f"{unet_where}: sample_size is {clip(size, 40)}; ddpm runs square images of 1..1024 "
                             f"pixels")
    cin, cout = unet.get("in_channels", 3), unet.get("out_channels", 3)
    if is_bool(cin) or not isinstance(cin, int) or not 1 <= cin <= 64:
        raise DiffusersError(f"{unet_where}: in_channels is {clip(cin, 40)}, not an integer in 1..64")
    if cout != cin:
        raise DiffusersError(f"{unet_where}: out_channels {clip(cout, 40)} differs from in_channels {cin} (a learned "
                             f"variance, or not a noise predictor); ddpm runs eps or v predictors")
    # the network's depth, bounded before anything is built (building 100000 layers takes hours even on the meta
    # device, where load() then counts the parameters that its channels give)
    layers = unet.get("layers_per_block", 2)
    if is_bool(layers) or not isinstance(layers, int) or not 1 <= layers <= MAX_LAYERS:
        raise DiffusersError(f"{unet_where}: layers_per_block is {clip(layers, 40)}, not an integer in "
                             f"1..{MAX_LAYERS}")
    channels = unet.get("block_out_channels", [64, 128, 256, 512])
    if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_LEVELS:
        raise DiffusersError(f"{unet_where}: block_out_channels is {clip(channels, 40)}, not a list of 1.."
                             f"{MAX_LEVELS} levels' channels")
    for k, allowed in UNET_FOLLOWED.items():
        if unet.get(k) not in allowed and not (k == "time_embedding_type" and k not in unet):
            raise DiffusersError(f"{unet_where}: {k} {json.dumps(unet.get(k))[:40]} cannot be followed (ddpm calls the "
                                 f"network at integer timesteps with a class index)")
    classes = unet.get("num_class_embeds")
    if classes is not None and (is_bool(classes) or not isinstance(classes, int) or not 2 <= classes
                                <= 100_001):
        raise DiffusersError(f"{unet_where}: num_class_embeds is {clip(classes, 40)}, not an integer in 2..100001")
    if classes is None:
        num_classes = 1    # one "class" and the null label, both the same unconditional network
    else:
        if _declared_null(declaration, classes) is None:
            raise DiffusersError(f"{unet_where}: a class-conditional model (num_class_embeds {classes}) with no null "
                                 f"class declared: ddpm samples it with classifier-free guidance and needs one; if "
                                 f"class {classes - 1} was trained as \"no label\", write {{\"null_class\": "
                                 f"{classes - 1}}} into {DECLARATION} beside {INDEX_FILE} (docs/diffusers.md)")
        num_classes = classes - 1
    fields = schedule_fields(sched, sched_where)
    try:
        return ModelConfig(image_size=size, in_channels=cin, num_classes=num_classes, network="diffusers",
                           **fields).validate()
    except (TypeError, ValueError) as e:
        raise DiffusersError(f"{sched_where}: {clip(e)}") from None


def _read_safetensors(path: Path, framework: str) -> dict:
    from safetensors import SafetensorError, safe_open

    from ..files import readable_name
    from .io import _WEIGHTS_FILE, check_header

    path = input_path(path, DiffusersError)
    check_header(path, DiffusersError, "re-save it with save_pretrained")
    try:
        with readable_name(path) as name, safe_open(name, framework=framework) as f:
            # the header's shapes bound the weights before any is read (a file of GBs of tensors)
            count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            if count > MAX_PARAMS:
                raise DiffusersError(f"{path} holds {count:,} weights, more than the {MAX_PARAMS:,} parameters a "
                                     f"model may have here")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffusersError(f"{path} is not a readable safetensors file ({clip(e)})") from None
    _WEIGHTS_FILE.check({"weights": state}, path, DiffusersError)
    return state


def _weights(unet_dir: Path) -> Path:
    path = unet_dir / WEIGHTS_FILE
    if _there(path):
        return path
    other = sorted(f.name for f in unet_dir.glob("diffusion_pytorch_model*")) if unet_dir.is_dir() else []
    if other:
        raise DiffusersError(f"{unet_dir} holds {', '.join(other[:3])} but not {WEIGHTS_FILE}: ddpm reads "
                             f"safetensors only (no pickled code); re-save it with save_pretrained(..., "
                             f"safe_serialization=True)")
    raise DiffusersError(f"{unet_dir} holds no {WEIGHTS_FILE}")


def read_info(path) -> tuple[ModelConfig, str, dict, Path]:
    """(config, hash, info, folder) of a diffusers folder, read with numpy (no PyTorch, no diffusers): as
    model.io.read_model_info. The hash covers the UNet config, the ModelConfig (with its schedule) and the weights,
    so that the export cache (export/cache.py, one folder per hash) keeps this model apart from every other.
    info["schedule_source"]: the scheduler config read, or "DDPM defaults"; a notice line says so on stderr when it
    is not the folder's own (_notice). Raises DiffusersError."""
    root = Path(path)
    unet_dir, sched_path, declaration = locate(root)
    unet = _json(unet_dir / UNET_CONFIG)
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffusersError(f"{unet_dir / UNET_CONFIG} describes a {clip(unet.get('_class_name'), 40)}, not a "
                             f"UNet2DModel")
    sched = _json(sched_path) if sched_path is not None else dict(DDPM_DEFAULTS)
    source = str(sched_path) if sched_path is not None else "DDPM defaults"
    cfg = model_config(unet, sched, str(unet_dir / UNET_CONFIG), source, declaration)
    weights = _weights(unet_dir)
    state = _read_safetensors(weights, "np")
    h = _identity(unet, cfg, state)
    _notice(root, sched_path)
    info = {"schedule_source": source, "diffusers_folder": str(root)}
    plan = _declared_plan(declaration)
    if plan is not None:
        info["plan"] = plan
        check_plan(declaration, cfg, info)
    return cfg, h, info, root


def _identity(unet: dict, cfg: ModelConfig, state: dict) -> str:
    """The hash of read_info: the UNet config (its "_" entries aside), the ModelConfig and the weights."""
    arch = {k: v for k, v in unet.items() if not k.startswith("_")}
    return hashlib.sha256(b"diffusers UNet2DModel|" + json.dumps(arch, sort_keys=True).encode()
                          + weights_hash(cfg, state).encode()).hexdigest()


def _notice(root: Path, sched_path: Path | None) -> None:
    """One line on stderr, once per folder, schedule source and process, when the schedule did not come from the
    folder given: diffusers' defaults (no scheduler config), or the scheduler of the pipeline that a bare unet folder
    is part of. A folder's own scheduler config is read silently (its timestep_spacing, diffusers' sampling grid,
    is not used: ddpm samples on its own, --spacing, as docs/diffusers.md says)."""
    if sched_path is not None and root in sched_path.parents:
        return
    key = (str(root.resolve()), str(sched_path))
    if key in _noticed:
        return
    _noticed.add(key)
    if sched_path is None:
        line = f"{root}: no scheduler config beside the unet: diffusers' DDPMScheduler defaults (linear betas " \
               f"1e-4..0.02, T = 1000, epsilon)"
    else:
        line = f"{root}: schedule from {sched_path}"
    print(f"ddpm: {line}", file=sys.stderr)


def require_diffusers(what: str):
    """The diffusers module, or DiffusersMissing (one line naming `pip install diffusers`)."""
    return require("diffusers", what, "the diffusers package", DIFFUSERS_HINT, DiffusersMissing)


def _eps_class():
    import torch

    class DiffusersEps(torch.nn.Module):
        """eps_theta(x, t, y) (or v_theta, as cfg.prediction says) of a diffusers UNet2DModel: x (B,C,H,W) float,
        t (B,) int64 timesteps 0..T-1, y (B,) int64 class indices (the null label cfg.null_label for none) ->
        (B,C,H,W) of x's dtype. The discrete-time wrapper of k-diffusion's external.py (DiscreteEpsDDPMDenoiser
        calls its model at the integer t of its sigma): here t is given as it is. An unconditional UNet ignores y;
        y still enters the graph (times 0), so the exported model keeps the x, t, y inputs of every ddpm model."""

        def __init__(self, unet, cfg: ModelConfig):
            super().__init__()
            self.unet, self.cfg = unet, cfg
            self.conditional = unet.config.num_class_embeds is not None

        def forward(self, x, t, y):
            out = self.unet(x, t, class_labels=y if self.conditional else None, return_dict=False)[0]
            if not self.conditional:
                out = out + (y * 0).to(out.dtype)[:, None, None, None]
            return out

    return DiffusersEps


def load(path) -> LoadedModel:
    """The network of a diffusers folder as a LoadedModel (model: DiffusersEps on the CPU, fp32, eval mode), its
    config, hash and info as read_info gives them. Needs PyTorch and diffusers (DiffusersMissing, TorchMissing);
    DiffusersError for a folder that is not one, or whose weights do not fit its config."""
    from .io import require_torch

    cfg, _, info, root = read_info(path)
    require_torch(f"loading {root}")
    require_diffusers(f"loading {root}")
    import torch
    from diffusers import UNet2DModel

    unet_dir = locate(root)[0]
    state = _read_safetensors(_weights(unet_dir), "pt")
    config = _json(unet_dir / UNET_CONFIG)
    try:
        # the size its config declares, counted on PyTorch's meta device (no memory) before the network is built
        with torch.device("meta"):
            count = sum(p.numel() for p in UNet2DModel.from_config(config).parameters())
    except Exception as e:   # diffusers raises many types for a config it cannot build
        raise DiffusersError(f"{unet_dir}: the UNet2DModel cannot be built from its config "
                             f"({type(e).__name__}: {clip(str(e).splitlines()[0] if str(e) else e)})") from None
    if count > MAX_PARAMS:
        raise DiffusersError(f"{unet_dir / UNET_CONFIG} declares a UNet2DModel of {count:,} parameters, more than "
                             f"the {MAX_PARAMS:,} a model may have here")
    try:
        unet = UNet2DModel.from_config(config)
        res = unet.load_state_dict(state, strict=False)
    except Exception as e:   # diffusers raises many types for a config it cannot build, torch for shapes
        raise DiffusersError(f"{unet_dir}: the UNet2DModel cannot be built from its config and weights "
                             f"({type(e).__name__}: {clip(str(e).splitlines()[0] if str(e) else e)})") from None
    if res.missing_keys or res.unexpected_keys:
        what, keys = ("missing", res.missing_keys) if res.missing_keys else ("unexpected", res.unexpected_keys)
        raise DiffusersError(f"{unet_dir}: weights do not fit its config ({what} "
                             f"{', '.join(clip(k, 60) for k in keys[:3])})")
    model = _eps_class()(unet.eval(), cfg).eval()   # from_config builds it in float32
    # the identity of what was built (the files are read twice: a rewrite in between shows as another hash)
    return LoadedModel(model, cfg, _identity(config, cfg, state), root, info)

