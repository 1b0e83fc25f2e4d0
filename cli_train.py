"""`ddpm train`: its options and the call of train.loop.train (cli.py adds it to the `ddpm` group)."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_options import Finite, check_output, device_syntax, needs_torch
from .errors import LimitReached
from .model.config import PRESETS
from .options import MAX_THREADS
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


# ----------------------------------------------------------------------------------------------------------- train
@click.command()
# data and output
@click.option("--data", "data", type=click.Path(file_okay=False), default=None,
              help="MNIST folder (else $DDPM_DATA, else ~/.cache/ddpm/mnist; downloaded if missing).")
@click.option("--out", "out", type=click.Path(file_okay=False), default="runs/ddpm", show_default=True,
              help="Run directory (options.json, ckpt.pt, model.safetensors, samples.png).")
@click.option("--resume", is_flag=True,
              help="Continue from --out/ckpt.pt with the run's own options; only --steps, --ckpt-every, --device, "
                   "--data and --threads may differ from the run's.")
@click.option("--init", type=click.Path(exists=True), default=None,
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
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch size.")
@click.option("--lr", type=Finite(min=0, min_open=True), default=2e-4, show_default=True,
              help="Adam learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=200, show_default=True, help="LR warm-up steps.")
@click.option("--lr-schedule", type=LazyChoice(".train.loop", "LR_SCHEDULES"), default=None,
              help="After the warm-up: constant, or a cosine decay to 1% of --lr at the last of --steps "
                   "[default: constant; --resume keeps the run's].")
@click.option("--loss-weight", type=LazyChoice(".train.loop", "LOSS_WEIGHTS"), default=None,
              help="eps: plain MSE; min-snr: weight min(SNR,5)/SNR per timestep (Hang et al. 2023; "
                   "/(SNR+1) for v) [default: eps; --resume keeps the run's].")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help="What the network outputs: eps (the noise) or v (Salimans & Ho 2022) [default: eps; --resume: "
                   "the model's own; --init: the model's own unless given].")
@click.option("--ema", "ema_decay", type=Finite(0, 1, max_open=True), default=0.999, show_default=True,
              help="EMA decay.")
@click.option("--p-uncond", type=Finite(0, 1, max_open=True), default=0.1, show_default=True,
              help="Label dropout probability (classifier-free guidance).")
# run
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Random seed (0..2^64-1).")
@click.option("--device", default="auto", show_default=True, callback=device_syntax, help="auto, cpu, cuda or cuda:N.")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Checkpoint and sample-grid interval (steps).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help=f"CPU threads for torch (1..{MAX_THREADS}).")
def train(threads, resume, **opts):
    """Train a class-conditional DDPM on MNIST.

    \b
    Examples:
      ddpm train --preset small --steps 200 --out runs/try
      ddpm train --out runs/try --steps 400 --resume
      ddpm train --init runs/try --steps 2000 --seed 1 --out runs/more   # fine-tune (the model of runs/try)
      torchrun --nproc_per_node 2 -m ddpm.cli train --batch 128   # DDP, global batch 128
    """
    check_output(opts["out"], "--out", folder=True)
    # what stops the command before the training loop (which says it itself: train.loop.Checkpoints), e.g. PyTorch's
    # import or the data under a memory limit, or Ctrl-C: the message names the checkpoint on disk
    with stop_message(lambda: on_disk(opts["out"]), LimitReached):
        needs_torch("train")
        import torch

        from .train.loop import TrainConfig, train as run

        if threads:
            torch.set_num_threads(threads)
        ctx = click.get_current_context()
        given = {name for name in opts if ctx.get_parameter_source(name) not in
                 (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}
        summary = run(TrainConfig(**opts), resume=resume, log=click.echo, given=given)
    if summary["steps"]:
        click.echo(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s ({summary['steps_per_s']:.2f} steps/s; "
                   f"checkpoints took {summary['checkpoint_seconds']:.1f}s more), last loss {summary['loss']:.4f}; "
                   f"run in {opts['out']}")
