"""One job pipeline for every command and the API: model -> plan -> engine -> batches over a sample range -> writer.

    job = Job.of(model, n, plan, label, uncond, opts)         # guided when opts has a guidance scale and a label
    images = generate(model, opts, job)                       # (n, H, W) uint8 (colour: (n, H, W, C)), the API's way
    with run(model, opts, job, progress=True) as r:           # the CLI's way: under torchrun each process draws its
        if r.batches is not None:                             # share; r.batches on the first process are all n
            save(out, r.batches, job.labels, job.n, job.image_shape)

A job is what to draw (n samples of a plan, their labels, an edit's known image: runtime.edits); `opts`
(options.Sampling) says how (noise stream, batch, engine, device). Sample k's noise depends only on (seed, k)
(runtime.noise), so the shards of several processes together are exactly the samples of one.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import OptionError
from .options import Sampling
from .runtime.generate import network_batch, whole_loop_refusal
from .runtime.images import check_channels, picture_shape

# the engines that run a whole plan in one call: no per-row projection (edits), no per-row states (--trajectory)
WHOLE_LOOP_ENGINES = ("onnx-generator",)


@dataclass
class Job:
    """n samples of `plan`: labels(lo, hi) gives the labels of the job's samples lo..hi-1 (0: its first; (hi - lo,)
    int64, -1 for unconditional ones); guided: whether the network runs the guided batch
    (runtime.generate.network_batch); edit: an edit's projection and inputs (runtime.edits.EditJob), None for plain
    generation; start: the first sample's index in the seed's stream; image_shape: the model's (C, H, W) (a
    keyword); reading: the classifier's read of an edit's input when its labels were read (runtime.classifier.Reading),
    else None."""

    n: int
    plan: object
    labels: Callable[[int, int], np.ndarray]
    guided: bool
    edit: object = None
    start: int = 0
    image_shape: tuple[int, int, int] = field(kw_only=True)
    reading: object = field(default=None, kw_only=True)

    @classmethod
    def of(cls, model, n: int, plan, label, uncond: bool, opts: Sampling, start: int = 0, edit=None) -> "Job":
        """n samples of `model` (api.Model) with these labels (checked now: Model.labels), from sample `start` on;
        guided when opts has a guidance scale and the samples are conditional. A label that is one class or None
        (the classes in turn) gives each batch its labels as it comes: nothing of size n is held.

        An edit (runtime.edits.EditJob) without a label: the unconditional model when uncond, or when the edit reads
        no label from its input (edit.reads None: SDEdit); else the labels the shipped classifier reads from
        edit.reads (read_edit_labels), kept as the job's `reading`, when the classifier's classes are the model's
        (reads_digits; else the unconditional model).

        Raises DdpmError for a model whose images are neither grey nor RGB (runtime.images.check_channels)."""
        check_channels(model.image_shape, "sampling it")
        if edit is not None and label is None:
            if uncond or edit.reads is None or not reads_digits(model):
                uncond = True
            else:
                return read_edit_labels(cls, model, n, plan, opts, start, edit)
        if label is None or np.ndim(label) == 0:
            model.labels(min(n, 1), label, uncond)
            # the classes in turn follow the sample's index in the seed's stream (start + lo), as its noise does:
            # sample k of a seed is the same digit whatever n and start
            labels = lambda lo, hi: model.labels(hi - lo, label, uncond, start=start + lo)
        else:
            y = model.labels(n, label, uncond)
            labels = lambda lo, hi: y[lo:hi]
        return cls(n, plan, labels, bool(opts.guidance) and not uncond, edit, start, image_shape=model.image_shape)


def eval_uncond(model, uncond: bool, opts: Sampling, given, cli: bool = False, log=None) -> bool:
    """Whether the samples of `model` that ddpm eval draws to score against MNIST's digit classes are drawn
    unconditionally: with uncond, and for a model without classes (num_classes 1), whose class 0 is not the digit 0,
    which log(line) then says. Raises OptionError (option "guidance", options.check_guidance) for a guidance scale
    given (in `given`) for such a model: its samples have no label to steer towards. cli: messages in the CLI's
    words."""
    from .options import check_guidance

    if uncond or model.cfg.num_classes != 1:
        return uncond
    check_guidance(opts.guidance, given, False, cli, classless=True)
    if log is not None:
        log("this model has no classes: its samples are drawn and scored unconditionally (class histogram), as "
            f"with {'--uncond' if cli else 'uncond=True'}")
    return True


def reads_digits(model) -> bool:
    """Whether the shipped MNIST classifier's classes are `model`'s labels, so that an edit may condition on what it
    reads: a network of this project (trained on MNIST only) making 1x28x28 images of 10 classes. A diffusers model,
    or one of another size or class count, is not read (its classes need not be digits)."""
    return model.cfg.network == "ddpm" and model.image_shape == (1, 28, 28) and model.cfg.num_classes == 10


def read_edit_labels(cls, model, n: int, plan, opts: Sampling, start: int, edit) -> Job:
    """The Job of an edit conditioned on what the classifier reads from its input pictures (edit.reads, (m, H, W)
    uint8, m = 1 or n; runtime.classifier.read_labels): each result gets its picture's class; a picture read with a
    top probability below runtime.classifier.MIN_PROB is ambiguous and its results use the unconditional model. When
    some pictures of a stack are ambiguous and others not, their results run in the guided batch conditioned on the
    null label, whose guided eps is the unconditional eps (eps_u + w (eps_u - eps_u)); Job.labels gives them the
    null label's index (model.null_label), the reading -1."""
    from .runtime.classifier import read_labels

    reading = read_labels(edit.reads)
    read = reading.labels if len(reading.labels) == n else np.repeat(reading.labels, n)
    if (read < 0).all():
        job = cls.of(model, n, plan, None, True, opts, start, edit)
    elif (read >= 0).all():
        job = cls.of(model, n, plan, int(read[0]) if len(reading.labels) == 1 else read, False, opts, start, edit)
    else:
        y = np.where(read < 0, model.null_label, read)
        job = cls(n, plan, lambda lo, hi: y[lo:hi], bool(opts.guidance), edit, start,
                  image_shape=model.image_shape)
    job.reading = reading
    return job


