"""The `ddpm` command line: train, gen, inpaint, eval, export, bench.

Heavy modules are imported inside each command so that `ddpm --help` and bad-option errors are instant.
"""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(e: BaseException) -> click.ClickException:
    return click.ClickException(str(e))


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="ddpm")
def main():
    """Denoising diffusion on MNIST: train, generate, export to ONNX/TensorRT, benchmark.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png          # the bundled default model, 64 digits
      ddpm train --preset small --steps 200    # train (downloads MNIST if needed)
      ddpm export --fp16                       # ONNX fp32 + fp16 of the default model
      ddpm bench                               # every engine against eager PyTorch
    """


# ----------------------------------------------------------------------------------------------------------- train
@main.command()
# data and output
@click.option("--data", "data", type=click.Path(file_okay=False), default=None,
              help="MNIST folder (else $DDPM_DATA, else ~/.cache/ddpm/mnist; downloaded if missing).")
@click.option("--out", "out", type=click.Path(file_okay=False), default="runs/ddpm", show_default=True,
              help="Run directory (options.json, ckpt.pt, model.safetensors, samples.png).")
@click.option("--resume", is_flag=True, help="Continue from --out/ckpt.pt.")
# model and diffusion
@click.option("--preset", type=click.Choice(["tiny", "small", "large"]), default="small", show_default=True,
              help="Model size: small trains on a CPU, large wants a GPU.")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True,
              help="Beta schedule.")
@click.option("--timesteps", "timesteps", type=click.IntRange(2, 10000), default=1000, show_default=True,
              help="Diffusion steps T.")
# optimisation
@click.option("--steps", type=click.IntRange(min=1), default=10000, show_default=True, help="Optimizer steps.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
              help="Adam learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=200, show_default=True, help="LR warm-up steps.")
@click.option("--ema", "ema_decay", type=click.FloatRange(0, 1, max_open=True), default=0.999, show_default=True,
              help="EMA decay.")
@click.option("--p-uncond", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Label dropout probability (classifier-free guidance).")
# run
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Checkpoint and sample-grid interval (steps).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
def train(threads, resume, **opts):
    """Train a class-conditional DDPM on MNIST.

    \b
    Examples:
      ddpm train --preset small --steps 200 --out runs/try
      ddpm train --out runs/try --steps 400 --resume
      torchrun --nproc_per_node 2 -m ddpm.cli train --batch 128   # DDP, global batch 128
    """
    import torch

    from .train.data import DataError
    from .train.loop import TrainConfig, TrainingError, train as run

    if threads:
        torch.set_num_threads(threads)
    try:
        summary = run(TrainConfig(**opts), resume=resume, log=click.echo)
    except (DataError, TrainingError) as e:
        raise _fail(e) from None
    if summary["steps"]:
        click.echo(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s "
                   f"({summary['steps_per_s']:.2f} steps/s), last loss {summary['loss']:.4f}; run in {opts['out']}")


if __name__ == "__main__":
    main()
