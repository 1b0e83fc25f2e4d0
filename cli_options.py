"""The options the `ddpm` commands share (cli.py, cli_edit.py, cli_tools.py, cli_train.py): click types and checks,
the options.Sampling fields as options, and the steps every sampling command takes (prepare, done)."""

from __future__ import annotations

import errno
import math
import os
import re
from typing import Callable

import click
from click.core import ParameterSource

from .errors import shown
from .options import MAX_GUIDANCE, MAX_LEVEL, MAX_THREADS, Sampling, VARIANCES
from .runtime.engines import ENGINES
from .runtime.noise import MAX_SEED
from .runtime.samplers import DEFAULT_SPACING, SAMPLERS, SPACINGS, default_steps
from .schema import repeated

DEFAULT = Sampling()


class Finite(click.FloatRange):
    """A FloatRange that also refuses NaN and +-inf (float('nan') passes every comparison-based range check), and
    reads -0 as 0 (one plan, one name: "eta0", never "eta-0")."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v + 0.0


def _missing_why(path) -> str | None:
    """Why `path`, which click.Path(exists=True) calls missing, cannot be read, when that is not "does not exist": a
    symbolic link to a target that does not exist, a loop of links, a folder on the path that cannot be searched."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"is a symbolic link to {os.readlink(path)!r}, which does not exist" if os.path.islink(path) else None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({e.strerror or e})"
    return None


def shown_path(value) -> str:
    """A path as a usage error names it: repr of its text, with the bytes it holds that are not UTF-8 as their
    surrogates (\\udcff) and control characters escaped, one line (click's format_filename puts U+FFFD in their
    place, so the name is lost)."""
    return repr(os.fsdecode(value))


class PathArg(click.Path):
    """click.Path whose usage errors name the path as shown_path writes it."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            clicks = repr(click.format_filename(value))
            if clicks != shown_path(value):
                e.message = e.message.replace(clicks, shown_path(value))
            raise


class InputPath(PathArg):
    """PathArg(exists=True) whose usage error says why a path that is there cannot be read (_missing_why) instead
    of "does not exist": "Invalid value for '--ckpt': Path 'm' is a loop of symbolic links"."""

    def __init__(self, **kwargs):
        super().__init__(exists=True, **kwargs)

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            why = _missing_why(value)
            if why is None:
                raise
            self.fail(f"Path {shown_path(value)} {why}.", param, ctx)


class ExportFolder(InputPath):
    """--export: a folder that exists, or one that a killed `ddpm export` moved aside and the reader puts back
    (files.has_aside); any other path is a usage error naming the option, as for every input (InputPath)."""

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        from .files import has_aside

        if not os.path.lexists(value) and has_aside(value):
            return PathArg(file_okay=False).convert(value, param, ctx)
        return super().convert(value, param, ctx)


def device_syntax(ctx, param, value):
    """--device: auto, cpu, cuda or cuda:N, checked when parsed (whether that GPU exists is checked when used)."""
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


def comma_list(value: str, item: Callable[[str], object], what: str) -> list:
    """The items of a comma-separated option value (e.g. --batch 1,8,64), each converted by `item` (ValueError for a
    bad one), in the order given. click.BadParameter (one line, exit 2; click names the option) for a bad item, an
    empty one ("1,,2") and one given twice (a list of distinct choices: a repeat would be run twice). `what`: the
    form the option takes, e.g. "a comma-separated list of positive integers, e.g. 1,8,64"."""
    parts = [v.strip() for v in value.split(",")]
    if "" in parts:
        raise click.BadParameter(f"{'an empty item in ' + repr(value) if value.strip() else 'none given'}; {what}")
    try:
        items = [item(v) for v in parts]
    except ValueError as e:
        raise click.BadParameter(f"{e}; {what}" if str(e) else what) from None
    twice = repeated(items)
    if twice is not None:
        raise click.BadParameter(f"{twice} is given twice; {what}")
    return items


def parse_interval(ctx, param, value):
    """--guidance-interval LO,HI -> (lo, hi) floats with 0 <= lo < hi <= MAX_LEVEL (hi may be inf); 'all' -> None."""
    if value is None or value == "all":
        return None
    try:
        lo, hi = (float(v) + 0.0 for v in value.split(","))   # -0 as 0
    except ValueError:
        lo, hi = float("nan"), float("nan")
    if not (0 <= lo < hi and (hi <= MAX_LEVEL or hi == math.inf)):   # also refuses NaN
        raise click.BadParameter(f"LO,HI with 0 <= LO < HI <= {MAX_LEVEL:g} (noise levels sigma; HI may be inf), "
                                 f"e.g. 0.28,5.42, or 'all'")
    return lo, hi


def check_output(path, param: str, suffixes: tuple[str, ...] | None = None, folder: bool = False):
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


def _same_path(a, b) -> bool:
    """Whether paths a and b name the same file or folder: os.path.samefile where both exist (symbolic and hard
    links, case-insensitive file systems), else their real paths, normalised."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return _real(a) == _real(b)