def labels(num_classes: int, n: int, label=None, uncond: bool = False, start: int = 0) -> np.ndarray:
    """(n,) int64 labels of samples start..start+n-1 (api.Model.labels): the classes in turn (label None: sample k
    gets k % num_classes), one class, or one per sample (a sequence); -1 everywhere when uncond. OptionError (option
    label or uncond) otherwise: the one check of a label against the model's classes, for the API and the CLI (whose
    --label is any integer >= 0 until the model is known); OptionError (option start) for samples past the seeded
    stream (runtime.noise.check_start, as generate checks them)."""
    from .options import check_conditioning
    from .runtime.generate import labels_for
    from .runtime.noise import check_start

    check_conditioning(label, uncond)
    check_start(start, n)
    if uncond:
        return labels_for(n, None, True)
    k = num_classes
    if label is None or np.ndim(label) == 0:
        if label is not None and not (isinstance(label, (int, np.integer)) and 0 <= label < k):
            raise OptionError(f"label must be one of this model's classes, an integer in 0..{k - 1}, got {label!r}",
                              "label")
        return labels_for(n, None if label is None else int(label), False, k, start)
    arr = np.asarray(label)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (arr.size and not 0 <= arr.min() <=
                                                                          arr.max() < k):
        raise OptionError(f"label must be a class in 0..{k - 1}, or {n} of them (one per result)", "label")
    return arr.astype(np.int64)


def plans(model, opts: Sampling):
    """top -> the options' plan for `model`, truncated to start at t = top (None: T - 1): what runtime.edits' job
    builders take."""
    return lambda top: model.plan(**opts.plan_args(), top=top)


class Edited(np.ndarray):
    """An edit's results, (n, H, W) uint8 (colour: (n, H, W, C); runtime.images) like any array, that say what they
    were conditioned on: labels (n,) int64, each result's class, -1 for the unconditional model; reading, the
    classifier's read of the input pictures (runtime.classifier.Reading: classes, probs, labels) when the labels
    were read from them, else None."""

    labels: np.ndarray | None = None
    reading: object = None

    def __array_finalize__(self, obj):
        self.labels, self.reading = getattr(obj, "labels", None), getattr(obj, "reading", None)


