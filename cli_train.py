"""`ddpm train` and `ddpm distill`: their options and the calls of train.loop.train and train.distill.distill (cli.py
adds them to the `ddpm` group)."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_options import (Finite, InputPath, PathArg, add_options, check_output, device_syntax, needs_torch,
                          parse_interval, refuse_same_path)
from .errors import LimitReached, shown
from .model.config import BLOCKS, PRESETS
from .options import GUIDANCE, GUIDANCE_INTERVAL, MAX_GUIDANCE, MAX_THREADS
from .runtime.noise import MAX_SEED
from .runtime.schedule import PREDICTIONS, SCHEDULES
from .signals import stop_message


def on_disk(out: str) -> str:
    """Where the run in `out` can go on from, from its ckpt.pt (model.io.checkpoint_step: read without PyTorch), in
    the words of train.loop.Checkpoints.where: "last checkpoint at step 200 in runs/x, continue with --resume"."""
    from .model.io import CKPT_FILE, checkpoint_step

    step = checkpoint_step(Path(out) / CKPT_FILE)
    if step is None:
        return "no checkpoint written yet"
    return f"last checkpoint at step {step} in {out}, continue with --resume"


def given_options(names) -> set[str]:
    """The options among `names` that the running command was given (not left at their defaults): what --resume
    compares with the run's own."""
    ctx = click.get_current_context()
    return {name for name in names if ctx.get_parameter_source(name) not in
            (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}


def refuse_on_resume(resume: bool, option: str, name: str, why: str) -> None:
    """A usage error (exit 2) for an option that a resumed run cannot honour, given together with --resume: the
    checkpoint decides what it would set (`why`)."""
    if resume and name in given_options([name]):
        raise click.UsageError(f"{option} cannot be given with --resume: {why}; leave out {option} to continue the "
                               f"run, or leave out --resume and give another --out to start a new run")


class LazyChoice(click.Choice):
    """A Choice whose choices are read from the module that defines them when first needed (train.loop imports
    PyTorch, which `ddpm --help` must not)."""

    def __init__(self, module: str, name: str):
        self._where, self._choices = (module, name), None
        super().__init__([])

    @property
    def choices(self):
        if self._choices is None:
            import importlib

            self._choices = tuple(getattr(importlib.import_module(self._where[0], __package__), self._where[1]))
        return self._choices

    @choices.setter
    def choices(self, value):
        pass


# ------------------------------------------------------------------------------- the options train and distill share
# Declared once, each group with the command's defaults and, where the two commands' runs differ, its own words.
def output_options(out: str, files: str, resumable: str):
    """--data, --out (default `out`, a run directory holding `files`), --resume (`resumable`: the options that may
    differ from the run's)."""
    return lambda f: add_options(f, [
        click.option("--data", "data", type=PathArg(file_okay=False), default=None,
                     help="MNIST folder (else $DDPM_DATA, else ~/.cache/ddpm/mnist; downloaded if missing)."),
        click.option("--out", "out", type=PathArg(file_okay=False), default=out, show_default=True,
                     help=f"Run directory ({files})."),
        click.option("--resume", is_flag=True,
                     help=f"Continue from --out/ckpt.pt with the run's own options; only {resumable} may differ from "
                          f"the run's."),
    ])


def optimiser_options(lr: float, lr_help: str, warmup: int, warmup_help: str, ema_help: str, p_uncond_help: str):
    """--batch, --lr, --warmup (with the command's defaults), --ema, --p-uncond."""
    return lambda f: add_options(f, [
        click.option("--batch", "batch_size", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Global batch size."),
        click.option("--lr", type=Finite(min=0, min_open=True), default=lr, show_default=True, help=lr_help),
        click.option("--warmup", type=click.IntRange(min=0), default=warmup, show_default=True, help=warmup_help),
        click.option("--ema", "ema_decay", type=Finite(0, 1, max_open=True), default=0.999, show_default=True,
                     help=ema_help),
        click.option("--p-uncond", type=Finite(0, 1, max_open=True), default=0.1, show_default=True,
                     help=p_uncond_help),
    ])


def run_options(ckpt_every: int, ckpt_help: str):
    """--seed, --device, --ckpt-every (default `ckpt_every`), --threads."""
    return lambda f: add_options(f, [
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                     help="Random seed (0..2^64-1)."),
        click.option("--device", default="auto", show_default=True, callback=device_syntax,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--ckpt-every", type=click.IntRange(min=1), default=ckpt_every, show_default=True,
                     help=ckpt_help),
        click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                     help=f"CPU threads for torch (1..{MAX_THREADS})."),
    ])


