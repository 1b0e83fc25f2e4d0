"""The `ddpm` command line: train, gen, inpaint, eval, export, bench.

Heavy modules are imported inside each command so that `ddpm --help` and bad-option errors are instant.
"""

from __future__ import annotations

import math
import os
import sys

import click

from .api import DEFAULT_SAMPLER, GUIDANCE   # numpy-only imports
from .errors import DdpmError
from .runtime.noise import MAX_SEED

# PyTorch's OpenMP threads sleep at once when idle instead of spinning (read when PyTorch loads, which every command
# does after this): on a busy machine spinning threads take the CPU time the work needs (bench/threads.md).
# An OMP_WAIT_POLICY of the user's is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(e: BaseException) -> click.ClickException:
    return click.ClickException(str(e))


class Group(click.Group):
    """The `ddpm` group: errors meant for the user (every DdpmError: bad files, a missing PyTorch, an output that
    cannot be written, ...) become one line and exit 1; Ctrl-C becomes one line ("interrupted", or what the command
    says about it, e.g. the last checkpoint) and exit 130, the shell's code for SIGINT."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdpmError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            click.echo(f"\n{str(e) or 'interrupted'}", err=True)
            ctx.exit(130)


# ---------------------------------------------------------------------------------------- shared option checks
class Finite(click.FloatRange):
    """A FloatRange that also refuses NaN and +-inf (float('nan') passes every comparison-based range check)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


SEED = click.IntRange(0, MAX_SEED)   # the noise stream's seed: 0..2^64-1 (runtime.noise)


def _device_syntax(ctx, param, value):
    """--device: auto, cpu, cuda or cuda:N, checked when parsed (whether that GPU exists is checked when used)."""
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


def device_option(help="auto, cpu, cuda or cuda:N."):
    return click.option("--device", default="auto", show_default=True, callback=_device_syntax, help=help)


def _output(path, param: str, suffixes: tuple[str, ...] | None = None, folder: bool = False):
    """Refuse, before any work, an output that cannot be written: wrong extension, a folder where a file is wanted
    (or the reverse), a parent that is a file, a read-only location (files.check_writable)."""
    from .files import OutputError, check_writable

    if suffixes and not str(path).lower().endswith(suffixes):
        raise click.BadParameter(f"must end in {' or '.join(suffixes)}", param_hint=param)
    try:
        check_writable(path, folder=folder)
    except OutputError as e:
        raise click.BadParameter(str(e), param_hint=param) from None
    return path


def _refuse_guidance_without_labels(uncond: bool, guidance: float) -> None:
    """--uncond with an explicit --guidance w > 0: refused, since guidance steers a sample towards its label and an
    unconditional sample has none (it would be silently ignored)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if uncond and guidance and ctx.get_parameter_source("guidance") != ParameterSource.DEFAULT:
        raise click.UsageError("--guidance steers samples towards their label and --uncond samples have none: "
                               "leave out --guidance (or give 0)")


def _needs_torch(command: str) -> None:
    """One line instead of an ImportError when a command needs PyTorch and it is not installed."""
    from .model.io import require_torch

    require_torch(f"ddpm {command}")


def _dist(device):
    """The torchrun context (train.dist) under torchrun; a single-process stand-in otherwise (no PyTorch needed)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _needs_torch("under torchrun")
        from .train import dist

        return dist.setup(device)
    return _Single()


class _Single:
    rank, world = 0, 1

    def barrier(self):
        pass

    def shard(self, n):
        return 0, n

    def gather(self, obj):
        return [obj]

    def teardown(self):
        pass


@click.group(cls=Group, context_settings=CONTEXT)
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
@click.option("--init", type=click.Path(exists=True), default=None,
              help="Start from these weights (model.safetensors, ckpt.pt or a run folder) instead of from scratch.")
# model and diffusion
@click.option("--preset", type=click.Choice(["tiny", "small", "large"]), default=None,
              help="Model size: small trains on a CPU, large wants a GPU [default: small; --resume, --init: the "
                   "model's own].")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default=None,
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
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=None,
              help="After the warm-up: constant, or a cosine decay to 1% of --lr at the last of --steps "
                   "[default: constant; --resume keeps the run's].")
