"""`ddpm distill`: guided progressive distillation of a teacher's deterministic DDIM sampler into a student that
samples in a few network calls, with the classifier-free guidance folded in (one batch per call, not two).

Two stages, as in Meng et al. 2023, "On Distillation of Guided Diffusion Models" (sec. 4.1), with one fixed
guidance scale w instead of w as a network input (so the student is the same UNet as the teacher: every engine,
export and the web page run it unchanged):

  Stage 1 (fold, `fold_iters` steps): the student's conditional x0_hat matches the teacher's guided one at the
      timesteps of the teacher's DDIM-N grid: eps_w = (1 + w) eps(z, t, y) - w eps(z, t, null) (Ho & Salimans
      2022, eq. 6; the convention of runtime.eager.guided), with guidance only where the noise level
      sqrt((1 - abar_t) / abar_t) lies in the guidance interval (lo, hi] (Kynkaanniemi et al. 2024), as `ddpm gen`
      guides. Samples drawn with the null label (probability p_uncond) match the teacher's unconditional output,
      so the student keeps its unconditional mode.
  Stage 2 (halving rounds, `iters` steps each): progressive distillation (Salimans & Ho 2022, Algorithm 2). The
      student at N/2 steps starts from the teacher at N steps; for z_t = alpha_t x + sigma_t eps at a student
      timestep t, two DDIM steps of the teacher (t -> t' -> t'', eta 0, x0_hat clipped as the sampler clips it)
      give z_t'', and the student's x0_hat is regressed on

          x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

      the x0_hat with which one DDIM step of the student lands on z_t'' (the student's DDIM table: x~ = (z_t'' -
      w_x z_t) / w_x0; after the last row, alpha = 1 and sigma = 0, so x~ = z_0). Then the student becomes the
      teacher (its EMA weights) and N halves, steps_from -> ... -> steps_to. Without stage 1 (fold_iters 0) the
      first round's teacher is guided, which folds guidance and halves the steps at once at twice the teacher cost.

The loss is the truncated-SNR weighting of Salimans & Ho 2022 (sec. 4), max(||x - x_hat||^2, ||eps - eps_hat||^2)
= max(SNR_t, 1) ||x~ - x0_hat||^2 with SNR_t = abar_t / (1 - abar_t), on the network's own output (eps or v: the
x0_hat columns of runtime.samplers.Plan). Why these stages: folding guidance first halves the teacher's cost in
every later round (one batch, not two); halving keeps each round's target two steps of a model that is already
close to the student, which is what lets progressive distillation reach 4 steps at the teacher's quality where
one-shot distillation to 4 steps does not (Salimans & Ho, sec. 5; Meng et al., table 1).

The grid is DDIM's "trailing" spacing (runtime.samplers.timesteps): for steps dividing T (and their halvings),
the student's N/2 timesteps are exactly every second one of the teacher's N, the last row lands on x0.

Every stage's student is an ordinary model file whose metadata records the plan it was distilled for (`plan`:
sampler ddim, its steps, spacing trailing, eta 0, guidance 0 because it is folded), which `ddpm gen --ckpt` and
`ddpm.load` use unless the user overrides it (options.recorded_plan). The run reuses the training loop's pieces
(train.loop: resolve_run, build_state, run_steps, Checkpoints, EMA, options.json, resume, signals): a resumed run
continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Collection

import numpy as np
import torch

from ..errors import OptionError
from ..model.io import (CKPT_FILE, MODEL_FILE, CheckpointError, default_model_path, read_model_info, save_model,
                        weights_hash)
from ..options import GUIDANCE, GUIDANCE_INTERVAL, MAX_GUIDANCE
from ..runtime.samplers import Plan, ddim_plan, timesteps
from ..runtime.schedule import Schedule
from . import loop
from .loop import (RUN_FILES, SAMPLES_FILE, BatchOrder, Checkpoints, State, TrainConfig, TrainingError,
                   _output_step, build_state, in_run_folder, learning_rate, make_batch, optimizer_step, resolve_run,
                   run_steps, write_samples)

SPACING = "trailing"          # the grid whose halvings nest (module docstring)
TRUNCATED_SNR = "truncated-snr"


@dataclass
class DistillConfig(TrainConfig):
    """The options of `ddpm distill`: TrainConfig's (batch, lr, EMA, seed, device, checkpoints, ...), where `init`
    is the teacher, plus the distillation's. `steps` (the run's optimizer steps) follows from the others:
    fold_steps + rounds * iters."""
    out: str = "runs/distill"
    lr: float = 1e-4
    warmup: int = 50                # per stage: every stage starts a new Adam
    ckpt_every: int = 500
    steps_from: int = 32            # the teacher's DDIM steps (trailing spacing): the first round's two-step target
    steps_to: int = 4               # the last student's steps: steps_from halved, round after round
    iters: int = 2000               # optimizer steps per halving round (stage 2)
    fold_iters: int = 1000          # optimizer steps folding the guidance in (stage 1; 0: in the first round)
    guidance: float = GUIDANCE      # w folded in: (1 + w) eps_c - w eps_u (0: no guidance, no stage 1)
    guidance_lo: float = GUIDANCE_INTERVAL[0]   # guidance where the noise level sigma lies in (lo, hi] ...
    guidance_hi: float = GUIDANCE_INTERVAL[1]   # ... (0, inf: every step), as `ddpm gen` guides

    lr_schedule_default: ClassVar[str] = "cosine"        # within each stage: cosine to lr_final * lr
    loss_weight_default: ClassVar[str] = TRUNCATED_SNR
    loss_weights: ClassVar[tuple[str, ...]] = (TRUNCATED_SNR,)
    command: ClassVar[str] = "ddpm distill"
    init_flag: ClassVar[str] = "--teacher"
    new_run: ClassVar[str] = "start a new run with another --out"
    train_on: ClassVar[str] = "its students are all written; distil one further in a new run with --teacher {out}"

    def __post_init__(self):
        self.steps = self.fold_steps + self.rounds * self.iters

    @property
    def rounds(self) -> int:
        """Halving rounds from steps_from to steps_to (0 when they are not a power of two apart)."""
        ratio = self.steps_from // max(self.steps_to, 1)
        ok = self.steps_to >= 1 and ratio >= 2 and ratio * self.steps_to == self.steps_from and not ratio & (ratio - 1)
        return int(math.log2(ratio)) if ok else 0

    @property
    def fold_steps(self) -> int:
        """Optimizer steps of stage 1: fold_iters with guidance to fold, else none."""
        return self.fold_iters if self.guidance > 0 else 0


@dataclass(frozen=True)
class Stage:
    """A stretch of the run with one teacher: optimizer steps start .. start + length - 1."""
    start: int
    length: int
    teacher_steps: int      # rows of the teacher's DDIM plan
    student_steps: int      # rows of the student's: teacher_steps (stage 1) or half of it (a round)
    guidance: float         # w the teacher applies (0: the teacher alone, its guidance already folded or none)

    @property
    def end(self) -> int:
        return self.start + self.length


def stages(cfg: DistillConfig) -> list[Stage]:
    """The run's stages in order: stage 1 (when it folds guidance), then one halving round per power of two."""
    out, at = [], 0
    if cfg.fold_steps:
        out.append(Stage(0, cfg.fold_steps, cfg.steps_from, cfg.steps_from, cfg.guidance))
        at = cfg.fold_steps
    for k in range(cfg.rounds):
        n = cfg.steps_from >> k
        w = cfg.guidance if k == 0 and not cfg.fold_steps else 0.0
        out.append(Stage(at, cfg.iters, n, n // 2, w))
        at += cfg.iters
    return out


def stage_at(cfg: DistillConfig, step: int) -> Stage:
    """The stage that optimizer step `step` belongs to."""
    return next(s for s in stages(cfg) if s.start <= step < s.end)


def check(cfg: DistillConfig, T: int | None = None) -> None:
    """The distillation's options checked against each other, before anything is read or written: steps_from and
    steps_to a power of two apart, iters >= 1, fold_iters >= 0, a guidance scale in [0, MAX_GUIDANCE] and an
    interval 0 <= lo < hi; each an errors.OptionError naming its option (on the command line a usage error, exit
    status 2). With T (the teacher's, once it is read): steps_from within 1..T, with nested trailing grids, else an
    OptionError on steps_from too, as `ddpm gen --steps` beyond the model's T is."""
    if not (isinstance(cfg.steps_to, int) and isinstance(cfg.steps_from, int)) or cfg.rounds == 0:
        raise OptionError(f"--steps-from {cfg.steps_from} must be --steps-to {cfg.steps_to} times a power of two "
                          f"(2, 4, 8, ...), e.g. --steps-from 32 --steps-to 4: each round halves the steps",
                          "steps_from")
    if cfg.iters < 1:
        raise OptionError(f"need --iters >= 1, got {cfg.iters}", "iters")
    if cfg.fold_iters < 0:
        raise OptionError(f"need --fold-iters >= 0, got {cfg.fold_iters}", "fold_iters")
    if not 0 <= cfg.guidance <= MAX_GUIDANCE:
        raise OptionError(f"--guidance must be in [0, {MAX_GUIDANCE:g}], got {cfg.guidance}", "guidance")
    if not 0 <= cfg.guidance_lo < cfg.guidance_hi:   # also refuses NaN
        raise OptionError(f"the guidance interval needs 0 <= lo < hi, got ({cfg.guidance_lo}, {cfg.guidance_hi}]",
                          "guidance_interval")
    if T is not None:
        if cfg.steps_from > T:
            raise OptionError(f"{cfg.steps_from} exceeds the teacher's T={T}", "steps_from")
        sched_T = Schedule.make("linear", T)   # the grid depends on T alone
        for s in stages(cfg):
            if s.student_steps != s.teacher_steps and not np.array_equal(
                    timesteps(sched_T, s.teacher_steps, SPACING)[::2], timesteps(sched_T, s.student_steps, SPACING)):
                raise OptionError(f"with T={T} the {s.student_steps}-step grid is not every second timestep of the "
                                  f"{s.teacher_steps}-step one; choose --steps-from so that its halvings divide T",
                                  "steps_from")


# ------------------------------------------------------------------------------------------------------ the maths
def plan_of(cfg: DistillConfig, sched: Schedule, steps: int) -> Plan:
    """The deterministic DDIM plan of `steps` calls on the distillation grid (eta 0, trailing, x0_hat clipped)."""
    return ddim_plan(sched, steps, 0.0, spacing=SPACING)


class Table:
    """A plan's per-row columns as float32 tensors on a device, read per sample: col(name, rows) is (B,1,1,1)."""

    def __init__(self, plan: Plan, device: torch.device, lo: float = 0.0, hi: float = math.inf):
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32, device=device)
        self.rows = plan.steps
        self.t = torch.as_tensor(plan.timesteps, device=device)
        self.cols = {name: f32(getattr(plan, name)) for name in ("x0_x", "x0_out", "w_x", "w_x0")}
        self.cols["snr_weight"] = f32(np.maximum(plan.abar / (1.0 - plan.abar), 1.0))   # max(SNR_t, 1)
        self.cols["sqrt_abar"] = f32(np.sqrt(plan.abar))
        self.cols["sqrt_1m_abar"] = f32(np.sqrt(1.0 - plan.abar))
        level = plan.noise_level
        self.cols["guided"] = f32((level > lo) & (level <= hi))   # 1 where guidance applies (the interval)

    def col(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self.cols[name][rows].view(-1, 1, 1, 1)


def guided_eps(net, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label: int,
               w: torch.Tensor) -> torch.Tensor:
    """The network's output with classifier-free guidance per sample: (1 + w) out(z, t, y) - w out(z, t, null),
    written out(y) + w (out(y) - out(null)) as runtime.eager.guided computes it (Ho & Salimans 2022, eq. 6).
    z (B,C,H,W); t, y (B,) int64; w (B,) float32, 0 where a sample is not guided (then out(y) alone, and when no
    sample is guided, one batch)."""
    if not bool((w > 0).any()):
        return net(z, t, y)
    out = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = out.chunk(2)
    return cond + w.view(-1, 1, 1, 1) * (cond - uncond)


def ddim_step(tab: Table, rows: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One DDIM row of a plan per sample (runtime.samplers: x0_hat = x0_x z - x0_out out clipped to [-1, 1], then
    w_x z + w_x0 x0_hat; eta 0, no noise), as the sampler runs it."""
    x0 = (tab.col("x0_x", rows) * z - tab.col("x0_out", rows) * out).clamp(-1.0, 1.0)
    return tab.col("w_x", rows) * z + tab.col("w_x0", rows) * x0


@torch.no_grad()
def target(teacher, stage: Stage, tt: Table, ts: Table, rows: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
           null_label: int, amp=None) -> torch.Tensor:
    """x~ (B,C,H,W) float32, what the student's x0_hat at its row `rows` (B,) and state z is regressed on (module
    docstring): stage 1, the teacher's guided x0_hat (unclipped) at the same row; a round, the x0_hat with which
    the student's DDIM step lands where two teacher DDIM steps (rows 2i, 2i+1) land."""
    w = lambda r: stage.guidance * tt.col("guided", r).view(-1)
    with torch.autocast(z.device.type, dtype=amp, enabled=amp is not None):
        if stage.student_steps == stage.teacher_steps:
            out = guided_eps(teacher, z, tt.t[rows], y, null_label, w(rows)).float()
            return tt.col("x0_x", rows) * z - tt.col("x0_out", rows) * out
        j = 2 * rows
        z1 = ddim_step(tt, j, z, guided_eps(teacher, z, tt.t[j], y, null_label, w(j)).float())
        z2 = ddim_step(tt, j + 1, z1, guided_eps(teacher, z1, tt.t[j + 1], y, null_label, w(j + 1)).float())
    return (z2 - ts.col("w_x", rows) * z) / ts.col("w_x0", rows)


def distill_loss(student, teacher, stage: Stage, tt: Table, ts: Table, x0, y, rows, noise, null_label: int,
                 amp=None) -> torch.Tensor:
    """The batch mean of max(SNR_t, 1) ||x~ - x0_hat||^2 / (C H W) (truncated-SNR weighting, Salimans & Ho 2022,
    sec. 4) at z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t the student's row `rows`; x0, noise (B,C,H,W)
    float32, y and rows (B,) int64. Returns a scalar float32 tensor whose gradient reaches the student only."""
    z = ts.col("sqrt_abar", rows) * x0 + ts.col("sqrt_1m_abar", rows) * noise
    want = target(teacher, stage, tt, ts, rows, z, y, null_label, amp)
    with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
        out = student(z, ts.t[rows], y)
    x0_hat = ts.col("x0_x", rows) * z - ts.col("x0_out", rows) * out.float()
    per_sample = (x0_hat - want).pow(2).flatten(1).mean(1)
    return (ts.cols["snr_weight"][rows] * per_sample).mean()


# ------------------------------------------------------------------------------------------------------- the run
def student_file(steps: int) -> str:
    """The file of the student distilled for `steps` network calls, beside the run's model.safetensors."""
    return f"student{steps}.safetensors"


def recorded_plan(steps: int, distilled: dict) -> dict:
    """The plan a student's model file records (its metadata entry "plan"; options.recorded_plan reads it): DDIM
    with eta 0 on the trailing grid, `steps` calls, guidance 0 (folded in: one batch per call), and how it was
    distilled."""
    return {"sampler": "ddim", "steps": steps, "spacing": SPACING, "eta": 0.0, "guidance": 0.0,
            "guidance_interval": None, "distilled": distilled}


class DistillCheckpoints(Checkpoints):
    """Checkpoints of a distillation: also at every stage's end, the teacher's weights in ckpt.pt, the student's
    plan in its model files, each stage's student kept as student<steps>.safetensors, the grid drawn with the
    student's own plan."""

    def __init__(self, run, state: State, teacher, distilled: dict):
        super().__init__(run, state)
        self.teacher, self.distilled = teacher, distilled
        self.ends = {s.end: s for s in stages(run.cfg)}
        self.sched = Schedule.of(run.mcfg)

    def due(self, done: int) -> bool:
        return super().due(done) or done in self.ends

    def contents(self, step: int) -> dict:
        plan = recorded_plan(stage_at(self.run.cfg, max(step - 1, 0)).student_steps, self.distilled)
        return dict(super().contents(step), teacher=self.teacher.state_dict(), distilled=self.distilled, plan=plan)

    def _outputs(self, step: int) -> dict:
        """name -> writer of the files of `step`: model.safetensors, samples.png and, at a stage's end, its
        student's file."""
        run, ema = self.run, self.state.ema
        stage = stage_at(run.cfg, step - 1)
        plan = recorded_plan(stage.student_steps, self.distilled)
        model = lambda name: lambda: save_model(run.out / name, run.mcfg, ema.state_dict(), step=step, plan=plan)
        out = {MODEL_FILE: model(MODEL_FILE)}
        if step in self.ends:
            out[student_file(stage.student_steps)] = model(student_file(stage.student_steps))
        out[SAMPLES_FILE] = lambda: write_samples(ema, run.mcfg, run.out / SAMPLES_FILE, seed=run.cfg.seed,
                                                  step=step, plan=plan_of(run.cfg, self.sched, stage.student_steps),
                                                  guidance=0.0)
        return out

    def write_outputs(self, step: int) -> None:
        for write in self._outputs(step).values():
            write()

    def complete(self, step: int) -> list[str]:
        done = []
        for name, write in self._outputs(step).items():
            if _output_step(self.run.out / name) != step:
                write()
                done.append(name)
        return done


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, log=print,
            given: Collection[str] | None = None) -> dict:
    """Distil cfg.init (the teacher: a model file, ckpt.pt or run folder; None: the shipped default model) into
    students of steps_from/2 .. steps_to DDIM steps (module docstring); returns train's summary (steps, seconds,
    steps/s, last loss, losses) plus "students", the student files written. Writes under cfg.out: options.json,
    log.jsonl, ckpt.pt, model.safetensors (the latest student), student<steps>.safetensors, samples.png.

    --resume continues the run in cfg.out with its own options (train.loop.resumed_options: only the batch-free
    options of RESUME_MAY_CHANGE may differ), bit for bit. Raises TrainingError, DataError, errors.Interrupted."""
    check(cfg)
    if cfg.prediction is not None:
        raise TrainingError("a student predicts what its teacher predicts: leave out prediction")
    if not resume and cfg.init is None:
        cfg = dataclasses.replace(cfg, init=str(default_model_path()))
    files = (*RUN_FILES, *(student_file(s.student_steps) for s in stages(cfg)))
    return in_run_folder(cfg, resume, "ddpm distill", files, lambda: _distill(cfg, resume, progress, log, given))


def _distill(cfg: DistillConfig, resume: bool, progress: bool, log, given) -> dict:
    distilled = None
    if not resume:
        try:
            _, teacher_hash, info, _ = read_model_info(cfg.init)
        except CheckpointError as e:
            raise TrainingError(f"{cfg.init_flag}: {e}") from None
        before = (info.get("plan") or {}).get("distilled") if isinstance(info.get("plan"), dict) else None
        folded = float(before.get("guidance", 0.0)) if isinstance(before, dict) else 0.0
        if folded and cfg.guidance:
            # options that do not fit the teacher: a usage error (exit 2), as a --steps-from beyond its T
            raise OptionError(f"the teacher {cfg.init} has guidance {folded:g} folded in already; give --guidance 0 "
                              f"to distil it further", "guidance")
        distilled = {"guidance": cfg.guidance or folded, "guidance_interval": [cfg.guidance_lo, cfg.guidance_hi],
                     "teacher": teacher_hash, "teacher_steps": cfg.steps_from}
    run = resolve_run(cfg, resume, log, given)
    if distilled is not None and weights_hash(run.mcfg, run.init_state) != distilled["teacher"]:   # read twice
        raise TrainingError(f"the teacher {cfg.init} changed while it was read; run the command again")
    try:   # the options given were checked (distill); these may be a resumed run's own
        check(run.cfg, run.mcfg.timesteps)
    except OptionError as e:
        if not resume:   # the options given do not fit the teacher's T: a usage error, as gen's --steps beyond T
            raise
        raise TrainingError(f"--resume: {run.out} was started with options that do not fit ({e}); start a new run "
                            f"with another --out") from None
    state = build_state(run)
    teacher = copy.deepcopy(state.model).eval().requires_grad_(False)
    if run.ckpt is not None:
        try:
            teacher.load_state_dict(run.ckpt["teacher"])
            distilled = dict(run.ckpt["distilled"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"--resume: {run.out / CKPT_FILE} holds no distillation's teacher that fits "
                                f"({str(e).splitlines()[0]}); resume it with the command that wrote it") from None
    checkpoints = DistillCheckpoints(run, state, teacher, distilled)
    summary = loop.begin(run, state, checkpoints, log,
                         lambda ck: distill_loop(run, state, teacher, progress, ck))
    summary["students"] = [str(run.out / student_file(s.student_steps)) for s in stages(run.cfg)
                           if (run.out / student_file(s.student_steps)).is_file()]
    return summary


def next_stage(st: State, teacher, lr: float) -> None:
    """The student of the stage that ended becomes the teacher of the next (its EMA weights), and the new student
    starts from it with a new Adam (Salimans & Ho 2022, Algorithm 2)."""
    weights = st.ema.state_dict()
    teacher.load_state_dict(weights)
    st.model.load_state_dict(weights)
    st.opt = torch.optim.Adam(st.model.parameters(), lr=lr)


def distill_loop(run, st: State, teacher, progress: bool, checkpoints: DistillCheckpoints) -> dict:
    """Optimizer steps st.start .. cfg.steps - 1 of the stages (train.loop.run_steps: progress, logging, NaN check,
    checkpoints); at a stage's first step (after the first) the teacher and student move on (`next_stage`)."""
    cfg, mcfg, ctx, device = run.cfg, run.mcfg, run.ctx, run.device
    net = ctx.wrap(st.model)
    amp = torch.bfloat16 if device.type == "cuda" else None
    order = BatchOrder(len(st.images), cfg.batch_size, cfg.seed)
    shard = slice(ctx.rank, None, ctx.world)   # this rank's share of every global batch
    sched = Schedule.of(mcfg)
    tables: dict[int, Table] = {}
    table = lambda n: tables.setdefault(n, Table(plan_of(cfg, sched, n), device, cfg.guidance_lo, cfg.guidance_hi))
    teacher.to(device)

    def one_step(step: int) -> torch.Tensor:
        stage = stage_at(cfg, step)
        n = step - stage.start                          # the step within its stage
        if n == 0 and step > 0:
            next_stage(st, teacher, cfg.lr)
        tt, ts = table(stage.teacher_steps), table(stage.student_steps)
        x0, y, rows, noise = (v[shard].to(device, non_blocking=True) for v in
                              make_batch(step, cfg, order, st.images, st.labels, ts.rows, mcfg.null_label))
        loss = distill_loss(net, teacher, stage, tt, ts, x0, y, rows, noise, mcfg.null_label, amp)
        per_stage = TrainConfig(lr=cfg.lr, warmup=cfg.warmup, steps=stage.length, lr_schedule=cfg.lr_schedule,
                                lr_final=cfg.lr_final)
        optimizer_step(st, loss, learning_rate(per_stage, n), cfg.grad_clip, min(cfg.ema_decay, (1 + n) / (10 + n)))
        return loss

    return run_steps(run, st, progress, one_step, checkpoints)