# ----------------------------------------------------------------------------------------------------------- train
@click.command()
# data and output
@output_options("runs/ddpm", "options.json, ckpt.pt, model.safetensors, samples.png",
                "--steps, --ckpt-every, --device, --data and --threads")
@click.option("--init", type=InputPath(), default=None,
              help="Start from these weights (model.safetensors, ckpt.pt or a run folder) instead of from scratch.")
# model and diffusion
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Model size: small trains on a CPU, large wants a GPU [default: small; --resume, --init: the "
                   "model's own].")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Beta schedule [default: linear; --resume, --init: the model's own].")
@click.option("--timesteps", "timesteps", type=click.IntRange(2, 10000), default=None,
              help="Diffusion steps T [default: 1000; --resume, --init: the model's own].")
# optimisation
@click.option("--steps", type=click.IntRange(min=1), default=10000, show_default=True, help="Optimizer steps.")
@click.option("--lr-schedule", type=LazyChoice(".train.loop", "LR_SCHEDULES"), default=None,
              help="After the warm-up: constant, or a cosine decay to 1% of --lr at the last of --steps "
                   "[default: constant; --resume keeps the run's].")
@click.option("--loss-weight", type=LazyChoice(".train.loop", "LOSS_WEIGHTS"), default=None,
              help="eps: plain MSE; min-snr: weight min(SNR,5)/SNR per timestep (Hang et al. 2023; "
                   "/(SNR+1) for v) [default: eps; --resume keeps the run's].")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help="What the network outputs: eps (the noise) or v (Salimans & Ho 2022) [default: eps; --resume: "
                   "the model's own; --init: the model's own unless given].")
@click.option("--block", type=click.Choice(BLOCKS), default=None,
              help="Residual block: ddpm, or diffusers (SiLU on the time embedding before its projection, as "
                   "diffusers' ResnetBlock2D: the model exports with `ddpm export --diffusers`) [default: ddpm; "
                   "--resume: the model's own; --init: the model's own unless given].")
@optimiser_options(2e-4, "Adam learning rate.", 200, "LR warm-up steps.", "EMA decay.",
                   "Label dropout probability (classifier-free guidance).")
