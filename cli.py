"""The `ddpm` command line: train, gen, inpaint, edit, upscale, restore, eval, export, bench.

Heavy modules are imported inside each command so that `ddpm --help` and bad-option errors are instant.
"""

from __future__ import annotations

import math
import os
import sys

import click

from .api import DEFAULT_SAMPLER, EDIT_GUIDANCE, EDIT_SAMPLER, GUIDANCE, GUIDANCE_INTERVAL   # numpy-only imports
from .errors import DdpmError, Terminated, limit_message
from .runtime.noise import MAX_SEED
from .runtime.schedule import PREDICTIONS
from .signals import file_size_limit_as_error, sigterm_as_interrupt

# OMP_WAIT_POLICY=PASSIVE is set by `import ddpm` (ddpm/__init__.py), before any command loads PyTorch.

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(e: BaseException) -> click.ClickException:
    return click.ClickException(str(e))


class Group(click.Group):
    """The `ddpm` group: errors meant for the user (every DdpmError: bad files, a missing PyTorch, an output that
    cannot be written, ...) become one line and exit 1, and so do failures caused by a resource limit of the process
    (out of memory, too many open files, a file over the file-size limit: errors.limit_message names the limit);
    Ctrl-C becomes one line ("interrupted", or what the command says about it, e.g. the last checkpoint) and exit
    130, the shell's code for SIGINT; SIGTERM the same with "terminated" and exit 143 (errors.Terminated, also when
    a command re-raised it with more to say)."""

    def invoke(self, ctx):
        with sigterm_as_interrupt(), file_size_limit_as_error():
            try:
                return super().invoke(ctx)
            except DdpmError as e:
                raise click.ClickException(str(e)) from None
            except Exception as e:
                message = limit_message(e)
                if message is None:
                    raise
                raise click.ClickException(message) from None
            except Terminated as e:
                click.echo(f"\n{str(e) or 'terminated'}", err=True)
                ctx.exit(143)
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
    """Denoising diffusion on MNIST: train, generate, edit, export to ONNX/TensorRT, benchmark.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png          # the bundled default model, 64 digits
      ddpm inpaint --image d.png --mask bottom # redraw the bottom half (also: edit, upscale, restore)
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
    None,   # --guidance-interval: interval_option(default)
]


def interval_option(default=GUIDANCE_INTERVAL):
    """--guidance-interval with the command's default: (lo, hi) or None (guidance on every step)."""
    return click.option("--guidance-interval", "guidance_interval",
                        default="all" if default is None else ",".join(f"{v:g}" for v in default),
                        callback=_interval, metavar="LO,HI|all", show_default=True,
                        help="Guidance only where the noise level sigma = sqrt((1-abar)/abar) is in (LO, HI] "
                             "(Kynkaanniemi et al. 2024); elsewhere the conditional model alone. 'all': every step.")


solver_options[1] = interval_option()


