"""`ddpm eval`, `ddpm export` and `ddpm bench`: their options and the library calls (cli.py adds them to `ddpm`)."""

from __future__ import annotations

import click

from .cli_options import (DEFAULT, DEFAULT_STEPS_HELP, Finite, InputPath, PathArg, check_output, comma_list,
                          device_syntax, model_option, needs_torch, on_command_line, plan_flags, prepare,
                          refuse_same_path, sample_names, sampling, sampling_options, set_threads, solver_options)
from .errors import shown
from .export.generator import FORMS
from .options import MAX_GUIDANCE, MAX_THREADS, Sampling, precision_refusal
from .runtime.engines import ENGINES


# ------------------------------------------------------------------------------------------------------------ eval
# The options of eval that apply to --samples: what scores them, where the scores go, how the command runs. Every other
# one makes the samples eval generates.
_SCORING = ("sample_files", "data", "classifier", "train_classifier", "json_out", "threads", "quiet")

@click.command("eval")
@click.option("--samples", "sample_files", multiple=True, type=InputPath(dir_okay=False),
              help="npz files from `ddpm gen --out x.npz` (repeat to compare); without it, samples are generated.")
@click.option("-n", "num", type=click.IntRange(min=2), default=10000, show_default=True,
              help="Samples to generate when no --samples are given.")
@click.option("--uncond", is_flag=True, help="Generate unconditional samples (class histogram) instead of 0-9 in turn; "
                                          "an explicit --guidance > 0 is refused with it (guidance needs a label).")
@click.option("--data", type=PathArg(file_okay=False), default=None,
              help="MNIST folder (real test set, floor); else $DDPM_DATA or the cache folder.")
@click.option("--classifier", type=InputPath(dir_okay=False), default=None,
              help="Classifier weights [default: the shipped one].")
@click.option("--train-classifier", is_flag=True, help="Retrain the classifier (3 epochs) and use it.")
@click.option("--json", "json_out", type=PathArg(dir_okay=False), default=None,
              help="Also write the results here (JSON; missing folders are created).")
@sampling_options()
def eval_cmd(sample_files, num, uncond, data, classifier, train_classifier, json_out, **o):
    """Measure sample quality with an MNIST classifier.

    Frechet distance of the classifier's penultimate features to the real test set, beside the floor (N real
    training images, same N), accuracy of class-conditional samples, class histogram of unconditional ones, and
    the Inception Score of the classifier's predictions beside real digits' at the same N.

    \b
    Examples:
      ddpm eval -n 10000                                    # the default model, UniPC-8, guidance 0.45 in an interval
      ddpm gen -n 2000 --sampler ddpm --out ddpm.npz && ddpm eval --samples ddpm.npz
      ddpm eval --samples a.npz --samples b.npz --json quality.json
    """
    if sample_files:   # the files are scored as they are: the options that make samples do not apply to them
        ctx = click.get_current_context()
        unused = [max(p.opts, key=len) for p in ctx.command.params if p.name not in _SCORING and p.name != "num"
                  and on_command_line(p.name)] + (["-n"] if on_command_line("num") else [])
        if unused:
            raise click.UsageError(f"{', '.join(unused)} {'makes' if len(unused) == 1 else 'make'} the samples that "
                                   f"eval generates, and --samples are scored as they are: leave "
                                   f"{'it' if len(unused) == 1 else 'them'} out, or leave out --samples")
    sampling(o, labelled=not uncond)   # contradicting options refused before any work
    refuse_same_path({"--json": json_out}, {"--samples": sample_files, "--data": data, "--classifier": classifier,
                                            "--ckpt": o["ckpt"], "--export": o["export_dir"]})
    if json_out:
        check_output(json_out, "--json")
    needs_torch("eval (its MNIST classifier)")
    import json

    from . import evaluation, pipeline
    from .files import write_text
    from .samples import read_samples

    samples = [(name, *read_samples(f, evaluation.IMAGE_SHAPE))   # every file checked before the slow parts
               for name, f in zip(sample_names(sample_files), sample_files)]
    for f, (_, images, _) in zip(sample_files, samples):   # as -n: the scores need two samples
        if len(images) < 2:
            raise click.BadParameter(f"{shown(f)} holds {len(images)} sample{'s' if len(images) != 1 else ''}; the scores "
                                     f"need at least 2", param_hint="--samples")
    if not sample_files:
        evaluation.check_count(num)   # the limit of --samples and ddpm.evaluate, before anything is generated
        model, opts, log = prepare(o, recorded=True, labelled=not uncond)
        evaluation.check_model_shape(model.image_shape)
        uncond = pipeline.eval_uncond(model, uncond, opts, {name for name in o if on_command_line(name)}, cli=True,
                                      log=lambda line: click.echo(line, err=True))
    set_threads(o["threads"])

    made = {"precision": None, "engine": None, "seed": None}   # how the samples were made; unknown for --samples

    def generated():   # drawn once the classifier and the data are ready
        plan = model.plan(**opts.plan_args())
        job = pipeline.Job.of(model, num, plan, None, uncond, opts)
        images = pipeline.generate(model, opts, job, progress=not o["quiet"], log=log)
        eng = pipeline.engine(model, opts, plan, job.guided)   # the one that ran (the Model keeps its engines)
        made.update(precision=getattr(eng, "precision", "fp32"), engine=eng.name, seed=opts.seed)
        precision = "" if made["precision"] == "fp32" else f" {made['precision']}"
        yield (f"{plan.name} " + ("uncond" if uncond else f"w={opts.guidance:g}") + precision, images,
               job.labels(0, num))

    rows = evaluation.evaluate_sets(samples or generated(), data, classifier, train_classifier,
                                    progress=not o["quiet"], log=click.echo)
    rows = [{"name": r["name"], **made, **r} for r in rows]
    if json_out:   # first: the scores are kept whatever happens to standard output
        write_text(json_out, json.dumps(rows, indent=2) + "\n")
    click.echo(evaluation.format_table(rows))
    if json_out:
        click.echo(f"Wrote {len(rows)} rows of scores to {shown(json_out)}")


