"""The editing commands `ddpm inpaint`, `edit`, `upscale`, `restore`: their options, the job each builds
(runtime.edits' builders) and the pipeline run they share with `gen` (cli.py adds them to the `ddpm` group)."""

from __future__ import annotations

from dataclasses import replace

import click

from .cli_options import (Finite, InputPath, PathArg, add_options, check_output, done, prepare, refuse_same_path,
                          sampling_options)
from .options import EDIT_GUIDANCE, EDITING, MAX_SIGMA, Sampling
from .runtime.edits import FACTORS, HALVES, UPSCALERS


# --------------------------------------------------------------------------------------------------------- editing
def editing_command(name: str, out: str, defaults: Sampling = EDITING, image_help: str = "", reads: str = ""):
    """An editing command: the picture, how many results, the label, the output, and the sampling options with
    this command's defaults. reads: what the classifier reads the default label from ("": the default is the
    unconditional model, and there is no --uncond)."""
    label_help = (f"Class to condition on [default: the class the classifier reads from {reads}; the unconditional "
                  f"model when it is unsure]." if reads else "Class to condition on [default: none, the "
                                                             "unconditional model].")
    uncond = [click.option("--uncond", is_flag=True, help="The unconditional model (no label), not the label read "
                                                         "from the input.")] if reads else []
    return lambda f: click.command(name)(add_options(f, [
        click.option("--image", required=True, type=InputPath(dir_okay=False),
                     help="The picture: PNG or anything Pillow reads (greyscale, 16-bit, RGB, palette, or a digit "
                          "drawn in the alpha channel), a white digit on black like MNIST." + image_help),
        click.option("-n", "num", type=click.IntRange(min=1), default=8, show_default=True, help="Results."),
        click.option("--label", type=click.IntRange(min=0), default=None, help=label_help),
        *uncond,
        click.option("--out", type=PathArg(dir_okay=False), default=out, show_default=True,
                     help="x.png: a grid, the input first, then the results; x.npz: images (N,H,W) uint8, labels "
                          "(N,) (-1: unconditional) and the input."),
        sampling_options(defaults)]))


def _edit(o: dict, build, shown, what: str, detail: str, inputs: dict | None = None) -> None:
    """Run an editing command like `gen`: build(model, opts) -> (plan, runtime.edits.EditJob), shown(model) the
    input as saved first ((H, W) uint8); the grid or npz with the input first; one final line. inputs: the
    command's own input files besides --image ({option: path})."""
    from . import pipeline
    from .runtime.images import check_grid

    refuse_same_path({"--out": o["out"]}, {"--image": o["image"], "--ckpt": o["ckpt"], "--export": o["export_dir"],
                                           **(inputs or {})})
    check_output(o["out"], "--out", (".png", ".npz"))       # before any work (files.check_writable)
    if o["out"].lower().endswith(".png"):
        check_grid(o["num"] + 1)
    pipeline.check_engine(o["engine"], edit=True)
    uncond = o.get("uncond")   # None: a command whose default is the unconditional model (no --uncond)
    model, opts, log = prepare(o, labelled=o["label"] is not None or uncond is False)
    plan, edit = build(model, opts, lambda top: model.plan(**opts.plan_args(), top=top))
    tile, n = shown(model), o["num"]
    job = pipeline.Job.of(model, n, plan, o["label"], bool(uncond), opts, edit=edit)
    label = int(job.labels(0, 1)[0])
    with pipeline.run(model, opts, job, progress=not o["quiet"], log=log) as r:
        if r.ctx.rank == 0 and job.reading is not None and not o["quiet"]:
            click.echo(job.reading.describe(), err=True)
        elif r.ctx.rank == 0 and uncond is None and label < 0 and not o["quiet"]:
            click.echo("no --label: using the unconditional model", err=True)
        if r.batches is not None:
            pipeline.save(o["out"], r.batches, job.labels, n, model.image_shape, min(n + 1, 12), shown=tile)
    if r.ctx.rank == 0:
        cond = "unconditional" if label < 0 else f"label {label}, guidance {opts.guidance:g}"
        done(r, n, what, f"{detail.format(plan=plan.name if plan else 'no steps')}; {cond}", o["out"])