# run
@run_options(1000, "Checkpoint and sample-grid interval (steps).")
def train(threads, resume, **opts):
    """Train a class-conditional DDPM on MNIST.

    \b
    Examples:
      ddpm train --preset small --steps 200 --out runs/try
      ddpm train --out runs/try --steps 400 --resume
      ddpm train --init runs/try --steps 2000 --seed 1 --out runs/more   # fine-tune (the model of runs/try)
      ddpm train --block diffusers --out runs/hub   # then: ddpm export --ckpt runs/hub --diffusers hub
      torchrun --nproc_per_node 2 -m ddpm.cli train --batch 128   # DDP, global batch 128
    """
    refuse_on_resume(resume, "--init", "init", "the run goes on from its checkpoint's weights, not from another "
                     "model's")
    refuse_same_path({"--out": opts["out"]}, {"--init": opts["init"], "--data": opts["data"]}, folders=("--out",))
    check_output(opts["out"], "--out", folder=True)
    # what stops the command before the training loop (which says it itself: train.loop.Checkpoints), e.g. PyTorch's
    # import or the data under a memory limit, or Ctrl-C: the message names the checkpoint on disk
    with stop_message(lambda: on_disk(opts["out"]), LimitReached):
        needs_torch("train")
        import torch

        from .train.loop import TrainConfig, train as run

        if threads:
            torch.set_num_threads(threads)
        summary = run(TrainConfig(**opts), resume=resume, log=click.echo, given=given_options(opts))
    if summary["steps"]:
        click.echo(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s ({summary['steps_per_s']:.2f} steps/s; "
                   f"checkpoints took {summary['checkpoint_seconds']:.1f}s more), last loss {summary['loss']:.4f}; "
                   f"run in {shown(opts['out'])}")


# --------------------------------------------------------------------------------------------------------- distill
@click.command()
# teacher, data and output
@click.option("--teacher", "init", type=InputPath(), default=None,
              help="The model to distil: model.safetensors, ckpt.pt or a run folder [default: the shipped model].")
@output_options("runs/distill", "options.json, ckpt.pt, model.safetensors, student<steps>.safetensors, samples.png",
                "--ckpt-every, --device, --data and --threads")
# what to distil
@click.option("--steps-from", type=click.IntRange(min=2), default=32, show_default=True,
              help="The teacher's DDIM steps (trailing spacing): the first round's two-step target.")
@click.option("--steps-to", type=click.IntRange(min=1), default=4, show_default=True,
              help="The last student's steps: --steps-from halved each round (e.g. 32 -> 16 -> 8 -> 4).")
@click.option("--guidance", "-w", type=Finite(0, MAX_GUIDANCE), default=GUIDANCE, show_default=True,
              help="Classifier-free guidance w folded into the student, eps_c + w (eps_c - eps_u); 0: none.")
@click.option("--guidance-interval", default=",".join(map("{:g}".format, GUIDANCE_INTERVAL)),
              callback=parse_interval, metavar="LO,HI|all", show_default=True,
              help="The teacher guides where the noise level sigma = sqrt((1-abar)/abar) is in (LO, HI], as "
                   "`ddpm gen` does; 'all': every step.")
@click.option("--fold-iters", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps folding the guidance into one network first (Meng et al. 2023 stage 1); 0: fold it in "
                   "the first round.")
@click.option("--iters", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Optimizer steps per halving round.")
# optimisation
@optimiser_options(1e-4, "Adam learning rate (a cosine decay to 1% within each stage).", 50,
                   "LR warm-up steps at the start of each stage.",
                   "EMA decay (restarted each stage); the EMA weights are the student and the next teacher.",
                   "Share of samples drawn with no label: the student keeps the teacher's unconditional mode.")
# run
@run_options(500, "Checkpoint and sample-grid interval (steps); also at the end of every stage.")
def distill(threads, resume, guidance_interval, **opts):
    """Distil a model's guided DDIM sampler into a few-step student (guided progressive distillation).

    Stage 1 folds classifier-free guidance into one network (Meng et al. 2023); each round then halves the steps,
    the student's one DDIM step matching two of its teacher's (Salimans & Ho 2022). Every stage's student is a
    model file that records its plan: `ddpm gen --ckpt` samples with it unless told otherwise (docs/distill.md).

    \b
    Examples:
      ddpm distill --out runs/distill                              # the shipped model, 32 -> 4 steps, w 0.45
      ddpm distill --out runs/distill --resume                     # continue it
      ddpm distill --teacher runs/ddpm --steps-from 16 --steps-to 2 --iters 500 --out runs/d2
      ddpm gen --ckpt runs/distill -n 64                           # the 4-step student, one batch per step
    """
    refuse_on_resume(resume, "--teacher", "init", "the run goes on with the teacher its checkpoint holds")
    refuse_same_path({"--out": opts["out"]}, {"--teacher": opts["init"], "--data": opts["data"]},
                     folders=("--out",))
    check_output(opts["out"], "--out", folder=True)
    with stop_message(lambda: on_disk(opts["out"]), LimitReached):   # as train's
        needs_torch("distill")
        import torch

        from .train.distill import DistillConfig, distill as run

        if threads:
            torch.set_num_threads(threads)
        lo, hi = guidance_interval or (0.0, float("inf"))
        given = given_options([*opts, "guidance_interval"])
        if "guidance_interval" in given:
            given |= {"guidance_lo", "guidance_hi"}
        summary = run(DistillConfig(**opts, guidance_lo=lo, guidance_hi=hi), resume=resume, log=click.echo,
                      given=given)
    if summary["steps"]:
        click.echo(f"distilled {summary['steps']} steps in {summary['seconds']:.1f}s ({summary['steps_per_s']:.2f} "
                   f"steps/s; checkpoints took {summary['checkpoint_seconds']:.1f}s more), last loss "
                   f"{summary['loss']:.4g}; students: {', '.join(map(shown, summary['students'])) or 'none yet'}")
