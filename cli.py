"""The `ddpm` command line: train, distill, gen, inpaint, edit, upscale, restore, eval, export, bench.

It parses options, calls the library (pipeline.py runs every sampling job) and prints. Choices and defaults come
from the modules that define them; heavy modules are imported inside each command so that `ddpm --help` is instant.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .signals import (end_of_program, exit_on_signals, file_size_limit_as_error, restore_signals, said,
                      signals_as_interrupt)

# SIGTERM from here on prints "terminated" and exits 143, SIGHUP "hangup" and 129, Ctrl-C "interrupted" and 130,
# before the imports below
# (numpy and the rest: most of a second); a command's own handling (signals_as_interrupt) takes over while it runs;
# Group.main puts back the caller's handlers when it returns
_BEFORE_CLI = exit_on_signals()

from .errors import (LESS_AT_ONCE, DdpmError, LimitReached, OptionError, StdoutFailed, Terminated,  # noqa: E402
                     checked_stdout, limit_message, printable, shown, start_refusal, stdout_failure)


def _limit_exit(e: BaseException) -> None:
    """Print "Error: <the limit>" and exit 1 when a resource limit caused `e` (errors.limit_message); return
    otherwise. For what fails outside a command: the imports below, click's teardown of a context."""
    message = limit_message(e)
    if message is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"Error: {message}\n")
            sys.stderr.flush()
        sys.exit(1)


# an address space too small for numpy (and OpenBLAS's threads) to load: one line now, instead of OpenBLAS's own
# line or an import's traceback
_REFUSAL = start_refusal()
if _REFUSAL is not None:
    sys.stderr.write(f"Error: {_REFUSAL}\n")
    sys.exit(1)

try:
    import click

    from .cli_edit import edit_cmd, inpaint, restore, upscale
    from .cli_options import PathArg, check_output, done, prepare, refuse_same_path, sampling_options
    from .cli_tools import bench, eval_cmd, export_cmd
    from .cli_train import distill, train
    from .files import NoWorkingFolder, check_working_folder, hold_standard_descriptors
    from .model.io import WeightsChanged
except Exception as _e:   # MemoryError or an unmappable library: the limit's line
    _limit_exit(_e)
    raise

# OMP_WAIT_POLICY=PASSIVE is set by `import ddpm` (ddpm/__init__.py), before any command loads PyTorch.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
FLAGS = {"n": "-n", "jump": "--jump-length", "top": "--strength", "plan": "--sampler"}   # API argument -> option


# options that ask for less memory at once: an out-of-memory message names those of the command that runs
# the parameters that ask for less host memory at once: samples (-n), a batch of sampling or training, bench's
# batches; not export's --batch (batch_range), which shapes TensorRT engines only
LESS_AT_ONCE_PARAMS = ("num", "batch", "batch_size", "batches")
_HELP_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())   # `ddpm` alone: click shows the help (click >= 8.2)


def own_line() -> None:
    """End the progress bars still open (a command stopped while one was drawn, its last `\r` line unfinished), so
    that the error line that follows starts a line of its own: `grep '^Error'` finds it in a log."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class OneLineUsageError(click.UsageError):
    """A usage error (a bad or unknown option, a value that does not fit, an unknown command) shown as one line,
    "Error: <click's message, naming the option> (see ddpm gen --help)", instead of click's usage block; exit
    status 2, as click's."""

    def __init__(self, e: click.UsageError, path: str | None):
        super().__init__(printable(" ".join(e.format_message().split())), e.ctx)
        self.path = e.ctx.command_path if e.ctx is not None else path

    def show(self, file=None) -> None:
        hint = f" (see {self.path} --help)" if self.path else ""
        own_line()
        click.echo(f"Error: {self.format_message()}{hint}", file=file, err=file is None)


class ErrorLine(click.ClickException):
    """Any other error of a command: "Error: <message>" (exit status 1), every character of the message that is not
    printable escaped (errors.printable): a path with a newline or a NUL in it stays one line that shows it."""

    def format_message(self) -> str:
        return printable(self.message)

    def show(self, file=None) -> None:
        own_line()
        super().show(file)


def less_at_once(command: click.Command) -> str | None:
    """The options of `command` that ask for less memory at once, as a message names them ("-n or --batch")."""
    opts = [p.opts[0] for p in command.params if p.name in LESS_AT_ONCE_PARAMS and p.opts]
    return " or ".join(opts) or None