def sample_names(files) -> list[str]:
    """The row names of `ddpm eval --samples` files (paths, in the order given): each file's name, or the path as
    given where two files share a name, so every row of the scores names one file. Raises click.UsageError (one
    line, exit 2) for one file given twice (the same file by any path): it would be scored twice under two rows."""
    files = [str(f) for f in files]
    for i, a in enumerate(files):
        for b in files[:i]:
            if _same_path(a, b):
                raise click.UsageError(f"--samples {shown(b)} and --samples {shown(a)} are the same file: give each "
                                       f"file once")
    base = [os.path.basename(f) for f in files]
    return [b if base.count(b) == 1 else f for f, b in zip(files, base)]


def _real(path) -> str:
    from .files import real_path

    return os.path.normcase(real_path(path))


def _inside(path, folder) -> bool:
    """Whether `path` lies inside the folder `folder` (below it, at any depth; not the folder itself), by their real
    paths: symbolic links on either path are followed, `..` resolved."""
    p, f = _real(path), _real(folder)
    try:
        return p != f and os.path.commonpath([p, f]) == f
    except ValueError:   # on different drives (Windows)
        return False


# Input folders that hold only what the command reads (MNIST's files): no file output may lie inside them.
DATA_FOLDERS = ("--data",)
# The inputs that name a model: a run, export or diffusers folder, or a file of one. Such a folder also holds the
# user's own outputs (samples.npz beside the weights), so there an output is refused only where it would replace one
# of the folder's own files (MODEL_FOLDERS).
MODEL_INPUTS = ("--ckpt", "--export", "--init", "--teacher")


def _names(pattern: str):
    """The test of a folder's own paths whose whole path matches `pattern`."""
    whole = re.compile(rf"^(?:{pattern})$")
    return lambda path: whole.match(path) is not None


def _export_folder_owns(path: str) -> bool:
    """export.cache.EXPORT_FOLDER.owns, imported when first asked: `ddpm --help` loads no export module."""
    from .export.cache import EXPORT_FOLDER

    return EXPORT_FOLDER.owns(path)


# What each folder that holds a model is: the files that mark it, and the test of the paths (relative,
# "/"-separated) of the files it owns, written by ddpm's commands and read by them, its markers included:
# `ddpm train`/`distill`'s run folder (train.loop.RUN_FILES and distill's students: tests/test_output_clobber.py
# checks that they match), `ddpm export`'s folder (export.cache.EXPORT_FOLDER, the rule by which `ddpm export`
# tells its files from a user's) and a diffusers pipeline folder (docs/diffusers.md: export.diffusers.FILES, and
# model.diffusers.DECLARATION, which loading reads).
MODEL_FOLDERS = (
    ("run folder", ("options.json", "ckpt.pt", "model.safetensors"),
     _names(r"options\.json|log\.jsonl|ckpt\.pt|model\.safetensors|samples\.png|student\d+\.safetensors")),
    ("export folder", ("export.json",), _export_folder_owns),
    ("diffusers pipeline folder", ("model_index.json",), _names(r"model_index\.json|ddpm\.json|(unet|scheduler)/.+")),
)