@editing_command("inpaint", "inpaint.png", replace(EDITING, eta=1.0))
@click.option("--mask", "mask_spec", default="bottom", show_default=True,
              help=f"What to redraw: {', '.join(HALVES)}, or a picture of the image's size whose white pixels are "
                   f"KEPT.")
@click.option("--jump-length", "jump", type=click.IntRange(min=1), default=1, show_default=True,
              help="RePaint jump length j: how many sampler steps each resampling jumps back.")
@click.option("--resample", type=click.IntRange(min=1), default=3, show_default=True,
              help="RePaint resampling count r: how often each jump point is passed (1: no resampling).")
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
    from .runtime.edits import inpaint_job
    from .runtime.images import grey_out

    def build(model, opts, plans):
        images, keep, _ = model.inpaint_input(o["image"], mask_spec, 1)
        return inpaint_job(plans, images, keep, jump, resample)

    def shown(model):
        images, keep, _ = model.inpaint_input(o["image"], mask_spec, 1)
        return grey_out(images[0], keep[0])   # the redrawn part greyed out
    _edit(o, build, shown, "completions", f"RePaint j={jump} r={resample} over {{plan}}",
          {"--mask": None if mask_spec in HALVES else mask_spec})


@editing_command("edit", "edit.png", replace(EDITING, guidance=EDIT_GUIDANCE))
@click.option("--strength", type=Finite(0, 1), default=0.6, show_default=True,
              help="How far the input is noised: 0 returns it unchanged, 1 ignores it.")
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
    from .runtime.edits import sdedit_job

    picture = lambda model: model.picture(o["image"])
    _edit(o, lambda model, opts, plans: sdedit_job(plans, model.schedule, picture(model)[None], strength), picture,
          "edits", f"SDEdit strength {strength:g}, {{plan}}")


@editing_command("upscale", "upscale.png", replace(EDITING, eta=1.0),
                 " A picture of another size is first resized to H/f x W/f (box-averaged when shrinking).",
                 reads="the small picture")
@click.option("--factor", type=click.Choice([str(f) for f in FACTORS]), required=True,
              help="Upscaling factor f: the input is the model's size / f (14x14 or 7x7 for 28x28 digits).")
@click.option("--method", type=click.Choice(UPSCALERS), default=UPSCALERS[0], show_default=True,
              help="ilvr: low-pass guidance of x at every step (Choi et al. 2021); ddnm: range-null-space projection "
                   "of the predicted x0 (Wang et al. 2023).")
def upscale(factor, method, **o):
    """Upscale a small digit to the model's size: every result's f x f block means are the input's pixels.

    \b
    Examples:
      ddpm upscale --image small14.png --factor 2 -n 8 --out big.png
      ddpm upscale --image tiny7.png --factor 4 --label 3 --method ddnm
    """
    from .runtime.edits import upscale_job
    from .runtime.images import enlarge

    f = int(factor)
    small = lambda model: model.picture(o["image"], tuple(s // f for s in model.image_shape[1:]))
    _edit(o, lambda model, opts, plans: upscale_job(plans, small(model)[None], f, method),
          lambda model: enlarge(small(model)[None], f)[0], "upscalings", f"{method.upper()} x{f}, {{plan}}")


@editing_command("restore", "restore.png")
@click.option("--sigma", type=Finite(0, MAX_SIGMA, min_open=True), required=True,
              help="Std of the Gaussian noise in the input, in [-1, 1] units (s grey levels: s/127.5).")
def restore(sigma, **o):
    """Remove Gaussian noise of a known std from a digit.

    The reverse process starts at the level where the model's noise equals the input's, from the scaled input.

    \b
    Examples:
      ddpm restore --image noisy.png --sigma 0.3 -n 4 --out clean.png
    """
    from .runtime.edits import restore_job

    picture = lambda model: model.picture(o["image"])
    _edit(o, lambda model, opts, plans: restore_job(plans, model.schedule, picture(model)[None], sigma), picture,
          "restorations", f"sigma {sigma:g}, {{plan}}")