# ---------------------------------------------------------------------------------------------------------- export
def _batch_range(ctx, param, value):
    try:
        lo, hi = (int(v) for v in value.split("-"))
    except ValueError:
        lo, hi = 0, 0
    if not 1 <= lo <= hi:
        raise click.BadParameter("MIN-MAX with 1 <= MIN <= MAX, e.g. 1-256")
    return lo, hi


@click.command("export")
@model_option
@click.option("--out", type=PathArg(file_okay=False), default=None,
              help="Export folder [default: ~/.cache/ddpm/exports/<weights hash>, where gen/bench look]. An export "
                   "folder of the same weights keeps what it holds (fp16 model, generators, TensorRT engines, your own "
                   "files); one of other weights is replaced only if it holds nothing but ddpm export's files.")
@click.option("--fp16", is_flag=True, help="Also write a half-precision model (model_fp16.onnx).")
@click.option("--int8", is_flag=True,
              help="Also write an int8 model (model_int8.onnx, for the CPU) calibrated on MNIST training digits "
                   "noised to the timesteps of the plan gen samples the model with by default (UniPC-8 trailing, or "
                   "the plan a distilled student records; whatever --sampler and --steps say), its most sensitive convolutions kept fp32, verified against model.onnx (docs/int8.md).")
@click.option("--data", type=PathArg(file_okay=False), default=None,
              help="MNIST folder for --int8's calibration; else $DDPM_DATA or the cache folder (downloaded there "
                   "when missing, as `ddpm train` does).")