def _with_defaults(inputs: dict) -> dict:
    """`inputs` with the folder a --data option given without a value reads ($DDPM_DATA, else the cache's MNIST
    folder: train.data.resolve_data_dir), so that an output is checked against what the command will read."""
    from .errors import DdpmError

    if "--data" in inputs and not inputs["--data"]:
        from .train.data import resolve_data_dir

        try:
            inputs = dict(inputs, **{"--data": str(resolve_data_dir(None))})
        except DdpmError:   # no home folder to find it in: the command says so when it reads the data
            pass
    return inputs


def _package_assets() -> str:
    """The package's assets folder: the shipped model (what --ckpt's default reads), its export
    (export.cache.shipped_dir), the classifier (eval's --classifier default)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def _export_cache() -> str | None:
    """The export cache (export.cache.cache_folder's parent): the export folders the sampling commands read, and
    export on first use, without an option naming them."""
    from .errors import DdpmError
    from .locations import cache_dir

    try:
        return str(cache_dir("exports"))
    except DdpmError:   # no home folder: no cache is read (the command says so where it needs one)
        return None


def _cached_export_file(path, exports: str) -> tuple[str, str] | None:
    """(export folder, its own file) in the export cache that the output `path` would replace, by its real path
    (a link to such a file counts), else None; a cache folder counts before it exists (a first use makes it)."""
    if not _inside(path, exports):
        return None
    rel = os.path.relpath(_real(path), _real(exports)).replace(os.sep, "/")
    name, _, own = rel.partition("/")
    return (os.path.join(exports, name), own) if own and _export_folder_owns(own) else None


def _folder_kinds(option: str, path) -> list[tuple[str, str, Callable[[str], bool]]]:
    """[(folder, what it is, the test of its own paths)] of the model input `path` given to `option`: the folder
    itself, or the folder of a file (--ckpt run/ckpt.pt reads the run), for each MODEL_FOLDERS kind whose marker it
    holds; an --export folder is an export folder even before it is made."""
    from .files import real_path

    folder = path if option == "--export" or os.path.isdir(path) else \
        os.path.dirname(real_path(path, links=False))
    return [(folder, what, owns) for what, markers, owns in MODEL_FOLDERS
            if any(os.path.isfile(os.path.join(folder, m)) for m in markers)
            or (option == "--export" and what == "export folder")]


def _own_file(path, folder: str, owns: Callable[[str], bool]) -> str | None:
    """The own file of `folder` (a path relative to it that `owns`) that the output `path` would replace: by name,
    or by what is there (a link to it, another spelling on a case-insensitive file system); else None."""
    if _inside(path, folder):
        rel = os.path.relpath(_real(path), _real(folder)).replace(os.sep, "/")
        if owns(rel):
            return rel
    try:
        entries = [e.name for e in os.scandir(folder)]
    except OSError:
        return None
    for name in entries:
        if owns(name) and _same_path(path, os.path.join(folder, name)):
            return name
    return None


def refuse_same_path(outputs: dict, inputs: dict | None = None, folders: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output that is the same file or folder as one of the command's inputs or as
    another of its outputs, a folder output that contains one of them (or lies inside another folder output), an
    output inside an input folder of DATA_FOLDERS (the files read there are not listed one by one), and an output
    that would replace one of the own files of a run, export or diffusers folder that a MODEL_INPUTS option reads
    (its weights, checkpoint, options.json, log, export.json, ONNX files: MODEL_FOLDERS), however it is named:
    writing it would destroy that input (or the other output's content) and still succeed. The user's other files
    in such a folder may be written.

    outputs, inputs: {option name: a path, a list of paths (a repeated option) or None (not given)}; folders: the
    options among `outputs` that name a folder the command writes (publishes or writes into). Raises
    click.UsageError (one line, exit 2) naming both options."""
    def given(d):
        for option, value in (d or {}).items():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path is not None and str(path) != "":
                    yield option, path

    inputs = _with_defaults(inputs or {})
    seen = [(option, path, "reads", False) for option, path in given(inputs)]
    owners = [(option, kind) for option, path in given(inputs) if option in MODEL_INPUTS
              for kind in _folder_kinds(option, path)]
    assets, exports = _package_assets(), _export_cache() if inputs.keys() & {"--ckpt", "--export"} else None
    for option, path in given(outputs):
        folder = option in folders
        if _same_path(path, assets) or _inside(path, assets):
            raise click.UsageError(f"{option} {path} lies in the package's assets folder {assets}, which holds what "
                                   f"the commands read (the shipped model, its export, the classifier); give "
                                   f"{option} a path outside it")
        cached = _cached_export_file(path, exports) if exports else None
        if cached is not None:
            raise click.UsageError(f"{option} {path} would replace {cached[1]} of the export folder {cached[0]} in "
                                   f"the export cache, which the sampling commands read; give {option} another path")
        for other, earlier, role, other_folder in seen:
            if _same_path(path, earlier):
                kind = "folder" if folder or other_folder or os.path.isdir(earlier) else "file"
                raise click.UsageError(f"{option} and {other} name the same {kind} ({path}): writing {option} would "
                                       f"overwrite what {other} {role}; give {option} another path")
            if folder and _inside(earlier, path):
                raise click.UsageError(f"the {option} folder {path} contains {other} {earlier}: writing {option} "
                                       f"could overwrite what {other} {role}; give {option} a folder that does not "
                                       f"contain it")
            if not folder and other in DATA_FOLDERS and os.path.isdir(earlier) and _inside(path, earlier):
                raise click.UsageError(f"{option} {path} lies inside the {other} folder {earlier} that the command "
                                       f"reads: writing {option} could overwrite what {other} reads; give {option} a "
                                       f"path outside it")
            if other_folder and _inside(path, earlier):
                raise click.UsageError(f"the {other} folder {earlier} contains {option} {path}: writing {other} "
                                       f"could overwrite what {option} writes; give {option} a path outside it")
        for other, (owner, what, owns) in owners:
            own = _own_file(path, owner, owns)
            if own is not None:
                raise click.UsageError(f"{option} {path} would replace {own} of the {what} {owner} that {other} "
                                       f"reads; give {option} another name (your own files may lie beside it)")
        seen.append((option, path, "writes", folder))


def on_command_line(name: str) -> bool:
    return click.get_current_context().get_parameter_source(name) == ParameterSource.COMMANDLINE


def needs_torch(command: str) -> None:
    """One line instead of an ImportError when a command needs PyTorch and it is not installed."""
    from .model.io import require_torch

    require_torch(f"ddpm {command}")


def set_threads(n):
    """torch's CPU threads (onnxruntime's are set where its sessions are made), when PyTorch is installed."""
    from .runtime.engines import have_torch

    if n and have_torch():
        import torch

        torch.set_num_threads(n)


def add_options(f, opts):
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_option(f):
    return click.option("--ckpt", type=InputPath(), default=None,
                        help="Checkpoint: model.safetensors, ckpt.pt, a run folder or a diffusers pipeline folder "
                             "(docs/diffusers.md) [default: the shipped model].")(f)


def per_sampler(default: dict) -> str:
    """A default that depends on the sampler (sampler -> value), as help texts say it: "50 for ddim, 8 for dpm++2m
    and unipc"."""
    by_value: dict = {}
    for sampler, value in default.items():
        by_value.setdefault(value, []).append(sampler)
    return ", ".join(f"{value} for {' and '.join(samplers)}" for value, samplers in by_value.items())


# runtime.samplers' defaults of the few-step samplers (DDPM runs all T steps, with no spacing)
DEFAULT_STEPS_HELP = per_sampler({s: default_steps(10**9, s) for s in SAMPLERS if s != "ddpm"})
DEFAULT_SPACING_HELP = per_sampler(DEFAULT_SPACING)


def solver_options(defaults: Sampling = DEFAULT, steps_help: str = "Network calls per sample [default: "
                   f"{DEFAULT_STEPS_HELP}, T for ddpm]."):
    """--sampler, --steps, --spacing, --guidance-interval, --guidance-rescale with a command's defaults (bench: without
    eta, variance)."""
    interval = defaults.guidance_interval
    return lambda f: add_options(f, [
        click.option("--sampler", type=click.Choice(SAMPLERS), default=defaults.sampler, show_default=True,
                     help="DDPM ancestral (all T steps), DDIM, DPM-Solver++(2M) or UniPC-2 (multistep, few steps)."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help=steps_help),
        click.option("--spacing", type=click.Choice(SPACINGS), default=None,
                     help="Timesteps: linspace (t=0 included), trailing (the last step lands on x0) or uniform in "
                          f"log-SNR [default: {DEFAULT_SPACING_HELP}]."),
        click.option("--guidance-interval", default="all" if interval is None else ",".join(map("{:g}".format,
                     interval)), callback=parse_interval, metavar="LO,HI|all", show_default=True,
                     help="Guidance only where the noise level sigma = sqrt((1-abar)/abar) is in (LO, HI] "
                          "(Kynkaanniemi et al. 2024); elsewhere the conditional model alone. 'all': every step."),
        click.option("--guidance-rescale", type=Finite(0, 1), default=defaults.guidance_rescale, show_default=True,
                     metavar="PHI", help="Rescale the guided eps towards the conditional eps's standard deviation "
                     "(Lin et al. 2024, eq. 15-16; 0.7 in the paper): counters the washed-out, over-saturated "
                     "strokes of strong guidance. 0: off; no effect without guidance."),
    ])


def plan_flags(opts: Sampling, steps: int) -> str:
    """The `ddpm gen` options that make the plan of `opts` (a plan of `steps` network calls): --sampler and --steps,
    then every other plan option that differs from gen's defaults (DEFAULT: --eta, --variance, --spacing,
    --guidance-interval, --guidance-rescale), as the web page shows the command that gives its digits."""
    flags = [f"--sampler {opts.sampler}", f"--steps {steps}"]
    if opts.eta != DEFAULT.eta:
        flags.append(f"--eta {opts.eta:g}")
    if opts.variance != DEFAULT.variance:
        flags.append(f"--variance {opts.variance}")
    if opts.spacing is not None:
        flags.append(f"--spacing {opts.spacing}")
    if opts.guidance_interval != DEFAULT.guidance_interval:
        interval = opts.guidance_interval
        flags.append("--guidance-interval " + ("all" if interval is None else ",".join(map("{:g}".format, interval))))
    if opts.guidance_rescale != DEFAULT.guidance_rescale:
        flags.append(f"--guidance-rescale {opts.guidance_rescale:g}")
    return " ".join(flags)


def sampling_options(defaults: Sampling = DEFAULT):
    """The options.Sampling fields as options (gen, eval, the editing commands), with a command's defaults."""
    return lambda f: add_options(f, [
        model_option, solver_options(defaults),
        click.option("--eta", type=Finite(0, 1), default=defaults.eta, show_default=True,
                     help="DDIM eta: 0 deterministic, 1 DDPM-like."),
        click.option("--variance", type=click.Choice(VARIANCES), default=defaults.variance, show_default=True,
                     help="DDPM posterior variance: beta~_t (small) or beta_t (large)."),
        click.option("--guidance", "-w", type=Finite(0, MAX_GUIDANCE), default=defaults.guidance, show_default=True,
                     help="Classifier-free guidance w: eps_c + w (eps_c - eps_u); 0 = conditional model alone."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=defaults.seed, show_default=True,
                     help="Seed of the noise stream, 0..2^64-1 (same seed, same digits, any batch size or engine)."),
        click.option("--batch", type=click.IntRange(min=1), default=defaults.batch, show_default=True,
                     help="Samples per batch."),
        click.option("--device", default=defaults.device, show_default=True, callback=device_syntax,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                     help=f"CPU threads (1..{MAX_THREADS})."),
        click.option("--engine", type=click.Choice(["auto", *ENGINES]), default="auto", show_default=True,
                     help="torch: eager PyTorch (the reference); runtime-torch, onnx, trt: the preallocated runtime; "
                          "onnx-generator: the whole loop in one ONNX call (deterministic plans; gen and eval only: "
                          "the editing commands refuse it); auto: onnx on a CPU, runtime-torch on a GPU (same digits, "
                          "faster)."),
        click.option("--export", "export_dir", type=ExportFolder(), default=None,
                     help="Export folder for onnx/trt/onnx-generator [default: the checkpoint's, exported on first "
                          "use]."),
        click.option("--fp16", is_flag=True, help="Half-precision model (runtime engines)."),
        click.option("--int8", is_flag=True, help="int8 convolutions (the onnx engine on a CPU; made by "
                                                  "`ddpm export --int8`; the last row and those at sigma <= 1 run "
                                                  "fp32)."),
        click.option("--no-cuda-graph", is_flag=True, help="GPU: run the loop step by step instead of one CUDA graph."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar, no one-time build messages."),
    ])


def sampling(o: dict, labelled: bool = True, record: dict | None = None, settings: bool = True) -> Sampling:
    """The options.Sampling of a sampling command's options; labelled: whether its samples have labels (not
    --uncond; an edit's --label); record: a model's recorded plan for the options not on the command line. Raises
    OptionError (a usage error naming its option) for options that contradict each other, as options.Sampling.of
    finds them: --label with --uncond (o["label"], o["uncond"]), an explicit --guidance for samples without labels,
    two precisions, a setting that would change nothing (settings False: not yet, Sampling.of)."""
    return Sampling.of(o, {name for name in o if on_command_line(name)}, labelled, cli=True, record=record,
                       settings=settings, cuda_graph=not o["no_cuda_graph"])


def prepare(o: dict, recorded: bool = False, labelled: bool = True):
    """(model, options.Sampling, log) of a sampling command's options (`sampling`): the api.Model of
    --ckpt/--export; recorded: the plan its file records (a distilled student's, options.recorded_plan) for the
    options not on the command line."""
    from . import api

    set_threads(o["threads"])
    opts = sampling(o, labelled, settings=not recorded)   # contradictions found before any file is read
    model = api.load(o["ckpt"], o["export_dir"])
    if recorded:   # the settings checked with the record in place: a student's DDIM takes --eta
        opts = sampling(o, labelled, model.recorded)
    return model, opts, None if o["quiet"] else (lambda m: click.echo(m, err=True))


def done(r, n: int, what: str, detail: str, out: str, also: str = "") -> None:
    """The last line of gen and the editing commands: n results (detail: the plan and guidance, the engine and its
    precision where not fp32, e.g. "onnx int8", pipeline.ran) in seconds -> out."""
    from .runtime.engine import engine_label

    procs = f", {r.ctx.world} processes" if r.ctx.world > 1 else ""
    click.echo(f"{n} {what if n != 1 else what[:-1]} ({detail}, {r.label or engine_label(r.engine)}{procs}) in "
               f"{r.seconds:.1f}s -> {shown(out)}{also}")