def edit(model, opts: Sampling, n: int, label, start: int, progress: bool, plan_and_edit,
         uncond: bool = False) -> Edited:
    """The API's edits: n results of (plan, runtime.edits.EditJob) (a job builder's); label None: the label the
    classifier reads from the input (Job.of), or the unconditional model when uncond or the edit reads none."""
    check_engine(opts.engine, edit=True)
    check_holding(n, model.image_shape)
    plan, edit_job = plan_and_edit
    job = Job.of(model, n, plan, label, uncond, opts, start, edit_job)
    out = generate(model, opts, job, progress).view(Edited)
    used = job.labels(0, n)
    out.labels, out.reading = np.where(used == model.null_label, -1, used), job.reading
    return out


def check_engine(engine, edit: bool = False, watch: bool = False) -> None:
    """OptionError, before an engine is made, when an engine that runs whole plans in one call is asked to project
    onto a known image (an edit: option "engine") or to show every row (a trajectory: option "trajectory", the
    CLI's): runtime.generate.whole_loop_refusal, which iter_generate raises for an engine object."""
    if isinstance(engine, str) and engine in WHOLE_LOOP_ENGINES and (edit or watch):
        raise whole_loop_refusal(engine, edit)


def open_engine(model, name: str, device: str, fp16: bool, cuda_graph: bool, threads: int | None, max_batch: int,
                plan=None, dist=None, log=None, int8: bool = False):
    """A new engine `name` (not auto) of `model` (api.Model) on `device` (resolved, not auto) with what it reads:
    the torch model for torch/runtime-torch (when PyTorch is installed, else make_engine names what is missing), the
    export folder for the others (export.cache.engine_bundle; dist, log: see there; int8: with the int8 model), and
    for trt the builder of a missing TensorRT engine file (export.trt: building is export's, the runtime only runs).
    Api.Model.engine keeps the engines it makes. Raises DdpmError (runtime.engines.make_engine's EngineUnavailable)."""
    from .export.cache import engine_bundle
    from .runtime.engines import have_torch, make_engine

    torch = name in ("torch", "runtime-torch") and have_torch()
    build_trt = None
    if name == "trt":
        from .export.trt import build_bundle_engine as build_trt
    made = make_engine(name, device=device, model=model.torch_model if torch else None, null_label=model.null_label,
                       bundle=engine_bundle(model, name, fp16, plan, dist, log, int8), fp16=fp16,
                       cuda_graph=cuda_graph, threads=threads, max_batch=max_batch, log=log or (lambda *_: None),
                       plan=plan, build_trt=build_trt, int8=int8)
    if getattr(made, "weights", None) is None:   # the torch engines and TensorRT's: the Model's own weights
        made.weights = model.hash
    return made


def check_engine_fits(model, engine) -> None:
    """OptionError (option "engine") unless the engine object given to `model` (api.Model) runs this model: the same
    weights where the engine knows them (runtime.engine.Engine.weights), its images' shape and its null label.
    Another model's engine would draw that model's digits under this one's name."""
    from .errors import OptionError

    from .runtime.engine import Supports

    weights = getattr(engine, "weights", None)
    name = getattr(engine, "name", type(engine).__name__)
    if not isinstance(getattr(engine, "supports", None), Supports):
        raise OptionError(f"the engine given (engine=) says what it can do with a {type(engine.supports).__name__}, "
                          f"not a runtime.engine.Supports: give an engine of model.engine(...) or a name", "engine")
    if isinstance(weights, str) and weights != model.hash:
        raise OptionError(f"the engine given (engine=) runs other weights (sha256 {weights[:12]}) than this "
                          f"model's ({model.hash[:12]}): take it from this model (model.engine({name!r}, ...)) or "
                          f"pass its name (engine={name!r})", "engine")
    for what, want in (("image_shape", tuple(model.image_shape)), ("null_label", model.null_label)):
        has = getattr(engine, what, None)
        if has is not None and (tuple(has) if what == "image_shape" else has) != want:
            raise OptionError(f"the engine given (engine=) has {what} {has}, this model {want}: it runs another "
                              f"model; take it from this model (model.engine({name!r}, ...))", "engine")