@click.option("--opset", type=click.IntRange(17, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--trt", "build_trt", is_flag=True, help="Also build TensorRT engine(s) (needs TensorRT and a GPU).")
@click.option("--batch", "batch_range", default="1-256", show_default=True, callback=_batch_range,
              help="TensorRT batch range MIN-MAX (one optimisation profile).")
# the generator: the whole reverse loop in one ONNX model, and the web page around it
@click.option("--generator", "with_generator", is_flag=True,
              help="Also write a generator: the whole loop of a deterministic sampler in one ONNX model (x_T, labels, "
                   "guidance -> uint8 images), verified against the runtime, beside those of other plans.")
@solver_options(DEFAULT, "The generator's steps (--generator, --web) [default: the sampler's, as in gen]; --int8 "
                          "calibrates at the timesteps of gen's default plan for the model whatever these say.")
@click.option("--form", type=click.Choice(FORMS), default=FORMS[0], show_default=True,
              help="The generator as one ONNX Loop over the rows, or the rows unrolled (the same speed on a CPU; "
                   "unrolled is 1.8x bigger and loads about 90x slower: README).")
@click.option("--web", "web_dir", type=PathArg(file_okay=False), default=None,
              help="Also write a static page into this folder that generates digits in the browser "
                   "(implies --generator; fetches onnxruntime-web with npm once).")
@click.option("--ort-web", "ort_web", type=InputPath(dir_okay=False), default=None,
              help="The onnxruntime-web tarball (`npm pack onnxruntime-web@VERSION`) instead of fetching it.")
# another format
@click.option("--diffusers", "diffusers_dir", type=PathArg(file_okay=False), default=None,
              help="Instead of the ONNX export: write the model as a diffusers DDPMPipeline folder (UNet2DModel + "
                   "DDPMScheduler), checked with diffusers when installed; needs a model trained with --block "
                   "diffusers (docs/diffusers.md).")
def export_cmd(ckpt, out, fp16, int8, data, opset, build_trt, batch_range, with_generator, sampler, steps, spacing,
               guidance_interval, guidance_rescale, form, web_dir, ort_web, diffusers_dir):
    """Export the EMA noise predictor to ONNX (and TensorRT), verified against PyTorch.

    Inputs x (B,C,H,W), t (B,) and y (B,) are graph inputs with a dynamic batch; output eps. Beside the model,
    export.json holds the checkpoint hash, config and schedule tables, so a runtime needs only the folder.
    --generator adds the whole reverse loop of one deterministic plan (--sampler, --steps), and --web a page that
    runs it in a browser.

    \b
    Examples:
      ddpm export --fp16
      ddpm export --int8                                  # then: ddpm gen --int8
      ddpm export --ckpt runs/ddpm --out exports/mine --fp16 --trt --batch 1-64
      ddpm export --generator --steps 20                  # UniPC-20 in one ONNX call
      ddpm export --web site && python -m http.server -b 127.0.0.1 -d site   # open http://127.0.0.1:8000
      ddpm export --ckpt runs/mine --diffusers mine-diffusers   # a model trained with --block diffusers
    """
    if diffusers_dir:
        _export_diffusers(ckpt, diffusers_dir)
        return
    _refuse_unused(with_generator or web_dir, build_trt, int8, web_dir)
    refuse_same_path({"--out": out, "--web": web_dir}, {"--ckpt": ckpt, "--data": data, "--ort-web": ort_web},
                     folders=("--out", "--web"))
    for folder, option in ((out, "--out"), (web_dir, "--web")):
        if folder:
            check_output(folder, option, folder=True)
    if web_dir and int8:
        from .export.web import INT8_REFUSAL

        raise click.UsageError(INT8_REFUSAL)
    needs_torch("export")
    from . import api
    from .export.chain import check_trt, claim_outputs, export_folder, write_web_page
    from .model.io import default_model_path, read_model_info

    echo, stdout_failed = _echo_keeping_going()
    if build_trt:   # fail before the ONNX work if TensorRT cannot run here
        check_trt()
    model = api.load(ckpt)
    if with_generator or web_dir:   # a model whose pictures the generator cannot write: before any work
        from .export.generator import check_image_shape

        check_image_shape(model.image_shape, page=bool(web_dir))
    claim_outputs(model, out, web_dir)   # before any work: a folder that may not be replaced is refused
    if web_dir:   # and onnxruntime-web: the given tarball checked, else the cached one, else fetched with npm
        from .export import web

        ort_web = web.ort_web_tarball(ort_web, log=echo)
    calibration = _int8_data(data, model.image_shape) if int8 else None
    # gen's defaults (eta 0, the default guidance interval; a student's recorded plan for the options not given), so
    # that the generator gives gen's digits
    opts = Sampling.of(dict(sampler=sampler, steps=steps, spacing=spacing, guidance_interval=guidance_interval,
                            guidance_rescale=guidance_rescale), {n for n in _SHAPES[0][0] if on_command_line(n)},
                       cli=True, record=model.recorded)
    plan = model.plan(**opts.plan_args()) if with_generator or web_dir else None
    bundle = export_folder(model, out, fp16, opset, plan, form, batch_range if build_trt else None, log=echo,
                           int8=calibration, guidance=opts.guidance)
    for precision, f in bundle.meta["files"].items():
        echo(f"{precision}: {bundle.root / f['name']} ({f['bytes'] / 1e6:.2f} MB)")
    if plan is not None:
        from .runtime.runner import plan_key

        for precision in ("fp32", "int8") if int8 else ("fp32",):
            gen = bundle.generator(plan_key(plan), form, precision)
            echo(f"generator{'' if precision == 'fp32' else ' ' + precision}: {bundle.root / gen['name']} "
                 f"({gen['bytes'] / 1e6:.2f} MB, {gen['plan']}, {form})")
    echo(f"export folder: {bundle.root}")
    if web_dir:
        shown = plan_flags(opts, plan.steps)
        if bundle.meta["checkpoint_hash"] != read_model_info(default_model_path())[1]:
            # `ddpm gen` without --ckpt/--export runs the shipped model: the page's command names an export folder
            # of these weights as DIR, which the page explains by their hash; a published page holds no local path
            shown += " --export DIR"
        page = write_web_page(bundle, web_dir, plan, shown, ort_web, log=echo, guidance=opts.guidance)
        echo(f"web page: {page} (serve it, e.g. `python -m http.server -b 127.0.0.1 -d {page}`, and open "
             f"http://127.0.0.1:8000)")
    if stdout_failed:   # the folders are published: now the CLI's line for standard output
        raise stdout_failed[0]


# export's options that shape one artifact only, and the options that write it: given without them they shape nothing
_SHAPES = (
    (("sampler", "steps", "spacing", "guidance_interval", "guidance_rescale", "form"), "the generator",
     "--generator or --web"),
    (("batch_range",), "the TensorRT engines", "--trt"),
    (("ort_web",), "the web page", "--web"),
    (("data",), "the int8 model's calibration", "--int8"),
)


def _refuse_unused(generator: bool, trt: bool, int8: bool, web: bool) -> None:
    """A usage error for options of `ddpm export` given without the option whose artifact they shape (_SHAPES): they
    would be silently ignored. The generator's plan options say that --int8 calibrates at the timesteps of gen's
    default plan for the model (a student's recorded one) whatever they say."""
    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    made = {"--generator or --web": generator, "--trt": trt, "--web": web, "--int8": int8}
    for names, what, needs in _SHAPES:
        given = [flags[n] for n in names if on_command_line(n)]
        if given and not made[needs]:
            from .options import DEFAULT_SAMPLER
            from .runtime.samplers import DEFAULT_SOLVER_STEPS

            plural = len(given) > 1
            note = (f"; --int8 calibrates at the timesteps of gen's default plan ({DEFAULT_SAMPLER}, "
                    f"{DEFAULT_SOLVER_STEPS} steps; a distilled student's recorded plan) whatever they say" if what == "the generator" and int8 else "")
            raise click.UsageError(f"{', '.join(given)} shape{'' if plural else 's'} {what} only, which needs "
                                   f"{needs}: without it nothing uses {'them' if plural else 'it'}{note}; add "
                                   f"{needs.split(' or ')[0]}, or leave {'them' if plural else 'it'} out")


def _echo_keeping_going():
    """(echo, failed): click.echo for a command that builds outputs, and the list that holds the first failed write
    to standard output (errors.StdoutFailed: `> /dev/full`). After one, echo prints nothing more and the work goes
    on, so that what it builds is published; the caller raises failed[0] at its end for the CLI's line
    ("cannot write to standard output"). Any other error is raised at once."""
    from .errors import StdoutFailed, printable

    failed = []

    def echo(line) -> None:
        if failed:
            return
        try:
            click.echo(printable(line))   # one line, a path in it shown as it is (errors.shown)
        except StdoutFailed as e:
            failed.append(e)

    return echo, failed


def _export_diffusers(ckpt, folder) -> None:
    """`ddpm export --diffusers FOLDER` (export/diffusers.py): refused with any of the ONNX export's options."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name not in ("ckpt", "diffusers_dir")
             and on_command_line(p.name)]
    if given:
        raise click.UsageError(f"--diffusers writes a diffusers folder only, without the ONNX export's "
                               f"{', '.join(given)}; run `ddpm export` twice")
    refuse_same_path({"--diffusers": folder}, {"--ckpt": ckpt}, folders=("--diffusers",))
    check_output(folder, "--diffusers", folder=True)
    needs_torch("export")
    from . import api
    from .export.diffusers import check_exportable, export_diffusers

    model = api.load(ckpt)
    check_exportable(model.cfg)
    res = export_diffusers(model, folder, log=click.echo)
    click.echo(f"diffusers folder: {shown(res.out)} (UNet2DModel.from_pretrained of its unet/ takes class_labels "
               f"0..{model.cfg.num_classes - 1}, {model.null_label} for no label; docs/diffusers.md)")


def _int8_data(data, image_shape) -> tuple:
    """(images, labels, name) of the MNIST training split that --int8 calibrates on: --data, else $DDPM_DATA, else
    the cache folder, downloaded there when missing (train.data, as `ddpm train`)."""
    from .train.data import ensure_mnist, load_mnist, resolve_data_dir

    if tuple(image_shape) != (1, 28, 28):
        raise click.UsageError(f"--int8 calibrates on MNIST digits (1, 28, 28); this model's images are "
                               f"{tuple(image_shape)}")
    folder = ensure_mnist(resolve_data_dir(data), progress=lambda m: click.echo(m, err=True), splits=("train",))
    images, labels = load_mnist(folder, "train")
    return images, labels, "MNIST train"


# ----------------------------------------------------------------------------------------------------------- bench
def _batch_list(ctx, param, value):
    """--batch 1,8,64 -> [1, 8, 64]: distinct positive integers (cli_options.comma_list)."""
    def positive(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"{n} is not positive")
        return n

    return comma_list(value, positive, "a comma-separated list of distinct positive integers, e.g. 1,8,64")


def _engine_list(ctx, param, value):
    """--engines torch,onnx -> ["torch", "onnx"]: distinct names of ENGINES (cli_options.comma_list)."""
    def engine(v: str) -> str:
        if v not in ENGINES:
            raise ValueError(f"unknown engine {v!r}")
        return v

    return comma_list(value, engine, f"distinct engines, comma-separated, of {', '.join(ENGINES)}")


@click.command()
@click.option("--engines", "names", default=",".join(ENGINES), show_default=True, callback=_engine_list,
              help="Comma-separated engines, each once; unavailable ones are reported as skipped. onnx-generator (the "
                   "whole loop in one ONNX call) is built for the benchmark's plan in the cache export folder.")
@click.option("--batch", "batches", default="1,8,64", show_default=True, callback=_batch_list,
              help="Comma-separated batch sizes, each once.")
@solver_options(DEFAULT, f"Network calls per sample [default: {DEFAULT_STEPS_HELP}].")
@click.option("--guidance", "-w", type=Finite(0, MAX_GUIDANCE), default=DEFAULT.guidance, show_default=True,
              help="Classifier-free guidance (doubles the network batch when > 0).")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per engine and batch.")
@click.option("--fp16", is_flag=True, help="Half-precision models for the runtime engines (eager stays fp32).")
@click.option("--int8", is_flag=True, help="Also time the onnx engine and onnx-generator with int8 convolutions "
                                           "(`ddpm export --int8 [--generator]`), as 'onnx int8' beside fp32's onnx "
                                           "and 'onnx-generator int8' beside onnx-generator.")
@click.option("--no-cuda-graph", is_flag=True, help="GPU: run the runtime's loop step by step.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also time eager PyTorch on DDIM-50 and give every engine's speedup over it (when the sampler is "
                   "not DDIM-50 itself).")
@click.option("--quick", is_flag=True,
              help="A smoke test: 3 steps of the sampler (ddim for ddpm), batch 1,2, 2 runs, DDIM-3 as the baseline.")
@model_option
@click.option("--device", default="auto", show_default=True, callback=device_syntax, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help=f"CPU threads, torch and onnxruntime alike (1..{MAX_THREADS}).")
@click.option("--out", type=PathArg(file_okay=False), default="bench-out", show_default=True,
              help="Folder for bench.json, bench.md and bench.png.")
def bench(names, batches, sampler, steps, spacing, guidance_interval, guidance_rescale, guidance, repeat, fp16,
          int8, no_cuda_graph, baseline, quick, ckpt, device, threads, out):
    """Time every engine against eager PyTorch on the same work, in one run.

    \b
    Examples:
      ddpm bench                                     # UniPC-8, batch 1,8,64, all engines
      ddpm bench --sampler ddpm --batch 1,64 --repeat 2
      ddpm bench --engines torch,onnx --fp16 --out bench-fp16
      ddpm bench --engines onnx,onnx-generator --batch 1,8  # the step loop against the one-call generator
    """
    from pathlib import Path

    from . import api
    from .bench.speed import format_table, output_files, run_bench, write_outputs
    from .runtime.engines import resolve_device

    refuse_same_path({"--out": out}, {"--ckpt": ckpt}, folders=("--out",))
    check_output(out, "--out", folder=True)
    for path in output_files(Path(out)):   # and each file it writes there: nothing is written when one cannot be
        check_output(path, "--out")
    if quick:
        given = [opt for opt, param in (("--batch", "batches"), ("--steps", "steps"), ("--repeat", "repeat"))
                 if on_command_line(param)]
        if given:
            raise click.UsageError(f"--quick sets --batch 1,2, --steps 3 and --repeat 2 itself; leave out "
                                   f"{' and '.join(given)}, or drop --quick")
        sampler = "ddim" if sampler == "ddpm" else sampler
        steps, batches, repeat = 3, [1, 2], 2
    if int8 and not {"onnx", "onnx-generator"} & set(names):
        raise click.UsageError("--int8 runs the onnx engine (and onnx-generator) with int8 convolutions; add onnx to "
                               "--engines, or leave out --int8")
    if int8 and fp16:   # the same refusal as gen's and the editing commands' (options.precision_refusal)
        raise click.UsageError(precision_refusal(None, "cpu", fp16, int8))
    set_threads(threads)
    model = api.load(ckpt)
    if int8:   # asked for, so not merely a skipped engine: its model is made by `ddpm export --int8` only
        model.bundle(int8=True)
    # a student's recorded plan for the options not given (--quick gives its steps itself)
    opts = Sampling.of(dict(sampler=sampler, steps=steps, spacing=spacing, guidance=guidance,
                            guidance_interval=guidance_interval, guidance_rescale=guidance_rescale),
                       {n for n in ("sampler", "steps", "spacing", "guidance", "guidance_interval",
                                    "guidance_rescale") if on_command_line(n)} | ({"steps"} if quick else set()),
                       cli=True, record=model.recorded)
    plan = model.plan(**opts.plan_args())
    ref = model.plan("ddim", 3 if quick else None, guidance_interval=None) if baseline else None
    if ref is not None and plan.name == ref.name:
        ref = None   # the sampler is the baseline itself
    device = resolve_device(device)   # OptionError naming --device (cli.Group)
    res = run_bench(model, names, batches, plan, guidance=opts.guidance, repeat=repeat, fp16=fp16, device=device,
                    cuda_graph=not no_cuda_graph, threads=threads, log=lambda m: click.echo(m, err=True),
                    baseline=ref, int8=int8)
    click.echo(format_table(res))
    files = write_outputs(res, Path(out))
    click.echo("wrote " + ", ".join(map(shown, files)) + ("" if len(files) == 3 else " (no plot: pip install 'ddpm[plot]')"))