@click.option("--loss-weight", type=click.Choice(["eps", "min-snr"]), default=None,
              help="eps: plain eps-MSE; min-snr: weight min(SNR,5)/SNR per timestep (Hang et al. 2023) "
                   "[default: eps; --resume keeps the run's].")
@click.option("--ema", "ema_decay", type=Finite(0, 1, max_open=True), default=0.999, show_default=True,
              help="EMA decay.")
@click.option("--p-uncond", type=Finite(0, 1, max_open=True), default=0.1, show_default=True,
              help="Label dropout probability (classifier-free guidance).")
# run
@click.option("--seed", type=SEED, default=0, show_default=True, help="Random seed (0..2^64-1).")
@device_option()
@click.option("--ckpt-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Checkpoint and sample-grid interval (steps).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
def train(threads, resume, **opts):
    """Train a class-conditional DDPM on MNIST.

    \b
    Examples:
      ddpm train --preset small --steps 200 --out runs/try
      ddpm train --out runs/try --steps 400 --resume
      ddpm train --init runs/try --steps 2000 --seed 1 --out runs/more   # fine-tune (the model of runs/try)
      torchrun --nproc_per_node 2 -m ddpm.cli train --batch 128   # DDP, global batch 128
    """
    _output(opts["out"], "--out", folder=True)
    _needs_torch("train")
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
        click.echo(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s ({summary['steps_per_s']:.2f} steps/s; "
                   f"checkpoints took {summary['checkpoint_seconds']:.1f}s more), last loss {summary['loss']:.4f}; "
                   f"run in {opts['out']}")


# ------------------------------------------------------------------------------------------------------------- gen
ENGINES = ["torch", "runtime-torch", "onnx", "trt", "onnx-generator"]   # see ddpm.runtime.engines


def _model(ckpt, export_dir=None):
    """The api.Model of --ckpt (and/or --export), or of the bundled default model."""
    from . import api

    return api.load(ckpt, export_dir)


def _plan(model, sampler, steps, eta, variance, spacing=None, guidance_interval=None):
    from . import api

    try:
        return model.plan(sampler, steps, eta, variance, spacing, guidance_interval)
    except api.DdpmError as e:
        hint = next((f"--{k}" for k in ("steps", "spacing", "guidance-interval") if k.replace("-", " ") in str(e)
                     or k in str(e)), "--sampler")
        raise click.BadParameter(str(e), param_hint=hint) from None


def _interval(ctx, param, value):
    """--guidance-interval LO,HI -> (lo, hi) floats with 0 <= lo < hi (hi may be inf); None stays None."""
    if value is None or value == "all":
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        lo, hi = float("nan"), float("nan")
    if not 0 <= lo < hi:   # also refuses NaN
        raise click.BadParameter("LO,HI with 0 <= LO < HI (noise levels sigma; HI may be inf), e.g. 0.28,5.42, "
                                 "or 'all'")
    return lo, hi


def _device(name):
    from .runtime.engines import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None


SAMPLER_CHOICES = ["ddpm", "ddim", "dpm++2m", "unipc"]   # see ddpm.runtime.samplers
SAMPLER = DEFAULT_SAMPLER   # the fewest calls that score as DDIM-50 did (bench/sweep, README "Samplers")
solver_options = [
    click.option("--spacing", type=click.Choice(["linspace", "trailing", "logsnr"]), default=None,
                 help="Timesteps: linspace (t=0 included), trailing (the last step lands on x0) or uniform in "
                      "log-SNR [default: linspace for ddim, trailing for dpm++2m and unipc]."),
    click.option("--guidance-interval", "guidance_interval", default=None, callback=_interval, metavar="LO,HI",
                 help="Guidance only where the noise level sigma = sqrt((1-abar)/abar) is in (LO, HI] "
                      "(Kynkaanniemi et al. 2024); elsewhere the conditional model alone. 'all': every step "
                      "[default: all]."),
]


def sampling_options(f):
    """Options shared by gen, inpaint and eval (the sampler and its conditioning)."""
    opts = [
        click.option("--ckpt", type=click.Path(), default=None,
                     help="Checkpoint: model.safetensors, ckpt.pt or a run folder [default: the bundled model]."),
        click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), default=SAMPLER, show_default=True,
                     help="DDPM ancestral (all T steps), DDIM, DPM-Solver++(2M) or UniPC-2 (multistep, few steps; "
                          "inpaint: ddim unless given)."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Network calls per sample [default: 50 for ddim, 8 for dpm++2m and unipc, T for ddpm]."),
        *solver_options,
        click.option("--eta", type=Finite(0, 1), default=0.0, show_default=True,
                     help="DDIM eta: 0 deterministic, 1 DDPM-like."),
        click.option("--variance", type=click.Choice(["small", "large"]), default="small", show_default=True,
                     help="DDPM posterior variance: beta~_t (small) or beta_t (large)."),
        click.option("--guidance", "-w", type=Finite(min=0), default=GUIDANCE, show_default=True,
                     help="Classifier-free guidance w: eps_c + w (eps_c - eps_u); 0 = conditional model alone."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the noise stream, 0..2^64-1 (same seed, same digits, any batch size or engine)."),
        click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Samples per batch."),
        device_option(),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _threads(n):
    if n:
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(n)


def engine_options(f):
    """--engine and the runtime's options (gen, eval)."""
    opts = [
        click.option("--engine", type=click.Choice(["auto", *ENGINES]), default="auto", show_default=True,
                     help="torch: eager PyTorch (the reference); runtime-torch, onnx, trt: the preallocated runtime; "
                          "onnx-generator: the whole loop in one ONNX call (generator.onnx, deterministic plans); "
                          "auto: onnx on a CPU, runtime-torch on a GPU (same digits, faster)."),
        click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None,
                     help="Export folder for onnx/trt/onnx-generator [default: the checkpoint's, exported on first "
                          "use]."),
        click.option("--fp16", is_flag=True, help="Half-precision model (runtime engines)."),
        click.option("--no-cuda-graph", is_flag=True, help="GPU: run the loop step by step instead of one CUDA graph."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_engine(name, model, device, fp16=False, cuda_graph=True, max_batch=512, ctx=None, threads=None, plan=None):
    """The engine `name` (auto resolved) on `device`, its messages on stderr; ctx: the torchrun context.
    max_batch: the largest batch the network runs at (2 x --batch with guidance), what a TensorRT engine is made for.
    plan: the plan to run, needed by onnx-generator (its generator.onnx is made for one plan)."""
    return model.engine(name, device, fp16, cuda_graph, threads, max_batch, dist=ctx, plan=plan,
                        log=lambda m: click.echo(m, err=True))


def _add_generator(root, plan, form="loop", log=click.echo):
    from .export.generator import GeneratorFailed, GeneratorUnsupported, add_generator

    log(f"building generator.onnx for {plan.name} in {root}")
    try:
        return add_generator(root, plan, GUIDANCE, form, log=log)
    except GeneratorUnsupported as e:
        raise click.BadParameter(str(e), param_hint="--sampler/--eta") from None
    except GeneratorFailed as e:
        raise click.ClickException(f"generator export failed, nothing written: {e}") from None


@main.command()
@click.option("-n", "num", type=click.IntRange(min=1), default=64, show_default=True, help="Number of digits.")
@click.option("--label", type=click.IntRange(0, 9), default=None,
              help="Draw only this class [default: classes 0-9 in turn].")
@click.option("--uncond", is_flag=True,
              help="Unconditional sampling (the reserved 'no label'). An explicit --guidance > 0 is refused with it: "
                   "guidance steers a sample towards its label.")
@engine_options
@click.option("--out", type=click.Path(dir_okay=False), default="digits.png", show_default=True,
              help="x.png: a grid image (n <= 10000); x.npz: images (N,28,28) uint8 and labels (N,) (-1 "
                   "unconditional), written as they are made (any n).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@sampling_options
def gen(num, label, uncond, engine, export_dir, fp16, no_cuda_graph, out, quiet, ckpt, sampler, steps, spacing,
        guidance_interval, eta, variance, guidance, seed, batch, device, threads):
    """Generate digits.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png                      # UniPC-8, classes 0-9 in turn, guidance 0.3
      ddpm gen -n 64 --sampler ddim --steps 50             # DDIM-50, the default before UniPC
      ddpm gen -n 16 --label 7 --guidance 3 --out sevens.png
      ddpm gen -n 64 --sampler ddpm --out ddpm.png         # the full 1000-step DDPM loop
      ddpm gen -n 10000 --batch 256 --out samples.npz      # for ddpm eval
      ddpm gen -n 64 --engine torch                        # eager PyTorch, the reference (same digits)
      ddpm gen -n 64 --engine onnx                         # the preallocated runtime on onnxruntime
      ddpm gen -n 64 --engine trt --fp16                   # TensorRT (GPU)
      ddpm gen -n 64 --engine onnx-generator               # generator.onnx: the whole loop in one call
    """
    import time

    import numpy as np

    from .runtime.generate import iter_generate
    from .runtime.images import MAX_GRID

    if label is not None and uncond:
        raise click.UsageError("--label and --uncond exclude each other")
    _refuse_guidance_without_labels(uncond, guidance)
    _output(out, "--out", (".png", ".npz"))
    if out.lower().endswith(".png") and num > MAX_GRID:
        raise click.BadParameter(f"{num} digits are too many for one grid image (at most {MAX_GRID}); "
                                 f"use --out x.npz, which streams any number", param_hint="-n")
    _threads(threads)
    model = _model(ckpt, export_dir)
    plan = _plan(model, sampler, steps, eta, variance, spacing, guidance_interval)
    ctx = _dist(device)   # under torchrun: each rank draws its share of the samples
    dev = str(ctx.device) if ctx.world > 1 else _device(device)
    net_batch = 2 * batch if guidance and not uncond else batch   # guidance runs both halves in one batch
    eng = make_engine(engine, model, dev, fp16, not no_cuda_graph, net_batch, ctx, threads, plan)
    labels = lambda a, b: model.labels(b - a, label, uncond, start=a)   # samples a..b-1: nothing of size n is held
    lo, hi = ctx.shard(num)
    t0 = time.perf_counter()
    # sample k's noise depends only on (seed, k): the shards together are exactly the single-process samples
    batches = iter_generate(eng, hi - lo, plan, lambda a, b: labels(lo + a, lo + b), guidance, seed, batch, start=lo,
                            progress=not quiet and ctx.rank == 0)
    nrow = 10 if label is None and not uncond else None
    if ctx.world == 1:
        _save_images(out, batches, labels, num, nrow)     # an .npz is written batch by batch as they come
    else:
        parts = ctx.gather(np.concatenate([np.empty((0, 28, 28), np.uint8), *batches]))
        if ctx.rank == 0:
            _save_images(out, parts, labels, num, nrow)
    seconds = time.perf_counter() - t0
    ctx.teardown()
    if ctx.rank == 0:
        procs = f", {ctx.world} processes" if ctx.world > 1 else ""
        how = "unconditional" if uncond else f"guidance {guidance:g}"
        click.echo(f"{num} digits ({plan.name}, {how}, {eng.name}{procs}) in {seconds:.1f}s -> {out}")


def _save_images(out, batches, labels, n, nrow=None):
    """Write n images (an iterable of (b,28,28) uint8 batches; labels(lo, hi) gives theirs) as an .npz, streamed,
    or as a grid image."""
    import numpy as np

    from .runtime.images import save_grid
    from .samples import save_samples

    if out.lower().endswith(".npz"):
        save_samples(out, labels, batches, n=n)
    else:
        save_grid(np.concatenate(list(batches)), out, nrow=nrow)


# --------------------------------------------------------------------------------------------------------- inpaint
def _load_png(path, what):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("L")
    except (OSError, UnidentifiedImageError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint=what) from None
    if img.size != (28, 28):
        img = img.resize((28, 28), Image.LANCZOS)
    return np.array(img, dtype=np.uint8)   # a writable copy


@main.command()
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The digit to complete (PNG, resized to 28x28; white on black like MNIST).")
@click.option("--mask", "mask_spec", default="bottom", show_default=True,
              help="What to regenerate: top, bottom, left, right, or a PNG whose white pixels are KEPT.")
@click.option("-n", "num", type=click.IntRange(1, 256), default=8, show_default=True, help="Completions.")
@click.option("--label", type=click.IntRange(0, 9), default=None, help="Class of the completions [default: none].")
@click.option("--resample", type=click.IntRange(1, 20), default=3, show_default=True,
              help="RePaint resampling per step (1 = none).")
@click.option("--out", type=click.Path(dir_okay=False), default="inpaint.png", show_default=True,
              help="Grid: the masked input, then the completions.")
@sampling_options
def inpaint(image, mask_spec, num, label, resample, out, ckpt, sampler, steps, spacing, guidance_interval, eta,
            variance, guidance, seed, batch, device, threads):
    """Fill in the masked part of a 28x28 digit (RePaint-style inpainting).

    \b
    Examples:
      ddpm inpaint --image seven.png --mask bottom -n 8 --out completions.png
      ddpm inpaint --image digit.png --mask keep.png --label 3
    """
    _output(out, "--out", (".png",))
    _needs_torch("inpaint")
    import numpy as np
    import torch

    from .runtime.eager import guided, inpaint as run_inpaint
    from .runtime.images import save_grid, to_uint8

    _threads(threads)
    known = _load_png(image, "--image")
    halves = {"top": np.s_[:14, :], "bottom": np.s_[14:, :], "left": np.s_[:, :14], "right": np.s_[:, 14:]}
    if mask_spec in halves:
        keep = np.ones((28, 28), dtype=np.float32)
        keep[halves[mask_spec]] = 0
    elif mask_spec.lower().endswith(".png"):
        keep = (_load_png(mask_spec, "--mask") >= 128).astype(np.float32)
    else:
        raise click.BadParameter("top, bottom, left, right or a PNG file", param_hint="--mask")
    if click.get_current_context().get_parameter_source("sampler") is click.core.ParameterSource.DEFAULT:
        sampler = "ddim"   # inpainting runs single-step plans; the default sampler is a multistep one
    loaded = _model(ckpt)
    plan = _plan(loaded, sampler, steps, eta, variance, spacing, guidance_interval)
    if plan.history:
        raise click.BadParameter(f"inpainting runs single-step plans (ddpm, ddim), not {sampler}",
                                 param_hint="--sampler")
    dev = _device(device)
    model = loaded.torch_model.to(dev)
    x0 = torch.from_numpy(known).float().div(127.5).sub(1).expand(num, 1, 28, 28).to(dev)
    mask = torch.from_numpy(keep).expand(num, 1, 28, 28).to(dev)
    labels = None if label is None else torch.full((num,), label, device=dev)
    g = torch.Generator().manual_seed(seed)
    x = run_inpaint(guided(model, labels, loaded.cfg.null_label, guidance), x0, mask, plan, g, resample)
    if not torch.isfinite(x).all():
        from .runtime.generate import NonFiniteSamples

        raise NonFiniteSamples("the completions came out NaN or inf, so nothing was saved; likely cause: broken "
                               "weights (a diverged training run?)")
    shown = np.where(keep > 0, known, 64).astype(np.uint8)
    save_grid(np.concatenate([shown[None], to_uint8(x)]), out, nrow=num + 1)
    click.echo(f"{num} completions ({plan.name}, resample {resample}) -> {out}")


# ------------------------------------------------------------------------------------------------------------ eval
@main.command("eval")
@click.option("--samples", "sample_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="npz files from `ddpm gen --out x.npz` (repeat to compare); without it, samples are generated.")
@click.option("-n", "num", type=click.IntRange(min=2), default=10000, show_default=True,
              help="Samples to generate when no --samples are given.")
@click.option("--uncond", is_flag=True, help="Generate unconditional samples (class histogram) instead of 0-9 in turn; "
                                          "an explicit --guidance > 0 is refused with it (guidance needs a label).")
@engine_options
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="MNIST folder (real test set, floor); else $DDPM_DATA or the cache folder.")
@click.option("--classifier", type=click.Path(dir_okay=False), default=None,
              help="Classifier weights [default: the bundled one].")
@click.option("--train-classifier", is_flag=True, help="Retrain the classifier (3 epochs) and use it.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the results here (JSON; missing folders are created).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@sampling_options
def eval_cmd(sample_files, num, uncond, engine, export_dir, fp16, no_cuda_graph, data, classifier, train_classifier,
             json_out, quiet, ckpt, sampler, steps, spacing, guidance_interval, eta, variance, guidance, seed, batch,
             device, threads):
    """Measure sample quality with an MNIST classifier.

    Frechet distance of the classifier's penultimate features to the real test set, beside the floor (N real
    training images, same N), accuracy of class-conditional samples, class histogram of unconditional ones.

    \b
    Examples:
      ddpm eval -n 10000                                    # the default model, UniPC-8, guidance 0.3
      ddpm gen -n 2000 --sampler ddpm --out ddpm.npz && ddpm eval --samples ddpm.npz
      ddpm eval --samples a.npz --samples b.npz --json quality.json
    """
    _refuse_guidance_without_labels(uncond, guidance)
    if json_out:
        _output(json_out, "--json")
    _needs_torch("eval (its MNIST classifier)")
    import json
    from pathlib import Path

    from .bench import quality
    from .files import write_text
    from .runtime.generate import ensure_memory
    from .samples import read_samples
    from .train.data import DataError, ensure_mnist, resolve_data_dir

    samples = [(f, *read_samples(f)) for f in sample_files]   # every file checked before the slow parts
    if not sample_files:   # the images, and the classifier's 128 float64 features of each
        ensure_memory(num * (28 * 28 + 128 * 8), f"evaluating {num} samples", "lower -n", per_unit=28 * 28 + 128 * 8)
    _threads(threads)
    try:
        data_dir = ensure_mnist(resolve_data_dir(data), progress=click.echo)
        clf_path = Path(classifier or quality.CLASSIFIER_FILE)
        if train_classifier:
            clf_path = Path(click.get_app_dir("ddpm")) / "classifier.safetensors" if classifier is None else clf_path
            acc = quality.train_classifier(data_dir, clf_path, progress=not quiet)
            click.echo(f"classifier retrained: test accuracy {100 * acc:.2f}% -> {clf_path}")
        if not clf_path.is_file():
            raise click.ClickException(f"classifier weights {clf_path} not found (use --train-classifier)")
        ref = quality.Reference.load(data_dir, clf_path)
    except DataError as e:
        raise _fail(e) from None

    rows = []
    for f, images, labels in samples:
        try:
            rows.append(ref.evaluate(images, labels, Path(f).name))
        except ValueError as e:
            raise click.ClickException(f"{f}: {e}") from None
    if not sample_files:
        from .runtime.generate import generate

        model = _model(ckpt, export_dir)
        plan = _plan(model, sampler, steps, eta, variance, spacing, guidance_interval)
        labels = model.labels(num, None, uncond)
        net_batch = 2 * batch if guidance and not uncond else batch
        eng = make_engine(engine, model, _device(device), fp16, not no_cuda_graph, net_batch, threads=threads,
                          plan=plan)
        images = generate(eng, num, plan, labels, guidance, seed, batch, progress=not quiet)
        name = f"{plan.name} w={guidance:g}" + (" uncond" if uncond else "")
        rows.append(ref.evaluate(images, labels, name))
    click.echo(quality.format_table(rows))
    if json_out:
        write_text(json_out, json.dumps(rows, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------- export
@main.command("export")
@click.option("--ckpt", type=click.Path(), default=None, help="Checkpoint [default: the bundled model].")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Export folder [default: ~/.cache/ddpm/exports/<weights hash>, where gen/bench look].")
@click.option("--fp16", is_flag=True, help="Also write a half-precision model (model_fp16.onnx).")
@click.option("--opset", type=click.IntRange(17, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--trt", "build_trt", is_flag=True, help="Also build TensorRT engine(s) (needs TensorRT and a GPU).")
@click.option("--batch", "batch_range", default="1-256", show_default=True,
              help="TensorRT batch range MIN-MAX (one optimisation profile).")
# the generator: the whole reverse loop in one ONNX model, and the web page around it
@click.option("--generator", "with_generator", is_flag=True,
              help="Also write generator.onnx: the whole loop of a deterministic sampler in one ONNX model "
                   "(x_T, labels, guidance -> uint8 images), verified against the runtime.")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), default=SAMPLER, show_default=True,
              help="The generator's sampler (deterministic plans only: ddim with eta 0, dpm++2m, unipc).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="The generator's steps [default: the sampler's, as in gen].")
@click.option("--form", type=click.Choice(["loop", "unrolled"]), default="loop", show_default=True,
              help="The generator as one ONNX Loop over the rows, or the rows unrolled (the same speed on a CPU; "
                   "unrolled is 1.8x bigger and loads about 90x slower: README).")
@click.option("--web", "web_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a static page into this folder that generates digits in the browser "
                   "(implies --generator; fetches onnxruntime-web with npm once).")
@click.option("--ort-web", "ort_web", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The onnxruntime-web tarball (`npm pack onnxruntime-web@VERSION`) instead of fetching it.")
def export_cmd(ckpt, out, fp16, opset, build_trt, batch_range, with_generator, sampler, steps, form, web_dir, ort_web):
    """Export the EMA noise predictor to ONNX (and TensorRT), verified against PyTorch.

    Inputs x (B,1,28,28), t (B,) and y (B,) are graph inputs with a dynamic batch; output eps. Beside the model,
    export.json holds the checkpoint hash, config and schedule tables, so a runtime needs only the folder.
    --generator adds generator.onnx, the whole reverse loop of one deterministic plan (--sampler, --steps), and
    --web a page that runs it in a browser.

    \b
    Examples:
      ddpm export --fp16
      ddpm export --ckpt runs/ddpm --out exports/mine --fp16 --trt --batch 1-64
      ddpm export --generator --steps 20                  # generator.onnx: DDIM-20 in one ONNX call
      ddpm export --web site && python -m http.server -b 127.0.0.1 -d site   # open http://127.0.0.1:8000
    """
    if out:
        _output(out, "--out", folder=True)
    if web_dir:
        _output(web_dir, "--web", folder=True)
    _needs_torch("export")
    from .export.onnx_export import ExportFailed, export

    try:
        lo, hi = (int(v) for v in batch_range.split("-"))
    except ValueError:
        lo, hi = 0, 0
    if not 1 <= lo <= hi:
        raise click.BadParameter("MIN-MAX with 1 <= MIN <= MAX, e.g. 1-256", param_hint="--batch")
    if build_trt:   # fail before the ONNX work if TensorRT cannot run here
        from .export.trt import TensorRTUnavailable, gpu_name, import_trt

        try:
            import_trt(), gpu_name()
        except TensorRTUnavailable as e:
            raise _fail(e) from None
    from . import api
    from .model.io import CheckpointError, load_model

    try:
        loaded = load_model(ckpt or api.default_model_path())
    except CheckpointError as e:
        raise _fail(e) from None
    out = _output(out or str(api.cache_dir() / "exports" / loaded.hash[:16]), "--out", folder=True)
    plan = None
    if with_generator or web_dir:   # refuse a plan the generator cannot run before any work
        from .export.generator import GeneratorUnsupported, check_plan

        plan = _plan(_model(ckpt), sampler, steps, 0.0, "small")
        try:
            check_plan(plan)
        except GeneratorUnsupported as e:
            raise click.BadParameter(str(e), param_hint="--sampler") from None
    try:
        res = export(loaded, out, fp16=fp16, opset=opset, log=click.echo)
    except ExportFailed as e:
        raise click.ClickException(f"export failed, nothing written: {e}") from None
    for precision, f in res.meta["files"].items():
        click.echo(f"{precision}: {res.out / f['name']} ({f['bytes'] / 1e6:.2f} MB)")
    if plan is not None:
        gen = _add_generator(res.out, plan, form)
        click.echo(f"generator: {res.out / gen['name']} ({gen['bytes'] / 1e6:.2f} MB, {gen['plan']}, {form})")
    if build_trt:
        from .export.trt import ensure_engine
        from .runtime.bundle import Bundle

        bundle = Bundle.load(res.out)
        for precision in res.meta["files"]:
            click.echo(f"TensorRT {precision}: {ensure_engine(bundle, precision, lo, hi, log=click.echo)}")
    click.echo(f"export folder: {res.out}")
    if web_dir:
        from .export.web import WebExportError, write_page
        from .runtime.bundle import Bundle, ExportError

        options = f"--sampler {sampler} --steps {plan.steps}"
        try:
            page = write_page(Bundle.load(res.out), web_dir, GUIDANCE, options, ort_web, log=click.echo)
        except (WebExportError, ExportError) as e:
            raise _fail(e) from None
        click.echo(f"web page: {page} (serve it, e.g. `python -m http.server -b 127.0.0.1 -d {page}`, and open "
                   f"http://127.0.0.1:8000)")


# ----------------------------------------------------------------------------------------------------------- bench
def _int_list(ctx, param, value):
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,8,64")
    return items


@main.command()
@click.option("--engines", default="torch,runtime-torch,onnx,trt,onnx-generator", show_default=True,
              help="Comma-separated engines; unavailable ones are reported as skipped. onnx-generator (the whole "
                   "loop in one ONNX call) is built for the benchmark's plan in the cache export folder.")
@click.option("--batch", "batches", default="1,8,64", show_default=True, callback=_int_list,
              help="Comma-separated batch sizes.")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), default=SAMPLER, show_default=True, help="Sampler.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Network calls per sample [default: 50 for ddim, 8 for dpm++2m and unipc].")
@solver_options[0]
@solver_options[1]
@click.option("--guidance", "-w", type=Finite(min=0), default=GUIDANCE, show_default=True,
              help="Classifier-free guidance (doubles the network batch when > 0).")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per engine and batch.")
@click.option("--fp16", is_flag=True, help="Half-precision models for the runtime engines (eager stays fp32).")
@click.option("--no-cuda-graph", is_flag=True, help="GPU: run the runtime's loop step by step.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also time eager PyTorch on DDIM-50 (the default sampler before UniPC) and give every engine's "
                   "speedup over it (when the sampler is not DDIM-50 itself).")
@click.option("--quick", is_flag=True,
              help="A smoke test: 3 steps of the sampler (ddim for ddpm), batch 1,2, 2 runs, DDIM-3 as the baseline.")
@click.option("--ckpt", type=click.Path(), default=None, help="Checkpoint [default: the bundled model].")
@device_option()
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (torch and onnxruntime alike).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Folder for bench.json, bench.md and bench.png.")
def bench(engines, batches, sampler, steps, spacing, guidance_interval, guidance, repeat, fp16, no_cuda_graph,
          baseline, quick, ckpt, device, threads, out):
    """Time every engine against eager PyTorch on the same work, in one run.

    \b
    Examples:
      ddpm bench                                     # UniPC-8, batch 1,8,64, all engines
      ddpm bench --sampler ddpm --batch 1,64 --repeat 2
      ddpm bench --engines torch,onnx --fp16 --out bench-fp16
      ddpm bench --engines onnx,onnx-generator --batch 1,8  # the step loop against the one-call generator
    """
    from pathlib import Path

    from .bench.speed import format_table, run_bench, write_outputs

    names = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise click.BadParameter(f"unknown engine(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ENGINES)}",
                                 param_hint="--engines")
    _output(out, "--out", folder=True)
    if quick:
        sampler = "ddim" if sampler == "ddpm" else sampler
        steps, batches, repeat = 3, [1, 2], 2
    _threads(threads)
    model = _model(ckpt)
    plan = _plan(model, sampler, steps, 0.0, "small", spacing, guidance_interval)
    ref = _plan(model, "ddim", 3 if quick else None, 0.0, "small") if baseline else None
    if ref is not None and plan.name == ref.name:
        ref = None   # the sampler is the baseline itself
    res = run_bench(model, names, batches, plan, guidance, repeat, fp16, _device(device), not no_cuda_graph,
                    threads=threads, log=lambda m: click.echo(m, err=True), baseline=ref)
    click.echo(format_table(res))
    files = write_outputs(res, Path(out))
    click.echo("wrote " + ", ".join(map(str, files)) + ("" if len(files) == 3 else " (no plot: pip install 'ddpm[plot]')"))


if __name__ == "__main__":
    main()
