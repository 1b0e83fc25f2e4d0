"""The DDPM training loop: eps-MSE (Ho et al. 2020, Algorithm 1), Adam, EMA, classifier-free label dropout.

Every step's randomness (batch indices, t, noise, dropped labels) comes from a generator seeded by (seed, step), so
an interrupted run resumed from its checkpoint continues exactly as if it had never stopped, and a distributed run
(each rank takes its shard of the same global batch) sees the same data as a single process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import itertools
import math
import os
import re
import time
from dataclasses import dataclass
from typing import ClassVar, Collection, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DdpmError, brief
from ..launch import launch
from ..files import (OutputError, atomic_write, check_writable, clean_stale, folder_lock, output_path, readable_name,
                     write_failure, write_text)
from ..model import PRESETS, UNet
from ..model.config import ModelConfig
from ..model.io import (CKPT_FILE, MODEL_FILE, CheckpointError, check_fits, load_checkpoint, read_weights,
                        resolve_model_path, save_checkpoint, save_model, stored_config)
from ..runtime.noise import check_seed
from ..runtime.schedule import PREDICTIONS, Schedule
from ..schema import json_loads
from ..signals import stop_message
from . import dist
from .data import ensure_mnist, load_mnist, resolve_data_dir


RUN_FILES = ("options.json", "log.jsonl", CKPT_FILE, MODEL_FILE, "samples.png")   # what a run folder holds
LOG_FILE, SAMPLES_FILE = "log.jsonl", "samples.png"


class TrainingError(DdpmError):
    """Training cannot go on (bad options, NaN loss, incompatible resume); the message says why."""


@dataclass
class TrainConfig:
    data: str | None = None         # MNIST folder (None: $DDPM_DATA or the cache folder)
    out: str = "runs/ddpm"          # run directory: options.json, ckpt.pt, model.safetensors, samples.png
    init: str | None = None         # start model and EMA from these weights (a model file or run folder): fine-tuning
    # None below: "small"/"linear"/1000 for a new run, the model's own with --init or --resume
    preset: str | None = None       # model size: tiny | small | large
    steps: int = 10000              # total optimizer steps
    batch_size: int = 128           # global batch (split over ranks under torchrun)
    lr: float = 2e-4                # Adam learning rate (after warm-up)
    warmup: int = 200               # linear learning-rate warm-up steps
    schedule: str | None = None     # beta schedule: linear | cosine
    timesteps: int | None = None    # T
    ema_decay: float = 0.999        # EMA of the weights (warmed up as min(decay, (1+n)/(10+n)))
    p_uncond: float = 0.1           # probability of replacing a label by "no label" (classifier-free guidance)
    grad_clip: float = 1.0          # gradient norm clip
    seed: int = 0                   # everything random derives from it
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    ckpt_every: int = 1000          # checkpoint + sample grid every this many steps (and at the end)
    log_every: int = 10             # loss check (NaN) and progress refresh interval
    # None below: "constant"/"eps" for a new run, the checkpoint's own setting on --resume
    lr_schedule: str | None = None  # after the warm-up: constant | cosine (decay to lr_final * lr at the last step)
    lr_final: float = 0.01          # cosine: the learning rate at the last step, as a fraction of lr
    loss_weight: str | None = None  # eps: plain MSE | min-snr: min(SNR_t, 5) / SNR_t per sample (Hang et al. 2023)
    # None: "eps" for a new run, the model's own with --init or --resume; --init may switch it (fine-tuning the
    # network to the other output), --resume may not
    prediction: str | None = None   # what the network learns to output: eps | v (Salimans & Ho 2022)
    block: str | None = None        # the same for the residual block: ddpm | diffusers (model.config.BLOCKS)

    lr_schedule_default: ClassVar[str] = "constant"
    loss_weight_default: ClassVar[str] = "eps"
    loss_weights: ClassVar[tuple[str, ...]] = ("eps", "min-snr")   # LOSS_WEIGHTS: the choices of loss_weight
    model_defaults: ClassVar[dict] = {"preset": "small", "schedule": "linear", "timesteps": 1000}
    # how the messages name the command, its `init` option, a new run from a run's weights, and what lengthens a run
    command: ClassVar[str] = "ddpm train"
    init_flag: ClassVar[str] = "--init"
    new_run: ClassVar[str] = "start a new run from its weights with --init"
    train_on: ClassVar[str] = "raise --steps to train on"

    def model_config(self, given: ModelConfig | None = None, source: str = "") -> ModelConfig:
        """The model to train: `given` (the config of the --init weights or the --resume checkpoint, named by
        `source`, e.g. "--init: runs/x") when there is one, else the preset with the schedule and T. A preset,
        schedule or T set here that contradicts `given` raises TrainingError (one line, what to change)."""
        if self.preset is not None and self.preset not in PRESETS:
            raise TrainingError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if given is None:
            d = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in self.model_defaults.items()}
            try:
                return dataclasses.replace(PRESETS[d["preset"]], schedule=d["schedule"], timesteps=d["timesteps"],
                                           prediction=self.prediction or "eps", block=self.block or "ddpm").validate()
            except ValueError as e:
                raise TrainingError(str(e)) from None
        wrong = [f"--{k} {getattr(self, k)}" for k in ("schedule", "timesteps")
                 if getattr(self, k) is not None and getattr(self, k) != getattr(given, k)]
        if self.preset is not None and preset_of(given) != self.preset:
            wrong.insert(0, f"--preset {self.preset}")
        if wrong:
            raise TrainingError(f"{source} holds a {describe(given)}, not {', '.join(wrong)}; leave out "
                                f"{', '.join(w.split()[0] for w in wrong)} to train that model")
        return given


def preset_of(cfg: ModelConfig) -> str | None:
    """The name of the preset `cfg` is (whatever its schedule and T), None when it is none of them."""
    return next((name for name, p in PRESETS.items()
                 if dataclasses.replace(p, schedule=cfg.schedule, timesteps=cfg.timesteps,
                                        prediction=cfg.prediction, block=cfg.block) == cfg), None)


def describe(cfg: ModelConfig) -> str:
    """A model config in a few words, e.g. "tiny model (linear schedule, T=1000)"."""
    name = preset_of(cfg) or f"custom {cfg.base_channels}-channel"
    v = ", v-prediction" if cfg.prediction == "v" else ""
    block = ", diffusers block" if cfg.block == "diffusers" else ""
    return f"{name} model ({cfg.schedule} schedule, T={cfg.timesteps}{v}{block})"


LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTS = TrainConfig.loss_weights
MIN_SNR_GAMMA = 5.0   # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": gamma = 5


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up over cfg.warmup steps, then constant or
    a half cosine from cfg.lr down to cfg.lr_final * cfg.lr at the last step (cfg.steps - 1)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "constant" or step < cfg.warmup:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup))
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def loss_weights(name: str, alphas_cumprod, prediction: str = "eps") -> torch.Tensor:
    """(T,) float32 per-timestep weights of the MSE on the network's output: 1 for "eps"; for "min-snr" (Hang et al.
    2023, sec. 3.4, gamma = 5), with SNR_t = abar_t / (1 - abar_t), min(SNR_t, gamma) / SNR_t when the network
    predicts eps and min(SNR_t, gamma) / (SNR_t + 1) when it predicts v: either way the weight min(SNR_t, gamma)
    on the x0-MSE. TrainingError for an unknown name."""
    ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
    if name == "eps":
        return torch.ones_like(ac, dtype=torch.float32)
    if name == "min-snr":
        snr = ac / (1.0 - ac)
        return (snr.clamp(max=MIN_SNR_GAMMA) / (snr if prediction == "eps" else snr + 1.0)).float()
    raise TrainingError(f"unknown loss weighting {name!r}; choose from {', '.join(LOSS_WEIGHTS)}")


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device; TrainingError for anything else or a GPU that is not there."""
    from ..runtime.engines import resolve_device as resolve

    try:
        return torch.device(resolve(name))
    except ValueError as e:
        raise TrainingError(str(e)) from None


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1, np.uint64)[0]) >> 1)