def sampling_options(f=None, *, sampler: str = SAMPLER, eta: float = 0.0, guidance: float = GUIDANCE,
                     interval=GUIDANCE_INTERVAL):
    """Options shared by gen, eval and the editing commands (the sampler and its conditioning); sampler, eta,
    guidance: the command's defaults (the editing commands: DDIM as measured; inpaint and upscale: eta 1, the
    stochastic rows RePaint and ILVR need; edit: its measured guidance); interval: the default guidance interval
    (the editing commands: None, guidance on every step, as measured). `@sampling_options` or
    `@sampling_options(eta=1.0)`."""
    if f is None:
        return lambda g: sampling_options(g, sampler=sampler, eta=eta, guidance=guidance, interval=interval)
    opts = [
        click.option("--ckpt", type=click.Path(), default=None,
                     help="Checkpoint: model.safetensors, ckpt.pt or a run folder [default: the bundled model]."),
        click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), default=sampler, show_default=True,
                     help="DDPM ancestral (all T steps), DDIM, DPM-Solver++(2M) or UniPC-2 (multistep, few steps)."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Network calls per sample [default: 50 for ddim, 8 for dpm++2m and unipc, T for ddpm]."),
        solver_options[0], interval_option(interval),
        click.option("--eta", type=Finite(0, 1), default=eta, show_default=True,
                     help="DDIM eta: 0 deterministic, 1 DDPM-like."),
        click.option("--variance", type=click.Choice(["small", "large"]), default="small", show_default=True,
                     help="DDPM posterior variance: beta~_t (small) or beta_t (large)."),
        click.option("--guidance", "-w", type=Finite(min=0), default=guidance, show_default=True,
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


def make_engine(name, model, device, fp16=False, cuda_graph=True, max_batch=512, ctx=None, threads=None, plan=None,
                quiet=False):
    """The engine `name` (auto resolved) on `device`, its one-time build messages on stderr unless quiet (-q); ctx:
    the torchrun context. max_batch: the largest batch the network runs at (2 x --batch with guidance), what a
    TensorRT engine is made for. plan: the plan to run, needed by onnx-generator (its generator.onnx is made for one
    plan)."""
    return model.engine(name, device, fp16, cuda_graph, threads, max_batch, dist=ctx, plan=plan,
                        log=None if quiet else (lambda m: click.echo(m, err=True)))


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
@click.option("--trajectory", type=click.Path(dir_okay=False), default=None,
              help="Also write the reverse process of the first few samples: x.png (x_t and predicted x0 at 10 "
                   "steps) or x.gif (an animation); not with onnx-generator, which runs the loop in one call.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no one-time build messages.")
@sampling_options
def gen(num, label, uncond, engine, export_dir, fp16, no_cuda_graph, out, trajectory, quiet, ckpt, sampler, steps,
        spacing, guidance_interval, eta, variance, guidance, seed, batch, device, threads):
    """Generate digits.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png                      # UniPC-8, classes 0-9 in turn, guidance 0.45 in an interval
      ddpm gen -n 64 --sampler ddim --steps 50             # DDIM-50: 50 network calls, no history
      ddpm gen -n 16 --label 7 --guidance 3 --out sevens.png
      ddpm gen -n 64 --sampler ddpm --out ddpm.png         # the full 1000-step DDPM loop
      ddpm gen -n 10000 --batch 256 --out samples.npz      # for ddpm eval
      ddpm gen -n 64 --engine torch                        # eager PyTorch, the reference (same digits)
      ddpm gen -n 64 --engine onnx                         # the preallocated runtime on onnxruntime
      ddpm gen -n 64 --engine trt --fp16                   # TensorRT (GPU)
      ddpm gen -n 64 --engine onnx-generator               # generator.onnx: the whole loop in one call
      ddpm gen -n 8 --trajectory traj.gif                  # and the reverse process of 4 of them
    """
    import time

    import numpy as np

    from .runtime.generate import iter_generate
    from .runtime.images import MAX_GRID, Trajectory

    if label is not None and uncond:
        raise click.UsageError("--label and --uncond exclude each other")
    _refuse_guidance_without_labels(uncond, guidance)
    _output(out, "--out", (".png", ".npz"))
    if out.lower().endswith(".png") and num > MAX_GRID:
        raise click.BadParameter(f"{num} digits are too many for one grid image (at most {MAX_GRID}); "
                                 f"use --out x.npz, which streams any number", param_hint="-n")
    if trajectory is not None:
        _output(trajectory, "--trajectory", (".png", ".gif"))
        if engine == "onnx-generator":
            raise click.BadParameter("the onnx-generator engine runs the whole loop in one call; use --engine onnx "
                                     "(or auto, torch, runtime-torch)", param_hint="--trajectory")
    _threads(threads)
    model = _model(ckpt, export_dir)
    plan = _plan(model, sampler, steps, eta, variance, spacing, guidance_interval)
    ctx = _dist(device)   # under torchrun: each rank draws its share of the samples
    dev = str(ctx.device) if ctx.world > 1 else _device(device)
    net_batch = 2 * batch if guidance and not uncond else batch   # guidance runs both halves in one batch
    eng = make_engine(engine, model, dev, fp16, not no_cuda_graph, net_batch, ctx, threads, plan, quiet)
    labels = lambda a, b: model.labels(b - a, label, uncond, start=a)   # samples a..b-1: nothing of size n is held
    lo, hi = ctx.shard(num)
    t0 = time.perf_counter()
    # sample k's noise depends only on (seed, k): the shards together are exactly the single-process samples
    # --trajectory: the first batch of rank 0 runs step by step and hands its states over after every row
    traj = Trajectory(min(4, num, batch)) if trajectory and ctx.rank == 0 else None
    batches = iter_generate(eng, hi - lo, plan, lambda a, b: labels(lo + a, lo + b), guidance, seed, batch, start=lo,
                            progress=not quiet and ctx.rank == 0, watch=traj)
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
        if traj is not None:
            traj.save(trajectory)
        also = f" (trajectory -> {trajectory})" if traj is not None else ""
        how = "unconditional" if uncond else f"guidance {guidance:g}"
        click.echo(f"{num} digit{'' if num == 1 else 's'} ({plan.name}, {how}, {eng.name}{procs}) in {seconds:.1f}s -> {out}{also}")


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


# --------------------------------------------------------------------------------------------------------- editing
def editing_options(out: str, eta: float = 0.0, guidance: float = GUIDANCE):
    """Options of every editing command: the picture, how many results, the label, the output, and gen's engine and
    sampling options (eta, guidance: this command's defaults)."""
    def deco(f):
        opts = [
            click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False),
                         help="The picture: PNG or anything Pillow reads (greyscale, 16-bit, RGB, palette, or a digit "
                              "drawn in the alpha channel), a white digit on black like MNIST."),
            click.option("-n", "num", type=click.IntRange(min=1), default=8, show_default=True, help="Results."),
            click.option("--label", type=click.IntRange(0, 9), default=None,
                         help="Class to condition on [default: none, the unconditional model]."),
            click.option("--out", type=click.Path(dir_okay=False), default=out, show_default=True,
                         help="x.png: a grid, the input first, then the results; x.npz: images (N,28,28) uint8, "
                              "labels (N,) (-1: unconditional) and the input."),
            click.option("--quiet", "-q", is_flag=True, help="No progress bar, no one-time build messages."),
        ]
        f = sampling_options(engine_options(f), sampler=EDIT_SAMPLER, eta=eta, guidance=guidance, interval=None)
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def _param(hint, fn, *args):
    """fn(*args), its DdpmError (an unreadable picture, a mask of the wrong size) reported against the option."""
    try:
        return fn(*args)
    except DdpmError as e:
        raise click.BadParameter(str(e), param_hint=hint) from None