class Group(click.Group):
    """The `ddpm` group: a usage error (a bad option value, an OptionError naming its option, an unknown option or
    command) is one line and exit 2 (OneLineUsageError); any other DdpmError and a resource limit of the process
    (errors.limit_message, naming the running command's options that ask for less memory) one line and exit 1;
    Ctrl-C one line and exit 130 (SIGINT's code), SIGTERM the same with "terminated" and exit 143, SIGHUP (a closed
    terminal) with "hangup" and exit 129 (errors.Terminated). Standard output is written through
    errors.CheckedStdout: a failed write (`> /dev/full`) is one line on standard error and exit 1
    (errors.StdoutFailed)."""

    def main(self, *args, **kwargs):
        # run as the program (its own command line, ended by sys.exit): the handlers of exit_on_signals stay while
        # Python code still runs (threads joined, atexit callbacks), so that a signal then still gives its line and
        # status, and the interpreter's teardown after ignores them (signals.end_of_program); called with
        # arguments (a test, an embedding program), the caller's come back
        program = not args and kwargs.get("args") is None and kwargs.get("standalone_mode", True)
        hold_standard_descriptors()
        try:   # before any command imports PyTorch, which cannot load in a deleted folder (MKL's line, exit 2)
            check_working_folder()
        except NoWorkingFolder as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        try:
            with checked_stdout():
                return super().main(*args, **kwargs)
        except StdoutFailed as e:   # also from --version and --help, which print while the options are parsed
            message = stdout_failure(e)
            with contextlib.suppress(OSError):
                click.echo(f"Error: {message}", err=True)
            sys.exit(1)
        except Exception as e:   # a limit met outside the command: in click's teardown of its context
            _limit_exit(e)
            raise
        finally:   # the handlers installed while the CLI started (exit_on_signals): the caller's again
            if not program:
                restore_signals(_BEFORE_CLI)
            else:
                end_of_program(_BEFORE_CLI)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _HELP_ERROR:
            raise
        except click.UsageError as e:   # an option of `ddpm` itself
            raise OneLineUsageError(e, info_name) from None

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            LESS_AT_ONCE.set(less_at_once(command))   # reset when `invoke` returns
        return name, command, rest

    def invoke(self, ctx):
        token = LESS_AT_ONCE.set(None)
        try:
            return self._invoke(ctx)
        except click.UsageError as e:
            sub = f"{ctx.command_path} {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ctx.command_path
            raise OneLineUsageError(e, sub) from None
        finally:
            LESS_AT_ONCE.reset(token)

    def _invoke(self, ctx):
        # the signals are caught outside the handlers' block, so that one that comes while the handlers are swapped
        # is reported the same way; once its line is printed, another signal exits at once without a second line
        try:
            with signals_as_interrupt(), file_size_limit_as_error():
                try:
                    return super().invoke(ctx)
                except OptionError as e:
                    if e.option is None:
                        raise ErrorLine(str(e)) from None
                    raise click.BadParameter(str(e), param_hint=FLAGS.get(e.option, "--" + e.option.replace("_", "-")))
                except WeightsChanged as e:   # the API's advice is "load it again": here, the command is run again
                    raise ErrorLine(f"{e.path} changed while this command read it (a run that is training rewrites "
                                    f"it at each checkpoint); run the command again, or copy the file and give the "
                                    f"copy") from None
                except StdoutFailed:   # Group.main's line, once standard output is dropped
                    raise
                except LimitReached as e:   # the limit's line, without the API call it stopped
                    raise ErrorLine(e.limit) from None
                except DdpmError as e:
                    raise ErrorLine(str(e)) from None
                except Exception as e:
                    message = limit_message(e)
                    if message is None:
                        raise
                    raise ErrorLine(message) from None
        except Terminated as e:   # SIGTERM 143, SIGHUP 129
            click.echo(f"\n{printable(str(e)) or e.word}", err=True)
            said()
            ctx.exit(128 + e.signum)
        except KeyboardInterrupt as e:
            click.echo(f"\n{printable(str(e)) or 'interrupted'}", err=True)
            said()
            ctx.exit(130)


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="ddpm-mnist")
def main():
    """Denoising diffusion on MNIST: train, generate, edit, export to ONNX/TensorRT, benchmark.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png          # the shipped default model, 64 digits
      ddpm inpaint --image d.png --mask bottom # redraw the bottom half (also: edit, upscale, restore)
      ddpm train --preset small --steps 200    # train (downloads MNIST if needed)
      ddpm distill --out runs/distill          # a 4-step student of the shipped model
      ddpm export --fp16                       # ONNX fp32 + fp16 of the default model
      ddpm bench                               # every engine against eager PyTorch
    """