class BatchOrder:
    """Epoch-wise random permutations of the dataset, indexed by global step (drop_last)."""

    def __init__(self, n: int, batch: int, seed: int):
        if batch > n:
            raise TrainingError(f"batch size {batch} exceeds the dataset size {n}")
        self.n, self.batch, self.seed, self._epoch, self._perm = n, batch, seed, -1, None

    def indices(self, step: int) -> torch.Tensor:
        per_epoch = self.n // self.batch
        epoch, k = divmod(step, per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, 2]).generate_state(1, np.uint64)[0]) >> 1)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch:(k + 1) * self.batch]


def make_batch(step: int, cfg, order: BatchOrder, images: torch.Tensor, labels: torch.Tensor, T: int,
               null_label: int):
    """The global batch of a step, from the generator of (cfg.seed, step): (x0 in [-1, 1] (B, 1, H, W), y (B,) int64
    with labels dropped to null_label at rate cfg.p_uncond, t (B,) int64 uniform in 0..T-1, noise (B, 1, H, W)), all
    on CPU. cfg: any config with seed and p_uncond (TrainConfig, train.distill.DistillConfig, whose T is its rows)."""
    g = step_generator(cfg.seed, step)
    idx = order.indices(step)
    x0 = images[idx].unsqueeze(1).float() / 127.5 - 1.0
    y = labels[idx].long()
    # t ~ Uniform{0, ..., T-1}: every timestep, t=0 and t=T-1 included (Algorithm 1, shifted by one)
    t = torch.randint(0, T, (len(idx),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    y[torch.rand(len(idx), generator=g) < cfg.p_uncond] = null_label
    return x0, y, t, noise


def diffusion_loss(model, x0, y, t, noise, sqrt_ac, sqrt_1m_ac, autocast_dtype=None, weights=None,
                   prediction: str = "eps") -> torch.Tensor:
    """The simple loss: || target - net(x_t, t, y) ||^2 with x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps, where the
    target is eps (DDPM eq. 14) or v = sqrt(abar_t) eps - sqrt(1-abar_t) x0 (Salimans & Ho 2022, appendix D).

    x0, noise: (B, C, H, W) float; y, t: (B,) int64; sqrt_ac, sqrt_1m_ac: (T,) float tables (runtime.schedule).
    weights: optional (T,) per-timestep weights (see `loss_weights`); the loss is then the batch mean of
    weights[t_i] * MSE_i, with MSE_i the mean over sample i's pixels. Returns a scalar float32 tensor.
    """
    a, s = sqrt_ac[t].view(-1, 1, 1, 1), sqrt_1m_ac[t].view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    target = noise if prediction == "eps" else a * noise - s * x0
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = model(x_t, t, y)
    if weights is None:
        return F.mse_loss(pred.float(), target)
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    return (weights[t] * per_sample).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def write_samples(ema: UNet, cfg: ModelConfig, path: Path, seed: int = 0, n: int = 40, steps: int = 25,
                  step: int | None = None, plan=None, guidance: float = 1.0) -> None:
    """A grid of class-conditional samples (4 rows of 0..9; DDIM-`steps`, or `plan`, with classifier-free guidance
    `guidance`) from the EMA model; `step` (the training step of the weights) is stored in the PNG's text as
    "ddpm-step", so that --resume can tell a grid that is missing or older than its checkpoint."""
    from ..runtime.images import save_grid, to_uint8
    from ..runtime.eager import guided, sample
    from ..runtime.noise import make_noise
    from ..runtime.samplers import ddim_plan

    dev = next(ema.parameters()).device
    plan = plan or ddim_plan(Schedule.of(cfg), min(steps, cfg.timesteps))
    x_T, _ = make_noise(seed, 0, n, plan.num_slots, cfg.image_shape)
    labels = torch.arange(n, device=dev) % cfg.num_classes
    x = sample(guided(ema, labels, cfg.null_label, guidance), torch.from_numpy(x_T).to(dev), plan)
    save_grid(to_uint8(x), path, nrow=10, text=None if step is None else {"ddpm-step": str(step)})


def _output_step(path: Path) -> int | None:
    """The training step of a run's model.safetensors or samples.png, None when missing or unreadable."""
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return int(im.text["ddpm-step"])
        from safetensors import safe_open

        with readable_name(path) as name, safe_open(name, framework="np") as f:
            return int(json.loads((f.metadata() or {})["step"]))
    except Exception:   # missing, truncated, foreign: all mean "not this checkpoint's"
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime_ns) of a file, None when it is missing: tells whether an atomic write replaced it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _last(step: int | None) -> str:
    return "no checkpoint written yet" if step is None else f"last checkpoint at step {step}"


def _stopped(what: str, e: OutputError, last: int | None) -> TrainingError:
    """The error of a run stopped by a failed write of `what` (a full disk, say), saying how to go on from the last
    checkpoint on disk (step `last`, None when there is none)."""
    how = ("then continue with --resume" if last is not None else
           "then run the same command again (without --resume: nothing to resume yet)")
    return TrainingError(f"{what}: {e.fault}; {how} ({_last(last)})")


def _complete_outputs(out: Path, step: int, ema: UNet, mcfg: ModelConfig, seed: int) -> list[str]:
    """Write the model.safetensors and samples.png of the checkpoint's `step` where they are missing, unreadable or
    of another step (a run killed while it wrote them); returns what was written, each with what it replaced
    ("samples.png (it was missing)", "model.safetensors (it held step 10)")."""
    done = []
    for name, write in ((MODEL_FILE, lambda: save_model(out / MODEL_FILE, mcfg, ema.state_dict(), step=step)),
                        (SAMPLES_FILE, lambda: write_samples(ema, mcfg, out / SAMPLES_FILE, seed=seed, step=step))):
        held = _output_step(out / name)
        if held != step:
            was = ("it was missing" if not os.path.lexists(out / name) else
                   "it was unreadable" if held is None else f"it held step {held}")
            write()
            done.append(f"{name} ({was})")
    return done


# log.jsonl holds one row per step, {"step": S, "loss": L} as append_log writes it: at most 64 bytes with the newline
# (S up to 19 digits, PyTorch's int64; L a float's repr, up to 24 characters), 40 to 45 in a real run.
MAX_LOG_LINE = 4096
# The log's size at most, read (and cut) by every resumed run: 1 GiB holds 16.7 million rows of the longest form
# (about 24 million of the usual), 1400 times the longest run in these docs (12,000 steps) and 20 times DDPM's own
# longest schedule (800,000 steps, Ho et al. 2020 on CIFAR-10); checking such a log takes about a minute, and
# cutting it (streamed, never held whole) another.
MAX_LOG_BYTES = 1 << 30
_ROW = re.compile(rb'\{"step": (0|[1-9][0-9]{0,18}), "loss": -?[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?\}\n?')   # append_log's form
_ROW_START = b'{"step": '


def _row_step(line: bytes) -> int | None:
    """The step of a line of log.jsonl that is a row ({"step": S, "loss": L}, S an integer >= 0, L a number; in
    append_log's form, or any JSON object of those); None for anything else. `line` is at most MAX_LOG_LINE bytes:
    JSON nested deeper than the decoder goes is not a row either."""
    m = _ROW.fullmatch(line)
    if m is not None:
        return int(m[1])
    try:
        row = json_loads(line)
    except (ValueError, RecursionError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    loss = row.get("loss") if isinstance(row, dict) else None
    if type(step) is not int or step < 0 or type(loss) not in (int, float):
        return None
    return step


def _refused_log(path: Path, why: str, then: str) -> TrainingError:
    return TrainingError(f"{path} {why}; it is the run's record and is kept as it is: {then}, and run again")


def log_rows(path: Path) -> Iterator[tuple[bytes, int | None]]:
    """(line, its step) for each line of a run's log.jsonl, read line by line within MAX_LOG_BYTES and MAX_LOG_LINE.
    The last line without its newline is an append cut by a kill: yielded with its step when it is a whole row, with
    None when it is the start of one. Raises TrainingError (one line; the log is not changed) for a log over
    MAX_LOG_BYTES, a line over MAX_LOG_LINE, or a line that is not a row (_row_step): not the run's, so not dropped."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TrainingError(f"cannot read {path} ({e.strerror or e}); make it readable, and run again") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        read = 0
        for number in itertools.count(1):
            if max(size, read) > MAX_LOG_BYTES:
                raise _refused_log(path, f"holds {max(size, read) >> 20} MiB, more than a run's log ever does "
                                         f"({MAX_LOG_BYTES >> 20} MiB, over 16 million steps)",
                                   "move it aside (a new log starts from the checkpoint)")
            line = f.readline(MAX_LOG_LINE + 1)
            if not line:
                return
            read += len(line)
            if len(line) > MAX_LOG_LINE:
                raise _refused_log(path, f"line {number} is longer than {MAX_LOG_LINE} bytes, which no row of the log "
                                         f"({{\"step\": S, \"loss\": L}}) is", f"remove line {number}")
            step = _row_step(line)
            cut = not line.endswith(b"\n") and _ROW_START.startswith(line[:len(_ROW_START)])   # a row's start, last
            if step is None and not cut:
                held = brief(line.rstrip(b"\n"), 40)
                raise _refused_log(path, f"line {number} is not a row of the log ({{\"step\": S, \"loss\": L}}): "
                                         f"{held}", f"remove line {number}")
            yield line, step


def check_log(path: Path) -> None:
    """Read a run's log.jsonl through (log_rows) before any work of a run that will cut it: TrainingError (one line)
    for one that is too large or holds a line that is not a row. A missing log passes."""
    if os.path.isfile(path):
        for _ in log_rows(path):
            pass


def cut_log(path: Path, step: int) -> None:
    """Keep the rows of log.jsonl up to `step` (the checkpoint a run resumes from), atomically and line by line
    (log_rows: bounded, and TrainingError for a line that is not a row, the log unchanged): the steps after it are
    trained again and logged again. A row cut by a kill (the last line, without its newline) is dropped."""
    if not path.is_file():
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for line, s in log_rows(path):
                if s is not None and s <= step:
                    out.write(line if line.endswith(b"\n") else line + b"\n")

    atomic_write(path, write)


def append_log(path: Path, rows: list[dict]) -> None:
    """Append rows to log.jsonl in one write() (a kill leaves whole lines, or at worst one cut line that cut_log
    drops). A log.jsonl that is not a regular file (a device, a pipe, a dangling link) raises OutputError
    (files.output_path); a link to a regular file is appended to. A failed write (a full disk, the file-size limit)
    raises OutputError naming the file (files.write_failure)."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path = output_path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_failure(path, e) from None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print,
          given: Collection[str] | None = None) -> dict:
    """Train; returns a summary (steps, seconds, steps/s, last loss). Writes everything under cfg.out.

    On --resume every option not in `given` (the names of the TrainConfig fields the user set; None: those that
    differ from TrainConfig's defaults) is the run's own, read from its checkpoint, so that the run continues as if
    it had never stopped; a given one that changes the run's maths is refused (see `resumed_options`).

    Only one process trains in a run folder at a time (files.folder_lock), and a new run never overwrites another
    one's checkpoint: without --resume, a folder holding a ckpt.pt is refused. Raises TrainingError, DataError,
    errors.Interrupted (Ctrl-C; errors.Terminated for SIGTERM: the message names the last checkpoint)."""
    return in_run_folder(cfg, resume, "ddpm train", RUN_FILES, lambda: _train(cfg, resume, progress, log, given))


def in_run_folder(cfg: TrainConfig, resume: bool, command: str, files: Collection[str], body):
    """body() run while this process holds the run folder cfg.out (files.folder_lock), after the checks that come
    before any work: the folder and the `files` the run writes there are writable (regular files or nothing, none
    read-only: files.check_writable), and without --resume it holds no run yet; a folder that is not a run folder
    (no options.json, no ckpt.pt) and holds a file of one of those names is refused (it is the user's), and so is a
    run's log.jsonl that is too large or holds a line that is not a row (check_log). Under
    torchrun only rank 0 checks and locks. Raises TrainingError."""
    out = Path(cfg.out)
    if launch().rank:   # under torchrun only rank 0 writes
        return body()
    try:
        check_writable(out, folder=True)   # before the data, the model or a single step
        for name in files:                 # and what the run will write there: regular files or nothing, and
            check_writable(out / name)     # none read-only (its owner protected it: refused, not replaced)
    except OutputError as e:
        raise TrainingError(f"--out: {e}") from None
    if not resume and (out / CKPT_FILE).is_file():
        raise TrainingError(f"{out} already holds a run ({CKPT_FILE}); continue it with --resume, or give another "
                            f"--out")
    if resume and not (out / CKPT_FILE).is_file():   # before the lock, which would make the folder
        raise _nothing_to_resume(out)
    if not (out / "options.json").is_file() and not (out / CKPT_FILE).is_file():
        # not a run folder (a run writes options.json before anything else): files named as the run's are the
        # user's own, which the run would replace; files of other names are left alone, so such a folder is used
        theirs = [name for name in files if os.path.lexists(out / name)]
        if theirs:
            raise TrainingError(f"--out {out} is not a run folder (no options.json or {CKPT_FILE}) but holds "
                                f"{', '.join(theirs)}, which {command} would replace; give another --out")
    check_log(out / LOG_FILE)   # the run cuts it back to its checkpoint (cut_log): it must be a log to cut
    made = not os.path.lexists(out)
    try:
        with folder_lock(out, command):
            return body()
    except OutputError as e:
        raise TrainingError(str(e)) from None
    finally:
        if made:   # a run refused before it wrote anything: the folder it made goes too
            with contextlib.suppress(OSError):
                out.rmdir()   # only an empty folder is removed


def _train(cfg: TrainConfig, resume: bool, progress: bool, log, given: Collection[str] | None) -> dict:
    run = resolve_run(cfg, resume, log, given)
    state = build_state(run)
    return begin(run, state, Checkpoints(run, state), log, lambda ck: train_loop(run, state, progress, ck))


def begin(run: "Run", state: "State", checkpoints: "Checkpoints", log, loop) -> dict:
    """Begin (or continue) a resolved run: a resumed run already at its last step only completes its outputs
    (`_complete`); else options.json is written and log.jsonl cut back to the checkpoint, then loop(checkpoints)
    trains and returns the summary."""
    if run.resume and state.start >= run.cfg.steps:
        return _complete(run, state, log, checkpoints)
    if run.ctx.rank == 0:
        opts = dict(dataclasses.asdict(run.cfg), model_config=run.mcfg.to_dict(), world_size=run.ctx.world,
                    resumed_from=state.start, device=str(run.device), torch=torch.__version__)
        write_text(run.out / "options.json", json.dumps(opts, indent=2) + "\n")
        cut_log(run.out / LOG_FILE, state.start)   # the steps after the checkpoint are trained (and logged) again
    return loop(checkpoints)


@dataclass
class Run:
    """A run resolved from its options, before anything is built: what to train, where, and from what."""
    cfg: TrainConfig              # every option resolved: the model's fields, the data folder, lr_schedule, ...
    mcfg: ModelConfig             # the network
    out: Path                     # the run folder
    resume: bool                  # continue from ckpt
    ckpt: dict | None             # the checkpoint of --resume (load_checkpoint)
    init_state: dict | None       # the weights of --init
    ctx: dist.DistContext         # this process among the torchrun processes (one: a no-op)
    device: torch.device


def _check_options(cfg: TrainConfig) -> None:
    """TrainingError (one line) for an option out of range or not one of its choices."""
    for name, value, low in (("steps", cfg.steps, 1), ("batch_size", cfg.batch_size, 1), ("ckpt_every", cfg.ckpt_every, 1),
                             ("log_every", cfg.log_every, 1), ("warmup", cfg.warmup, 0)):
        if value < low:
            raise TrainingError(f"{name} must be >= {low}, got {value}")
    if not (0 < cfg.lr < math.inf and 0 <= cfg.ema_decay < 1 and 0 <= cfg.p_uncond < 1 and 0 <= cfg.lr_final <= 1
            and 0 < cfg.grad_clip < math.inf):
        raise TrainingError("need a finite lr > 0, 0 <= ema_decay < 1, 0 <= p_uncond < 1, 0 <= lr_final <= 1 and a "
                            "finite grad_clip > 0")
    try:
        check_seed(cfg.seed)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.lr_schedule not in (None, *LR_SCHEDULES):
        raise TrainingError(f"unknown learning-rate schedule {cfg.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    if cfg.loss_weight not in (None, *cfg.loss_weights):
        raise TrainingError(f"unknown loss weighting {cfg.loss_weight!r}; choose from {', '.join(cfg.loss_weights)}")
    if cfg.prediction not in (None, *PREDICTIONS):
        raise TrainingError(f"unknown prediction {cfg.prediction!r}; choose from {', '.join(PREDICTIONS)}")


def _nothing_to_resume(out: Path) -> TrainingError:
    return TrainingError(f"--resume: no {CKPT_FILE} in {out}: no checkpoint was completed there, so there is "
                         f"nothing to resume; run the same command without --resume to start it")


def _read_resume(out: Path, cfg: TrainConfig) -> tuple[dict, ModelConfig]:
    """(checkpoint, its model config) of the run in `out`, checked to fit before a network is built from it and to
    be a run of cfg's command (a `ddpm distill` checkpoint holds its teacher and what it distils, `distilled`)."""
    if not (out / CKPT_FILE).is_file():
        raise _nothing_to_resume(out)
    try:
        ckpt = load_checkpoint(out / CKPT_FILE)
        distill_run = "distilled" in ckpt
        if distill_run != (type(cfg).command == "ddpm distill"):
            wrote = "ddpm distill" if distill_run else "ddpm train"
            raise TrainingError(f"--resume: {out} holds a `{wrote}` run, not a `{type(cfg).command}` one; continue "
                                f"it with `{wrote} --out {out} --resume`")
        given = stored_config(out / CKPT_FILE, ckpt["model_config"])
    except CheckpointError as e:
        raise TrainingError(f"--resume: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise TrainingError(f"--resume: {out / CKPT_FILE} holds an invalid model config ({e})") from None
    try:
        for weights in ("ema", "model"):
            check_fits(out / CKPT_FILE, given, ckpt[weights])
    except CheckpointError as e:
        raise TrainingError(f"--resume: {out / CKPT_FILE} does not fit this model ({str(e).split(': ', 1)[1]}); "
                            f"use an earlier checkpoint or start a new run") from None
    return ckpt, given


def _resumed_optimisation(cfg: TrainConfig, ckpt: dict | None, where: Path) -> TrainConfig:
    """cfg with lr_schedule and loss_weight resolved: the checkpoint's on --resume (a different one given is a
    TrainingError), else the one given or the default."""
    if ckpt is not None:
        stored = ckpt.get("train_config", {})
        for key in ("lr_schedule", "loss_weight"):   # how the run optimises: --resume keeps it
            have = stored.get(key) or getattr(type(cfg), key + "_default")
            if getattr(cfg, key) not in (None, have):
                raise TrainingError(f"--resume: {where} was trained with {key}={brief(have)}, "
                                    f"not {getattr(cfg, key)!r}; resume with the same setting or leave it out")
            cfg = dataclasses.replace(cfg, **{key: have})
    return dataclasses.replace(cfg, lr_schedule=cfg.lr_schedule or type(cfg).lr_schedule_default,
                               loss_weight=cfg.loss_weight or type(cfg).loss_weight_default)


# What --resume may change: where the run stops, how often it checkpoints and logs, where it runs and reads MNIST.
# Every other option is the run's maths (the batch, the dropped labels, the seed, the optimiser, the model).
RESUME_MAY_CHANGE = ("steps", "ckpt_every", "log_every", "device", "data")
# The options resolved elsewhere (None: not given): the model's (TrainConfig.model_config, --prediction) and the
# optimisation's (_resumed_optimisation); the run folder itself.
_RESOLVED_ELSEWHERE = ("out", "preset", "schedule", "timesteps", "prediction", "block", "lr_schedule", "loss_weight")
# `ddpm train` and `ddpm distill` flags not named after their field
_FLAGS = {"batch_size": "--batch", "ema_decay": "--ema", "guidance_lo": "--guidance-interval",
          "guidance_hi": "--guidance-interval"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _weights_file(init: str) -> str | None:
    """The model file an --init (or --teacher) path names, absolute, as options.json records it; None if none."""
    try:
        return str(resolve_model_path(init).absolute())
    except (CheckpointError, OSError):
        return None


def resumed_options(cfg: TrainConfig, stored: dict, given: Collection[str] | None, where: Path) -> TrainConfig:
    """cfg with every option the user did not give (not in `given`; None: the fields that differ from TrainConfig's
    defaults) taken from `stored`, the checkpoint's train config, so that --resume continues the run it resumes.
    A given option that contradicts the stored one raises TrainingError (one line naming them all), unless it is
    one of RESUME_MAY_CHANGE. A key missing from `stored` keeps cfg's value."""
    defaults = type(cfg)()
    if given is None:
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    take, wrong = {}, []
    for f in dataclasses.fields(cfg):
        name = f.name
        if name in _RESOLVED_ELSEWHERE or name not in stored:
            continue
        if name not in given:
            value, default = stored[name], getattr(defaults, name)
            kinds = (str, type(None)) if default is None else (int, float) if isinstance(default, float) else type(default)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise TrainingError(f"--resume: {where} holds an invalid train config ({name}={brief(value)}); "
                                    f"give {_flag(name)} or start a new run")
            take[name] = value
        elif name == "init" and cfg.init is not None and _weights_file(cfg.init) != stored[name]:
            # the weights are the checkpoint's: another start is not honoured (the same one, as recorded, is)
            raise TrainingError(f"--resume continues {where} from its own weights: leave out {type(cfg).init_flag}, "
                                f"or {type(cfg).new_run}")
        elif name not in RESUME_MAY_CHANGE and name != "init" and getattr(cfg, name) != stored[name]:
            wrong.append((name, stored[name], getattr(cfg, name)))
    if wrong:
        was = ", ".join(f"{_flag(n)} {brief(s)}" for n, s, _ in wrong)
        now = ", ".join(f"{_flag(n)} {brief(g)}" for n, _, g in wrong)
        raise TrainingError(f"--resume: {where} was trained with {was}, not {now}; leave "
                            f"{'it' if len(wrong) == 1 else 'them'} out to continue the run, or {type(cfg).new_run}")
    return dataclasses.replace(cfg, **take)


def resolve_run(cfg: TrainConfig, resume: bool, log, given: Collection[str] | None = None) -> Run:
    """The run of these options: options checked, on --resume the options not `given` taken from the checkpoint
    (resumed_options), the model config (the checkpoint's on --resume, the weights' with --init, else the preset), the processes and device, the folder cleaned of a killed run's temporaries and the
    MNIST folder made ready (downloaded by rank 0). Raises TrainingError, DataError."""
    _check_options(cfg)
    out = Path(cfg.out)
    ckpt, init_state, model_given, source = None, None, None, ""
    if resume:
        ckpt, model_given = _read_resume(out, cfg)
        source = f"--resume: {out / CKPT_FILE}"
        cfg = resumed_options(cfg, ckpt.get("train_config") or {}, given, out / CKPT_FILE)
        _check_options(cfg)
    elif cfg.init:
        try:
            model_given, init_state, init_info = read_weights(cfg.init)
        except CheckpointError as e:
            raise TrainingError(f"{type(cfg).init_flag}: {e}") from None
        plan = init_info.get("plan")
        if type(cfg).init_flag == "--init" and isinstance(plan, dict) and plan.get("distilled"):
            # a student's weights hold the guidance folded in for its plan: trained on as an ordinary model, it
            # would lose that plan and be sampled with guidance again
            raise TrainingError(f"--init: {cfg.init} is a distilled student (guidance "
                                f"{plan['distilled'].get('guidance', 0):g} folded in, for {plan['sampler']}-"
                                f"{plan['steps']}): train from its teacher, or distil it further with `ddpm distill "
                                f"--teacher {cfg.init} --guidance 0`")
        source = f"{type(cfg).init_flag}: {cfg.init}"
        cfg = dataclasses.replace(cfg, init=str(resolve_model_path(cfg.init).absolute()))   # the file, recorded
    mcfg = cfg.model_config(model_given, source)
    for key in ("prediction", "block"):   # --init: fine-tune to the other output, or to the other block
        if getattr(cfg, key) is not None and getattr(cfg, key) != getattr(mcfg, key):
            if resume:
                raise TrainingError(f"{source} holds a {describe(mcfg)}, not --{key} {getattr(cfg, key)}; leave out "
                                    f"--{key} to resume it")
            mcfg = dataclasses.replace(mcfg, **{key: getattr(cfg, key)}).validate()
    cfg = dataclasses.replace(cfg, preset=preset_of(mcfg), schedule=mcfg.schedule, timesteps=mcfg.timesteps,
                              prediction=mcfg.prediction, block=mcfg.block)
    ctx = dist.setup(cfg.device)
    device = ctx.device if ctx.world > 1 else resolve_device(cfg.device)
    if cfg.batch_size % ctx.world:
        raise TrainingError(f"global batch {cfg.batch_size} is not divisible by {ctx.world} processes")
    if ctx.rank == 0:
        for name in RUN_FILES:
            clean_stale(out, name)             # temporaries of a killed run's writes
    data_dir = resolve_data_dir(cfg.data)
    if ctx.rank == 0:
        data_dir = ensure_mnist(data_dir, download=True, progress=log)
    ctx.barrier()
    cfg = dataclasses.replace(cfg, data=str(Path(data_dir).absolute()))   # options.json records the folder used
    cfg = _resumed_optimisation(cfg, ckpt, out / CKPT_FILE)
    return Run(cfg, mcfg, out, resume, ckpt, init_state, ctx, device)


@dataclass
class State:
    """What the steps change, and the data they read."""
    model: UNet
    ema: UNet                      # the EMA of the model's weights, what is saved as model.safetensors
    opt: torch.optim.Optimizer
    images: torch.Tensor           # (N, H, W) uint8, the training split
    labels: torch.Tensor           # (N,) uint8
    start: int                     # the first step to train (the checkpoint's on --resume)


def build_state(run: Run) -> State:
    """The seeded model (with the --init weights), its EMA and Adam, the training data, and on --resume the
    checkpoint's weights, optimiser state and torch RNG state. Raises TrainingError when the model's image shape is
    not the data's or the checkpoint does not fit."""
    torch.manual_seed(run.cfg.seed)
    images, labels = load_mnist(run.cfg.data, "train")
    if run.cfg.batch_size > len(images):   # refused here, before options.json is written (BatchOrder refuses it too)
        raise TrainingError(f"batch size {run.cfg.batch_size} exceeds the dataset size {len(images)}")
    data_shape = (1, *images.shape[1:])   # MNIST: greyscale
    if data_shape != run.mcfg.image_shape:
        raise TrainingError(f"the model takes images of {'x'.join(map(str, run.mcfg.image_shape))}, the training data "
                            f"(MNIST) holds {'x'.join(map(str, data_shape))}: training reads MNIST only, so train a "
                            f"model of that shape")
    model = UNet(run.mcfg)
    if run.init_state is not None:   # on --resume the checkpoint holds the weights (an --init is then only recorded)
        model.load_state_dict(run.init_state)
    model = model.to(run.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=run.cfg.lr)
    start = 0
    if run.ckpt is not None:
        try:
            model.load_state_dict(run.ckpt["model"])
            ema.load_state_dict(run.ckpt["ema"])
            opt.load_state_dict(run.ckpt["opt"])
            torch.set_rng_state(run.ckpt["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"--resume: {run.out / CKPT_FILE} does not fit this model "
                                f"({str(e).splitlines()[0]}); use an earlier checkpoint or start a new run") from None
        start = int(run.ckpt["step"])
    return State(model, ema, opt, torch.from_numpy(images), torch.from_numpy(labels), start)


def _complete(run: Run, state: State, log, checkpoints: "Checkpoints") -> dict:
    """A resumed run already at its last step (killed while it wrote that checkpoint's model or grid): write what
    is missing, or TrainingError when nothing is."""
    done = checkpoints.complete(state.start) if run.ctx.rank == 0 else []
    run.ctx.teardown()
    if not done:
        raise TrainingError(f"--resume: the checkpoint is already at step {state.start} >= {run.cfg.steps}, "
                            f"the run's last ({type(run.cfg).train_on.format(out=run.out)})")
    log(f"the run in {run.out} is complete at step {state.start}: wrote {', '.join(done)}")
    return {"steps": 0, "seconds": 0.0, "steps_per_s": 0.0, "checkpoint_seconds": 0.0, "loss": float("nan"),
            "losses": []}


class Checkpoints:
    """Writes the run's checkpoints (rank 0; every rank waits for it) and knows the last one on disk, for the
    message of a run that stops."""

    def __init__(self, run: Run, state: State):
        self.run, self.state = run, state
        self.last = state.start if run.resume else None   # the step of the last checkpoint on disk
        self.seconds = 0.0                                  # spent writing checkpoints and grids

    def where(self) -> str:
        """Where the run can go on from, e.g. "last checkpoint at step 200 in runs/x, continue with --resume"."""
        return _last(self.last) + (f" in {self.run.out}, continue with --resume" if self.last is not None else "")

    def due(self, done: int) -> bool:
        """Whether a checkpoint is written after `done` steps: every ckpt_every steps and at the end."""
        return done % self.run.cfg.ckpt_every == 0 or done == self.run.cfg.steps

    def contents(self, step: int) -> dict:
        """What ckpt.pt holds at `step` (model.io.CKPT): the weights, their EMA, the optimiser, the configs and the
        torch RNG state."""
        run, st = self.run, self.state
        return {"step": step, "model": st.model.state_dict(), "ema": st.ema.state_dict(),
                "opt": st.opt.state_dict(), "model_config": run.mcfg.to_dict(),
                "train_config": dataclasses.asdict(run.cfg), "torch_rng": torch.get_rng_state()}

    def write_outputs(self, step: int) -> None:
        """The inference files of `step`, written before its ckpt.pt: model.safetensors and samples.png."""
        run, st = self.run, self.state
        save_model(run.out / MODEL_FILE, run.mcfg, st.ema.state_dict(), step=step)
        write_samples(st.ema, run.mcfg, run.out / SAMPLES_FILE, seed=run.cfg.seed, step=step)

    def complete(self, step: int) -> list[str]:
        """Write the outputs of the checkpoint's `step` that are missing or older (a run killed while it wrote
        them); returns the names written."""
        return _complete_outputs(self.run.out, step, self.state.ema, self.run.mcfg, self.run.cfg.seed)

    def save(self, step: int) -> None:
        run, t = self.run, time.perf_counter()
        if run.ctx.rank == 0:
            state = self.contents(step)
            try:
                # ckpt.pt last: whatever step it holds, the model and the grid of that step were written before it
                self.write_outputs(step)
                before = _identity(run.out / CKPT_FILE)
                try:
                    save_checkpoint(run.out / CKPT_FILE, state)
                finally:   # a signal after the rename (inside the folder's fsync): this checkpoint is on disk
                    if _identity(run.out / CKPT_FILE) not in (None, before):
                        self.last = step
            except OutputError as e:
                raise _stopped(f"checkpoint at step {step}", e, self.last) from None
        run.ctx.barrier()
        self.last = step
        self.seconds += time.perf_counter() - t


def loss_tables(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sqrt(abar_t), sqrt(1 - abar_t), the loss weights or None for plain MSE), (T,) float32 on the run's device."""
    sched = Schedule.of(run.mcfg)
    sqrt_ac = torch.tensor(sched.sqrt_alphas_cumprod, dtype=torch.float32, device=run.device)
    sqrt_1m_ac = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, dtype=torch.float32, device=run.device)
    weights = (None if run.cfg.loss_weight == "eps" else
               loss_weights(run.cfg.loss_weight, sched.alphas_cumprod, run.mcfg.prediction).to(run.device))
    return sqrt_ac, sqrt_1m_ac, weights


def train_loop(run: Run, st: State, progress: bool, checkpoints: Checkpoints | None = None) -> dict:
    """Steps st.start .. cfg.steps - 1 (Algorithm 1 with label dropout, Adam, clipping, EMA) run by `run_steps`.
    Returns the summary of `train`."""
    cfg, mcfg, ctx, device = run.cfg, run.mcfg, run.ctx, run.device
    net, (sqrt_ac, sqrt_1m_ac, weights) = ctx.wrap(st.model), loss_tables(run)
    amp = torch.bfloat16 if device.type == "cuda" else None
    order = BatchOrder(len(st.images), cfg.batch_size, cfg.seed)
    shard = slice(ctx.rank, None, ctx.world)   # this rank's share of every global batch

    def one_step(step: int) -> torch.Tensor:
        x0, y, t, noise = (v[shard].to(device, non_blocking=True) for v in
                           make_batch(step, cfg, order, st.images, st.labels, mcfg.timesteps, mcfg.null_label))
        loss = diffusion_loss(net, x0, y, t, noise, sqrt_ac, sqrt_1m_ac, amp, weights, mcfg.prediction)
        optimizer_step(st, loss, learning_rate(cfg, step), cfg.grad_clip, min(cfg.ema_decay, (1 + step) / (10 + step)))
        return loss

    return run_steps(run, st, progress, one_step, checkpoints or Checkpoints(run, st))


def optimizer_step(st: State, loss: torch.Tensor, lr: float, grad_clip: float, ema_decay: float) -> None:
    """One Adam step on `loss` at learning rate `lr`, the gradient norm clipped to grad_clip, then the EMA updated
    with `ema_decay`."""
    for group in st.opt.param_groups:
        group["lr"] = lr
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st.model.parameters(), grad_clip)
    st.opt.step()
    ema_update(st.ema, st.model, ema_decay)


def run_steps(run: Run, st: State, progress: bool, one_step, checkpoints: Checkpoints) -> dict:
    """Steps st.start .. cfg.steps - 1, each one_step(step) -> its loss (a scalar tensor; the step optimises), with
    a progress bar, the losses checked and logged once per window of log_every steps, and a checkpoint where
    checkpoints.due(done); what stops the run says where it can resume. Returns the summary of `train`."""
    from tqdm import tqdm

    cfg, ctx, device = run.cfg, run.ctx, run.device
    bar = tqdm(total=cfg.steps, initial=st.start, disable=not progress or ctx.rank != 0, unit="step",
               dynamic_ncols=True)
    losses = torch.zeros(cfg.log_every, device=device)   # this window's losses, checked (NaN) at the window's end
    history: list[float] = []
    t0, pending = time.perf_counter(), 0
    st.model.train()
    with stop_message(checkpoints.where, TrainingError):   # Ctrl-C, SIGTERM, a resource limit: where to resume
        try:
            for step in range(st.start, cfg.steps):
                loss = one_step(step)
                losses[pending] = loss.detach()
                pending, done = pending + 1, step + 1
                at_ckpt = checkpoints.due(done)
                if pending == cfg.log_every or at_ckpt:
                    history.extend(_log_window(run, losses[:pending], done, bar, checkpoints.last))
                    pending = 0
                if at_ckpt:
                    checkpoints.save(done)
        except RuntimeError as e:   # under torchrun: a collective whose peer died (gloo/NCCL), said in one line
            if ctx.world > 1 and dist.peer_failure(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrainingError(f"another process of this torchrun job stopped or lost its connection "
                                    f"({brief(first, 160)}); {checkpoints.where()}") from None
            raise
        finally:
            bar.close()             # whatever stops the run, its message starts on a line of its own
    seconds = time.perf_counter() - t0 - checkpoints.seconds   # training steps only, not checkpoints and grids
    ctx.teardown()
    return {"steps": cfg.steps - st.start, "seconds": seconds, "steps_per_s": (cfg.steps - st.start) / seconds,
            "checkpoint_seconds": checkpoints.seconds, "loss": history[-1] if history else float("nan"),
            "losses": history}


def _log_window(run: Run, losses: torch.Tensor, done: int, bar, last: int | None) -> list[float]:
    """The losses of the window ending at step `done`, averaged over the processes (one host sync per window, not
    per step), checked (TrainingError when one is not finite, naming the last checkpoint on disk, step `last`, or
    that there is none), appended to log.jsonl (rank 0) and shown."""
    window = run.ctx.mean(losses)
    if not bool(torch.isfinite(window).all()):
        kept = "no checkpoint was written yet" if last is None else \
            f"the last good checkpoint (step {last}) in {run.out} is kept"
        raise TrainingError(f"loss became non-finite by step {done}; stopped, {kept} (try a lower --lr)")
    values = window.tolist()
    if run.ctx.rank == 0:
        try:
            append_log(run.out / LOG_FILE, [{"step": done - len(values) + k + 1, "loss": v}
                                            for k, v in enumerate(values)])
        except OutputError as e:
            raise _stopped(f"log at step {done}", e, last) from None
    bar.set_postfix(loss=f"{window.mean().item():.4f}")
    bar.update(len(values))
    return values