def _edit_command(what, detail, opts, run, shown, check_plan=None):   # detail: the final line's; "{plan}": the plan
    """Run one editing command like `gen`: model, engine (torchrun: each rank its share), the unconditional note,
    progress, the grid or npz with the input first, one final line. run(model, engine, n, start, progress) calls
    the api.Model method and returns (n, H, W) uint8; shown(model) reads the input (bad pictures: exit 2 here,
    before any work) and returns it as a (H, W) uint8 tile."""
    import time

    import numpy as np

    from .runtime.images import MAX_GRID

    o = opts
    _output(o["out"], "--out", (".png", ".npz"))       # before any work (files.check_writable)
    if o["out"].lower().endswith(".png") and o["num"] + 1 > MAX_GRID:
        raise click.BadParameter(f"{o['num']} results and the input are too many for one grid image (at most "
                                 f"{MAX_GRID}); use --out x.npz", param_hint="-n")
    if o["engine"] == "onnx-generator":
        raise click.BadParameter("edits run row by row: onnx-generator runs a whole plain loop in one call; use "
                                 "onnx (or auto, torch, runtime-torch)", param_hint="--engine")
    if o["label"] is None and o["guidance"] and \
            click.get_current_context().get_parameter_source("guidance") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--guidance steers results towards --label, and without --label the unconditional "
                               "model is used: give --label, or leave out --guidance")
    _threads(o["threads"])
    model = _model(o["ckpt"], o["export_dir"])
    plan = _plan(model, o["sampler"], o["steps"], o["eta"], o["variance"], o["spacing"], o["guidance_interval"])
    if check_plan is not None:                         # bad --steps, --sampler: exit 2 with the hint
        check_plan(plan)
    tile = shown(model)
    ctx = _dist(o["device"])
    dev = str(ctx.device) if ctx.world > 1 else _device(o["device"])
    eng = make_engine(o["engine"], model, dev, o["fp16"], not o["no_cuda_graph"], 2 * o["batch"], ctx, o["threads"],
                      quiet=o["quiet"])
    if o["label"] is None and ctx.rank == 0:
        click.echo("no --label: using the unconditional model", err=True)
    lo, hi = ctx.shard(o["num"])
    t0 = time.perf_counter()
    mine = run(model, eng, hi - lo, lo, not o["quiet"] and ctx.rank == 0)
    parts = ctx.gather(mine)
    seconds = time.perf_counter() - t0
    ctx.teardown()
    if ctx.rank != 0:
        return
    images = np.concatenate(parts)
    labels = np.full(o["num"], -1 if o["label"] is None else o["label"], dtype=np.int64)
    out = o["out"]
    if out.lower().endswith(".npz"):   # a samples file (samples.SAMPLES) with the input beside
        from .files import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=images, labels=labels, input=tile)
        atomic_write(out, write)
    else:
        from .runtime.images import save_grid

        save_grid(np.concatenate([tile[None], images]), out, nrow=min(o["num"] + 1, 12))
    procs = f", {ctx.world} processes" if ctx.world > 1 else ""
    cond = "unconditional" if o["label"] is None else f"label {o['label']}, guidance {o['guidance']:g}"
    click.echo(f"{o['num']} {what if o['num'] != 1 else what[:-1]} ({detail.format(plan=plan.name)}; {cond}, {eng.name}{procs}) in {seconds:.1f}s "
               f"-> {out}")