# ------------------------------------------------------------------------------------------------------------- gen
@main.command()
@click.option("-n", "num", type=click.IntRange(min=1), default=64, show_default=True, help="Number of digits.")
@click.option("--label", type=click.IntRange(min=0), default=None,
              help="Draw only this class, one of the model's (0-9 for MNIST) [default: its classes in turn].")
@click.option("--uncond", is_flag=True, help="Unconditional sampling (the reserved 'no label'). An explicit "
              "--guidance > 0 is refused with it: guidance steers a sample towards its label.")
@click.option("--out", type=PathArg(dir_okay=False), default="digits.png", show_default=True,
              help="x.png: a grid image (n <= 10000); x.npz: images (N,H,W) uint8 and labels (N,) (-1 "
                   "unconditional), written as they are made (any n).")
@click.option("--trajectory", type=PathArg(dir_okay=False), default=None,
              help="Also write the reverse process of the first few samples: x.png (x_t and predicted x0 at 10 "
                   "steps) or x.gif (an animation); not with onnx-generator, which runs the loop in one call.")
@sampling_options()
def gen(num, label, uncond, out, trajectory, **o):
    """Generate digits.

    \b
    Examples:
      ddpm gen -n 64 --out digits.png                      # UniPC-8, classes 0-9 in turn, guidance 0.45 in an interval
      ddpm gen -n 64 --sampler ddim --steps 50             # DDIM-50: 50 network calls, no history
      ddpm gen -n 16 --label 7 --guidance 3 --out sevens.png
      ddpm gen -n 64 --sampler ddpm --out ddpm.png         # the full 1000-step DDPM loop
      ddpm gen -n 10000 --batch 256 --out samples.npz      # for ddpm eval
      ddpm gen -n 64 --engine torch                        # eager PyTorch, the reference (same digits)
      ddpm gen -n 64 --engine trt --fp16                   # TensorRT (GPU)
      ddpm gen -n 64 --engine onnx-generator               # the whole loop in one ONNX call
      ddpm gen -n 8 --trajectory traj.gif                  # and the reverse process of 4 of them
    """
    from . import pipeline
    from .runtime.images import Trajectory, check_grid
    from .samples import check_room

    refuse_same_path({"--out": out, "--trajectory": trajectory}, {"--ckpt": o["ckpt"], "--export": o["export_dir"]})
    check_output(out, "--out", (".png", ".npz"))
    if out.lower().endswith(".png"):
        check_grid(num)
    if trajectory is not None:
        check_output(trajectory, "--trajectory", (".png", ".gif"))
        pipeline.check_engine(o["engine"], watch=True)
    model, opts, log = prepare(dict(o, label=label, uncond=uncond), recorded=True, labelled=not uncond)
    if out.lower().endswith(".npz"):
        check_room(out, num, model.image_shape)
    plan = model.plan(**opts.plan_args())
    job = pipeline.Job.of(model, num, plan, label, uncond, opts)
    traj = Trajectory(min(4, num, opts.batch)) if trajectory else None
    with pipeline.run(model, opts, job, progress=not o["quiet"], log=log, watch=traj) as r:
        if r.batches is not None:   # an .npz is written batch by batch as they come
            pipeline.save(out, r.batches, job.labels, num, model.image_shape,
                          10 if label is None and not uncond else None)
    if r.ctx.rank == 0:
        if traj is not None:
            traj.save(trajectory)
        how = "unconditional" if uncond else f"guidance {opts.guidance:g}"
        done(r, num, "digits", f"{plan.name}, {how}", out, f" (trajectory -> {shown(trajectory)})" if traj else "")


for _command in (train, distill, inpaint, edit_cmd, upscale, restore, eval_cmd, export_cmd, bench):
    main.add_command(_command)


def module_prog(module: str) -> str:
    """How the user ran `python -m MODULE`, with the interpreter's name as typed ("python3 -m ddpm"): the program
    name that usage errors' "(see ... --help)" and --version show. Click's own guess always says "python", which not
    every system has."""
    return f"{os.path.basename(sys.executable) or 'python'} -m {module}"


if __name__ == "__main__":
    main(prog_name=module_prog("ddpm.cli"))