def engine(model, opts: Sampling, plan, guided: bool, dist=None, log=None):
    """The engine of opts.engine (a name: made once per Model, api.Model.engine, held by a JobEngine, which outlives
    the Model's close(); an engine object: itself), sized for the network batch of opts.batch."""
    if not isinstance(opts.engine, str):
        check_engine_fits(model, opts.engine)
        return opts.engine
    return JobEngine(model, dict(name=opts.engine, device=opts.device, fp16=opts.fp16, cuda_graph=opts.cuda_graph,
                                 threads=opts.threads, max_batch=network_batch(opts.batch, guided), dist=dist,
                                 log=log, plan=plan, int8=opts.int8))


class JobEngine:
    """The engine a Model's job runs on (engine): every attribute is that of the engine `Model.engine` gives for
    its arguments, and `run` runs each batch under a use of the Model's engine (runtime.engine.EngineCache.use): the
    Model's close() closes that engine only when the batch ends, and the next batch runs on a new one."""

    def __init__(self, model, args: dict):
        self._model, self._args = model, args
        self._engine = model.engine(**args)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def run(self, *args, **kwargs):
        """Engine.run on the Model's engine of these arguments (a new one when it was closed)."""
        with self._model._engines.use(self._engine, lambda: self._model.engine(**self._args)) as eng:
            self._engine = eng
            return eng.run(*args, **kwargs)


def stream(eng, opts: Sampling, job: Job, lo: int = 0, hi: int | None = None, progress: bool = False,
           watch=None) -> Iterator[np.ndarray]:
    """Samples job.start + lo .. job.start + hi - 1 of the stream, batch by batch ((b, H, W) or (b, H, W, C) uint8;
    runtime.generate.iter_generate), as saved (runtime.edits.EditJob.finish)."""
    from .runtime.generate import iter_generate
    from .runtime.images import to_uint8

    hi = job.n if hi is None else hi
    edit = None if job.edit is None else job.edit.part(lo, hi)
    if job.plan is None:   # an edit that runs no row (SDEdit at strength 0): the input itself
        for a in range(0, hi - lo, opts.batch):
            yield to_uint8(edit.batch(a, min(hi - lo, a + opts.batch))[2])
        return
    parts = iter_generate(eng, hi - lo, job.plan, lambda a, b: job.labels(lo + a, lo + b), opts.guidance,
                          opts.seed, opts.batch, start=job.start + lo, progress=progress, image_shape=job.image_shape,
                          job=edit, watch=watch)
    a = 0
    for part in parts:
        yield part if edit is None else edit.finish(part, a, a + len(part))
        a += len(part)


def check_holding(n: int, image_shape: tuple[int, int, int]) -> None:
    """runtime.generate.OutOfMemory when n results of image_shape (C, H, W), uint8, would not fit in host memory:
    before anything is made per result (the labels an edit reads, the engine)."""
    from .runtime.generate import ensure_memory

    per = int(np.prod(image_shape))
    ensure_memory(n * per, f"holding {n} samples", "lower -n, or stream them into a file (`ddpm gen --out x.npz`)",
                  per_unit=per)


def generate(model, opts: Sampling, job: Job, progress: bool = False, log=None) -> np.ndarray:
    """All of a job's samples, (n, H, W) uint8 (colour: (n, H, W, C); runtime.images), in this process
    (runtime.generate.generate: refuses what would not fit in memory)."""
    check_holding(job.n, job.image_shape)
    eng = None if job.plan is None else engine(model, opts, job.plan, job.guided, log=log)
    out = np.empty((job.n, *picture_shape(job.image_shape)), dtype=np.uint8)
    lo = 0
    for part in stream(eng, opts, job, progress=progress):
        out[lo:lo + len(part)] = part
        lo += len(part)
    return out


class Local:
    """One process: the stand-in of train.dist.DistContext (no PyTorch needed)."""

    rank, world, device = 0, 1, None

    def barrier(self):
        pass

    def shard(self, n):
        return 0, n

    def gather(self, obj):
        return [obj]

    def teardown(self):
        pass