def _sampling(o, eng, n, start, progress):
    """The api.Model keyword arguments the editing commands share."""
    return dict(n=n, label=o["label"], guidance=o["guidance"], sampler=o["sampler"], steps=o["steps"], eta=o["eta"],
                variance=o["variance"], spacing=o["spacing"], guidance_interval=o["guidance_interval"],
                seed=o["seed"], batch=o["batch"], engine=eng, start=start, progress=progress)


@main.command()
@click.option("--mask", "mask_spec", default="bottom", show_default=True,
              help="What to redraw: top, bottom, left, right, or a picture of the image's size whose white pixels "
                   "are KEPT.")
@click.option("--jump-length", "jump", type=click.IntRange(min=1), default=1, show_default=True,
              help="RePaint jump length j: how many sampler steps each resampling jumps back.")
@click.option("--resample", type=click.IntRange(min=1), default=3, show_default=True,
              help="RePaint resampling count r: how often each jump point is passed (1: no resampling).")
@editing_options("inpaint.png", eta=1.0)
def inpaint(mask_spec, jump, resample, **o):
    """Redraw part of a digit, keeping the rest exactly (RePaint).

    RePaint (Lugmayr et al. 2022): after every step the kept pixels are set to the input noised to that step's
    level; the resampling jumps back and redraws, so that the new part agrees with the kept one. The default
    (DDIM-50, eta 1, j=1, r=3) costs about 3x a generation; the paper's schedule is --steps 250 --jump-length 10
    --resample 10 (about 48x); --eta 0 makes the reverse steps deterministic.

    \b
    Examples:
      ddpm inpaint --image seven.png --mask bottom -n 8 --out completions.png
      ddpm inpaint --image digit.png --mask keep.png --label 3
      ddpm inpaint --image digit.png --steps 250 --jump-length 10 --resample 10   # the paper's schedule
    """
    from pathlib import Path

    import numpy as np

    from .runtime.edits import HALVES

    if mask_spec not in HALVES and not Path(mask_spec).is_file():
        raise click.BadParameter(f"{', '.join(HALVES)} or a picture file (no file {mask_spec!r})", param_hint="--mask")

    def run(model, eng, n, start, progress):
        return model.inpaint(o["image"], mask_spec, jump=jump, resample=resample,
                             **_sampling(o, eng, n, start, progress))

    def shown(model):
        _param("--image", model.picture, o["image"])
        img, keep, _ = _param("--mask", model.inpaint_input, o["image"], mask_spec)
        return np.where(keep[0], img[0], 64).astype(np.uint8)   # the redrawn part greyed out
    def check_plan(plan):
        if plan.history and resample > 1:
            raise click.BadParameter(f"RePaint's resampling runs single-step plans (ddpm, ddim), not {o['sampler']}; "
                                     f"or --resample 1", param_hint="--sampler")
    _edit_command("completions", f"RePaint j={jump} r={resample} over {{plan}}", o, run, shown, check_plan)


@main.command("edit")
@click.option("--strength", type=Finite(0, 1), default=0.6, show_default=True,
              help="How far the input is noised: 0 returns it unchanged, 1 ignores it.")
@editing_options("edit.png", guidance=EDIT_GUIDANCE)
def edit_cmd(strength, **o):
    """Redraw a digit as another class (SDEdit).

    SDEdit (Meng et al. 2022): the input is noised to the level round(strength (T-1)), then denoised conditioned on
    --label: the lower the strength, the more of the input's shape and style stays. The default guidance is
    stronger than gen's: at strength 0.6 it took the measured agreement with the new class from 92% to 99%.

    \b
    Examples:
      ddpm edit --image three.png --label 8 --strength 0.6 -n 8 --out eights.png
      ddpm edit --image digit.png --strength 0.4             # unconditional: a cleaner redrawing
    """
    def run(model, eng, n, start, progress):
        return model.edit(o["image"], strength=strength, **_sampling(o, eng, n, start, progress))
    _edit_command("edits", f"SDEdit strength {strength:g}, {{plan}}", o, run,
                  lambda model: _param("--image", model.picture, o["image"]))


@main.command()
@click.option("--factor", type=click.Choice(["2", "4"]), required=True,
              help="Upscaling factor: 14x14 (2) or 7x7 (4) pictures to 28x28.")
@click.option("--method", type=click.Choice(["ilvr", "ddnm"]), default="ilvr", show_default=True,
              help="ilvr: low-pass guidance of x at every step (Choi et al. 2021); ddnm: range-null-space projection "
                   "of the predicted x0 (Wang et al. 2023).")