def processes(device: str = "auto"):
    """Under torchrun (WORLD_SIZE > 1: launch.launch, checked) the process group (train.dist.setup, needs
    PyTorch); else Local(). Raises launch.LaunchError for torchrun variables that do not fit."""
    from .launch import launch

    if launch().world > 1:
        from .model.io import require_torch

        require_torch("ddpm under torchrun")
        from .train import dist

        return dist.setup(device)
    return Local()


@dataclass
class Run:
    """A job in progress (`run`): the engine, the process group, and on the first process the batches of all the
    job's samples in order (None on the others); seconds: the time from the first batch to the last gathered;
    label: what ran, as the last line of gen and the editing commands says it (`ran`)."""

    engine: object
    ctx: object
    batches: Iterable[np.ndarray] | None
    started: float = field(default_factory=time.perf_counter)
    label: str = ""

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def ran(model, eng, plan) -> str:
    """What ran, for a line: the engine and its precision where not fp32 (runtime.engine.engine_label: "onnx",
    "onnx int8"), and for an int8 engine whose every network row of `plan` runs fp32 (runtime.engines.int8_fp32_rows:
    the rows at sigma <= 1 and the last network row; `gen --steps 1`, a restoration from sigma <= 0.95) that no int8
    row ran: "onnx int8, every row fp32 at this plan". plan None (an edit that runs no row): the engine's label."""
    from .runtime.engine import engine_label
    from .runtime.engines import int8_fp32_rows

    label = engine_label(eng)
    if plan is not None and getattr(eng, "precision", "fp32") == "int8" and \
            not (plan.calls_net & ~int8_fp32_rows(plan, model.schedule.alphas_cumprod)).any():
        label += ", every row fp32 at this plan"
    return label


@contextmanager
def run(model, opts: Sampling, job: Job, progress: bool = False, log=None, watch=None) -> Iterator[Run]:
    """Run a job across the processes of torchrun (one process otherwise): each its contiguous share of the samples,
    gathered on the first, whose `Run.batches` stream them in order (in one process: as they are made, so that a
    writer holds one batch at a time). watch: runtime.generate's per-row observer, for the first batch of the first
    process."""
    ctx = processes(opts.device)
    try:
        if ctx.world > 1:
            opts = replace(opts, device=str(ctx.device))
        eng = engine(model, opts, job.plan, job.guided, dist=ctx, log=log)
        lo, hi = ctx.shard(job.n)
        mine = stream(eng, opts, job, lo, hi, progress=progress and ctx.rank == 0,
                      watch=watch if ctx.rank == 0 else None)
        label = "" if eng is None else ran(model, eng, job.plan)
        if ctx.world == 1:
            yield Run(eng, ctx, mine, label=label)
        else:
            empty = np.empty((0, *picture_shape(job.image_shape)), np.uint8)
            parts = ctx.gather(np.concatenate([empty, *mine]))
            yield Run(eng, ctx, parts, label=label)
    finally:
        ctx.teardown()


def save(out, batches: Iterable[np.ndarray], labels, n: int, image_shape: tuple[int, int, int],
         nrow: int | None = None, shown: np.ndarray | None = None) -> None:
    """Write n pictures (batches of (b, H, W) or (b, H, W, C) uint8; labels(lo, hi) theirs; image_shape the model's
    (C, H, W))
    atomically: x.npz as a samples file (samples.save_samples, streamed; with `shown`, an edit's input, beside them
    as "input"), else a grid picture (runtime.images.save_grid; `shown` first)."""
    from .runtime.images import save_grid

    if str(out).lower().endswith(".npz"):
        if shown is None:
            from .samples import save_samples

            save_samples(out, labels, batches, image_shape=picture_shape(image_shape), n=n)
            return
        from .files import atomic_write

        images = np.concatenate(list(batches))

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=images, labels=labels(0, n), input=shown)
        atomic_write(out, write)
        return
    first = [] if shown is None else [shown[None]]
    save_grid(np.concatenate([*first, *batches]), out, nrow=nrow)