@editing_options("upscale.png", eta=1.0)
def upscale(factor, method, **o):
    """Upscale a small digit to 28x28: every result's f x f block means are the input's pixels.

    A picture of another size is first resized to 28/f (box-averaged when shrinking).

    \b
    Examples:
      ddpm upscale --image small14.png --factor 2 -n 8 --out big.png
      ddpm upscale --image tiny7.png --factor 4 --label 3 --method ddnm
    """
    import numpy as np

    from .runtime.edits import upsample

    f = int(factor)

    def run(model, eng, n, start, progress):
        return model.upscale(o["image"], f, method=method, **_sampling(o, eng, n, start, progress))

    def shown(model):
        H, W = model.image_shape[1:]
        return upsample(_param("--image", model.picture, o["image"], (H // f, W // f)), f).astype(np.uint8)
    _edit_command("upscalings", f"{method.upper()} x{f}, {{plan}}", o, run, shown)


@main.command()
@click.option("--sigma", type=Finite(0, min_open=True), required=True,
              help="Std of the Gaussian noise in the input, in [-1, 1] units (s grey levels: s/127.5).")
@editing_options("restore.png")
def restore(sigma, **o):
    """Remove Gaussian noise of a known std from a digit.

    The reverse process starts at the level where the model's noise equals the input's, from the scaled input.

    \b
    Examples:
      ddpm restore --image noisy.png --sigma 0.3 -n 4 --out clean.png
    """
    def run(model, eng, n, start, progress):
        return model.restore(o["image"], sigma, **_sampling(o, eng, n, start, progress))
    _edit_command("restorations", f"sigma {sigma:g}, {{plan}}", o, run,
                  lambda model: _param("--image", model.picture, o["image"]))


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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no one-time build messages.")
@sampling_options
def eval_cmd(sample_files, num, uncond, engine, export_dir, fp16, no_cuda_graph, data, classifier, train_classifier,
             json_out, quiet, ckpt, sampler, steps, spacing, guidance_interval, eta, variance, guidance, seed, batch,
             device, threads):
    """Measure sample quality with an MNIST classifier.

    Frechet distance of the classifier's penultimate features to the real test set, beside the floor (N real
    training images, same N), accuracy of class-conditional samples, class histogram of unconditional ones.

    \b
    Examples:
      ddpm eval -n 10000                                    # the default model, UniPC-8, guidance 0.45 in an interval
      ddpm gen -n 2000 --sampler ddpm --out ddpm.npz && ddpm eval --samples ddpm.npz
      ddpm eval --samples a.npz --samples b.npz --json quality.json
    """
    _refuse_guidance_without_labels(uncond, guidance)
    if json_out:
        _output(json_out, "--json")
    _needs_torch("eval (its MNIST classifier)")
    import json
    from pathlib import Path

    from . import evaluation
    from .files import write_text
    from .runtime.generate import ensure_memory
    from .samples import read_samples

    samples = [(Path(f).name, *read_samples(f)) for f in sample_files]   # every file checked before the slow parts
    if not sample_files:
        ensure_memory(num * evaluation.SAMPLE_BYTES, f"evaluating {num} samples", "lower -n",
                      per_unit=evaluation.SAMPLE_BYTES)
    _threads(threads)

    def generated():   # drawn once the classifier and the data are ready
        from .runtime.generate import generate

        model = _model(ckpt, export_dir)
        plan = _plan(model, sampler, steps, eta, variance, spacing, guidance_interval)
        labels = model.labels(num, None, uncond)
        net_batch = 2 * batch if guidance and not uncond else batch
        eng = make_engine(engine, model, _device(device), fp16, not no_cuda_graph, net_batch, threads=threads,
                          plan=plan, quiet=quiet)
        images = generate(eng, num, plan, labels, guidance, seed, batch, progress=not quiet,
                          image_shape=model.image_shape)
        yield f"{plan.name} w={guidance:g}" + (" uncond" if uncond else ""), images, labels

    rows = evaluation.evaluate_sets(samples or generated(), data, classifier, train_classifier, progress=not quiet,
                                    log=click.echo)
    click.echo(evaluation.format_table(rows))
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
      ddpm export --generator --steps 20                  # generator.onnx: UniPC-20 in one ONNX call
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

        # gen's defaults: the plan guides inside the default interval, so generator.onnx gives gen's digits
        plan = _plan(_model(ckpt), sampler, steps, 0.0, "small", None, GUIDANCE_INTERVAL)
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
        ctx = click.get_current_context()
        given = [opt for opt, param in (("--batch", "batches"), ("--steps", "steps"), ("--repeat", "repeat"))
                 if ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--quick sets --batch 1,2, --steps 3 and --repeat 2 itself; leave out "
                                   f"{' and '.join(given)}, or drop --quick")
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
