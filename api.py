"""The Python API: load a model, generate digits, as numpy arrays. The `ddpm` command is a thin layer over it.

    import ddpm

    model = ddpm.load()                      # the shipped default model (or a checkpoint, run folder, export folder)
    images = model.generate(16, label=7)     # (16, 28, 28) uint8, white digits on black like MNIST
    images = model.generate(64, seed=3, guidance=1.0, engine="torch")
    filled = model.inpaint("digit.png", mask="bottom", n=8)            # RePaint: the bottom half regenerated
    edited = model.edit("digit.png", label=8, strength=0.6, n=8)       # SDEdit: the digit redrawn as an 8
    big = model.upscale(small_14x14, factor=2, n=8)                    # ILVR: 28x28 digits that downsample to it
    clean = model.restore("noisy.png", sigma=0.3, n=8)                 # Gaussian noise of std 0.3 removed

Sampling needs nothing but numpy and onnxruntime on a CPU (the `onnx` engine, the default there) when the model
comes with an ONNX export: the shipped default does, any other checkpoint is exported once into the cache, which
needs PyTorch (`pip install ".[torch]"` in the ddpm folder). Errors are `DdpmError` subclasses whose message is meant for a user.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arguments import OPTIONAL_COUNT, PLAN, checked
from .errors import DdpmError
from .model.config import ModelConfig
from .model.io import (CheckpointError, TorchMissing, default_model_path, read_model_info, require_onnx,
                       resolve_model_path)
from .runtime.bundle import META_FILE, Bundle, ExportError
from .runtime.nets import EngineUnavailable
from .schema import Str

# The recommended classifier-free guidance for the shipped model, applied only where the noise level
# sigma = sqrt((1-abar)/abar) is in (0.28, 5.42] (Kynkaanniemi et al. 2024's interval for EDM2). Measured with
# bench/sweep at N = 5000, two seeds (README "Samplers"): UniPC-8 with w = 0.45 in that interval gave FD / floor
# 1.95 (1.95-1.96) and 98.86% accuracy with 12 network images per digit, against 2.14 (2.11-2.17) and 98.87% with
# w = 0.3 on every step (16 images per digit).
GUIDANCE = 0.45
GUIDANCE_INTERVAL = (0.28, 5.42)
# ... and for class edits (SDEdit), where the input pulls towards its own class: at strength 0.6 the classifier
# agrees with the requested class for 92% of 100 test digits at w=0.3, 99% at w=1, 100% at w=3 (README "Editing").
EDIT_GUIDANCE = 1.0
# The fewest network calls that score as DDIM-50 did (bench/sweep, README "Samplers"): UniPC-2, 8 steps, trailing.
DEFAULT_SAMPLER = "unipc"
# The editing methods' sampler, as measured (README "Editing"): DDIM-50; RePaint needs its single-step rows, and
# ILVR and inpainting its stochastic ones (eta 1).
EDIT_SAMPLER = "ddim"


def default_export_dir() -> Path:
    """The verified ONNX export shipped with the default model."""
    return Path(__file__).resolve().parent / "assets" / "default_export"


def cache_dir() -> Path:
    """Where exports of checkpoints live unless told otherwise: $XDG_CACHE_HOME/ddpm (default ~/.cache/ddpm; the rule
    is locations.user_dir's)."""
    from .locations import cache_dir as user_cache

    return user_cache()


def _wrap(e: BaseException) -> DdpmError:
    return DdpmError(str(e))


@dataclass
class Model:
    """A diffusion model ready to sample: its config, the weights' identity and the ways to run it.

    Made by `load()`. `cfg` is the model config (ModelConfig: image size, classes, schedule, T). `hash` identifies
    the weights (sha256, model.io.weights_hash). `path` is the checkpoint file (None for an export folder alone);
    `export_dir` the export folder the onnx/trt engines read (None until needed; then the shipped one, the cached
    one, or one exported on first use).
    """

    cfg: ModelConfig
    hash: str
    path: Path | None
    export_dir: Path | None = None
    info: dict = field(default_factory=dict)
    _torch_model: object = field(default=None, repr=False)
    _engines: dict = field(default_factory=dict, repr=False)
    # guards the lazily made parts (the torch model, exports, generators, engines): a Model is shared by threads
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ------------------------------------------------------------------------------------------- what it runs on
    @property
    def null_label(self) -> int:
        """The reserved "no label" class index (unconditional sampling, classifier-free guidance)."""
        return self.cfg.null_label

    @property
    def torch_model(self):
        """The PyTorch UNet (CPU, fp32, eval mode), loaded on first use. Raises DdpmError without PyTorch or weights."""
        with self._lock:
            if self._torch_model is None:
                if self.path is None:
                    raise DdpmError("this model is an export folder only; the torch engines need its checkpoint "
                                    "(--ckpt)")
                from .model.io import load_model

                try:
                    self._torch_model = load_model(self.path).model
                except (CheckpointError, TorchMissing) as e:
                    raise _wrap(e) from None
            return self._torch_model

    @checked
    def bundle(self, fp16: bool = False) -> Bundle:
        """The export folder (runtime.bundle.Bundle) of these weights, exported into the cache on first use (needs
        PyTorch). fp16: make sure it holds the fp16 model too. Raises DdpmError."""
        cache = cache_dir() / "exports" / self.hash[:16]
        missing = lambda root: not (root / META_FILE).is_file() or (fp16 and not (root / "model_fp16.onnx").is_file())
        with self._lock:   # one export per Model, whatever the threads
            root = self.export_dir or cache
            if missing(root) and self.path is not None and (self.export_dir is None or root == default_export_dir()):
                root = cache                      # the shipped export is fp32 only: an fp16 one goes to the cache
                if missing(root):
                    self._export(root, fp16)
            try:
                b = Bundle.load(root, expected_hash=None if self.path is None else self.hash)
            except ExportError as e:
                raise _wrap(e) from None
            self.export_dir = root
            return b

    def _export(self, root: Path, fp16: bool) -> None:
        from .model.io import require_torch

        try:
            require_torch("exporting this checkpoint to ONNX (once, for the onnx engine)")
        except TorchMissing as e:
            raise DdpmError(f"{e}; or pass an export folder made elsewhere with `ddpm export`") from None
        from .export.onnx_export import ExportFailed, export
        from .files import OutputError
        from .model.io import LoadedModel

        loaded = LoadedModel(self.torch_model, self.cfg, self.hash, self.path, self.info)
        try:
            # fp16 too: a later --fp16 needs no second export. replace=False: another process that exported the same
            # weights meanwhile (two first uses at once) wins, and nobody moves a folder that another one reads
            export(loaded, root, fp16=True, log=lambda *_: None, replace=False)
        except ExportFailed as e:
            raise DdpmError(f"export failed: {e}") from None
        except OutputError as e:   # the cache is not writable
            raise DdpmError(f"{e}; the first use of a checkpoint exports it to ONNX there: set $XDG_CACHE_HOME to a "
                            f"writable folder, pass an export folder (--export), or use --engine torch") from None

    @checked(plan=PLAN)
    def generator_bundle(self, plan, form: str = "loop", log=None) -> Bundle:
        """An export folder whose generator.onnx (export/generator.py) runs `plan`: the model's own when it has one
        for this plan, else a folder of the cache made for this plan and form,
        cache_dir()/generators/<weights>-<plan>-<form> (model.onnx, export.json, generator.onnx), built and verified
        on first use (needs the onnx package) and reused by every later call and process; one folder per plan, so
        that runs of several plans, in turn or at once, never rebuild each other's. log(line): where the build says
        what it does (None: nowhere). Raises DdpmError for a plan the generator cannot run, or an explicit export
        folder without one."""
        from .export.generator import GeneratorFailed, GeneratorUnsupported, check_plan
        from .runtime.runner import plan_key

        try:
            check_plan(plan)
        except GeneratorUnsupported as e:
            raise DdpmError(f"onnx-generator: {e}") from None
        key = plan_key(plan)
        with self._lock:
            b = self.bundle()
            if b.generator is not None and b.generator["plan_key"] == key:
                return b
            if b.root not in (cache_dir() / "exports" / self.hash[:16], default_export_dir()):
                what = f"a generator for {b.generator['plan']}" if b.generator else "no generator"
                raise DdpmError(f"{b.root} has {what}, not one for {plan.name}: run `ddpm export --out {b.root} "
                                f"--generator` with that sampler and --steps")
            folder = cache_dir() / "generators" / f"{self.hash[:16]}-{key[:16]}-{form}"
            expected = None if self.path is None else self.hash
            ready = _generator_folder(folder, key, expected)
            if ready is not None:
                return ready
            require_onnx(f"building generator.onnx for {plan.name}")
            log = log or (lambda *_: None)
            log(f"building generator.onnx for {plan.name} in {folder} (once)")
            try:
                _build_generator_folder(b, folder, plan, key, form, log)
            except GeneratorFailed as e:
                raise DdpmError(f"generator.onnx for {plan.name}: {e}") from None
            ready = _generator_folder(folder, key, expected)
            if ready is None:
                raise DdpmError(f"{folder} holds no usable generator for {plan.name} after building it; remove the "
                                f"folder and try again")
            return ready

    @checked
    def engine(self, name: str = "auto", device: str = "auto", fp16: bool = False, cuda_graph: bool = True,
               threads: int | None = None, max_batch: int = 512, dist=None, log=None, plan=None):
        """A runtime engine (runtime.engines), made once per (name, device, fp16, cuda_graph, threads) and reused.

        name: auto | torch | runtime-torch | onnx | trt | onnx-generator (auto: onnx on a CPU, runtime-torch on a
        GPU; onnx-generator needs the `plan` it will run). device: auto, cpu, cuda, cuda:N. dist: under torchrun,
        the process group context (rank, world, barrier()): rank 0 makes a missing export while the others wait, so
        that no rank reads a half-made folder. log(line): where one-time builds (a generator, a TensorRT engine) say
        what they do; None: nowhere. An engine may be shared by threads: calls at once give the digits of the same
        calls one after another. Raises DdpmError when the engine cannot run here (the message says what is
        missing).
        """
        from .runtime.engines import (ENGINES, NEEDS_EXPORT, NEEDS_TORCH, TORCH_HINT, auto_engine, have_torch,
                                      make_engine, resolve_device)
        from .runtime.runner import plan_key

        try:
            dev = resolve_device(device)
        except ValueError as e:
            raise _wrap(e) from None
        name = auto_engine(dev) if name == "auto" else name
        if name not in ENGINES:
            raise DdpmError(f"unknown engine {name!r}; engines: auto, {', '.join(ENGINES)}")
        if name in NEEDS_TORCH and not have_torch():
            raise DdpmError(f"the {name} engine needs PyTorch: {TORCH_HINT}")
        # a TensorRT engine serves a batch range: a larger batch than it was made for needs another one
        key = (name, dev, fp16, cuda_graph, threads, max_batch if name == "trt" else None)
        if name == "onnx-generator":
            if plan is None:
                raise DdpmError("the onnx-generator engine needs the plan it will run")
            key += (plan_key(plan),)
        prepare = (lambda: self.generator_bundle(plan, log=log)) if name == "onnx-generator" else (lambda: self.bundle(fp16))
        if name in NEEDS_EXPORT and dist is not None and dist.world > 1:
            if dist.rank == 0:
                prepare()
            dist.barrier()
        with self._lock:
            if key not in self._engines:
                bundle = prepare() if name in NEEDS_EXPORT else None
                model = self.torch_model if name in ("torch", "runtime-torch") else None
                try:
                    self._engines[key] = make_engine(name, dev, model, self.null_label, bundle, fp16, cuda_graph,
                                                     threads, max_batch, log=log or (lambda *_: None))
                except (EngineUnavailable, ExportError) as e:
                    raise _wrap(e) from None
            return self._engines[key]

    # ------------------------------------------------------------------------------------------------- sampling
    @property
    def schedule(self):
        """The model's diffusion schedule (runtime.schedule.Schedule)."""
        from .runtime.schedule import Schedule

        return Schedule.of(self.cfg)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    @checked
    def plan(self, sampler: str = DEFAULT_SAMPLER, steps: int | None = None, eta: float = 0.0,
             variance: str = "small", spacing: str | None = None, guidance_interval=GUIDANCE_INTERVAL,
             top: int | None = None):
        """The sampler's table (runtime.samplers.Plan) for this model's schedule: sampler ddpm | ddim | dpm++2m |
        unipc; steps None: the sampler's default (min(T, 50) for ddim, 8 for the solvers); spacing linspace |
        trailing | logsnr (None: the sampler's default); guidance_interval (lo, hi): guidance only where the noise
        level sigma = sqrt((1-abar)/abar) is in (lo, hi] (Kynkaanniemi et al. 2024; default GUIDANCE_INTERVAL), None: on every step; top: start at t = top, a plan
        truncated for editing (runtime.edits). Raises DdpmError for steps outside 1..T, DDPM with fewer than T
        steps, eta outside [0, 1], an unknown sampler or spacing."""
        from .runtime.samplers import make_plan

        T = self.cfg.timesteps
        if steps is not None and not 1 <= steps <= T:
            raise DdpmError(f"steps must be in 1..{T} (the model's T), got {steps}")
        if top is not None and not 0 <= top <= T - 1:
            raise DdpmError(f"top must be in 0..{T - 1} (the model's T - 1), got {top}")
        try:
            return make_plan(self.schedule, sampler, steps, eta, variance, spacing, guidance_interval, top)
        except ValueError as e:
            raise _wrap(e) from None

    @checked
    def labels(self, n: int, label=None, uncond: bool = False, start: int = 0) -> np.ndarray:
        """(n,) int64 labels of samples start..start+n-1: the classes 0..9 in turn (label None: sample k gets
        k % num_classes), one class (an int), or given per sample (a sequence); -1 everywhere when uncond. Raises
        DdpmError for labels outside 0..num_classes-1."""
        from .runtime.generate import labels_for

        if uncond:
            if label is not None:
                raise DdpmError("a label and uncond exclude each other")
            return labels_for(n, None, True)
        if label is None or np.ndim(label) == 0:
            if label is not None and not (isinstance(label, (int, np.integer)) and 0 <= label < self.cfg.num_classes):
                raise DdpmError(f"label must be an integer in 0..{self.cfg.num_classes - 1}, got {label!r}")
            return labels_for(n, None if label is None else int(label), False, self.cfg.num_classes, start)
        arr = np.asarray(label)
        if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or \
                (arr.size and (arr.min() < 0 or arr.max() >= self.cfg.num_classes)):
            raise DdpmError(f"labels must be {n} integers in 0..{self.cfg.num_classes - 1}")
        return arr.astype(np.int64)

    @checked
    def generate(self, n: int = 64, label=None, uncond: bool = False, guidance: float = GUIDANCE,
                 sampler: str = DEFAULT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
                 spacing: str | None = None, guidance_interval=GUIDANCE_INTERVAL, seed: int = 0, batch: int = 64,
                 engine="auto", device: str = "auto", fp16: bool = False,
                 start: int = 0, progress: bool = False, plan=None) -> np.ndarray:
        """n digits as (n, H, W) uint8 (0 black .. 255 white, MNIST's convention).

        label: None (classes 0..9 in turn), an int, or n ints. uncond: the unconditional model (no label).
        guidance: classifier-free guidance w >= 0, eps = eps_c + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6).
        sampler/steps/eta/variance/spacing/guidance_interval: see `plan` (plan: a ready Plan instead). seed: 0..2^64-1; sample k of a
        seed is the same digit whatever n, batch, engine or process (runtime.noise); start: the index of the first.
        engine: a name (see `engine`) or an engine `engine` returned. Raises DdpmError for bad arguments (every
        argument is checked against ddpm.arguments.ARGS) or an engine that cannot run here.
        """
        from .runtime.generate import generate

        labels = self.labels(n, label, uncond)
        plan = plan or self.plan(sampler, steps, eta, variance, spacing, guidance_interval)
        eng = self.engine(engine, device, fp16, max_batch=2 * batch if guidance and not uncond else batch,
                          plan=plan) if isinstance(engine, str) else engine
        try:
            return generate(eng, n, plan, labels, guidance, seed, batch, start=start, progress=progress,
                            image_shape=(self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size))
        except (ValueError, EngineUnavailable) as e:   # runners are built (and bound) on first use
            raise _wrap(e) from None


    # -------------------------------------------------------------------------------------------------- editing
    # Every edit is a plan plus, for some, a per-row projection onto the known image (runtime.edits), run by
    # runtime.generate like `generate`: the same seeded stream per sample (its projection noise after the plan's
    # own), any engine, any batch. A picture is a (H, W) uint8 array (white digit on black) or a picture file
    # (runtime.images.read_image), resized to what the edit needs: n results of it (default 8); or a stack (N, H, W)
    # of pictures: one result each, result k from picture k. label None: the unconditional model; labels may also
    # be given per result (n ints). The sampler arguments are `plan`'s; the default sampler is EDIT_SAMPLER (DDIM,
    # as measured), not generate's.

    @checked(n=OPTIONAL_COUNT)
    def inpaint(self, image, mask="bottom", n: int | None = None, label=None, guidance: float = GUIDANCE,
                sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 1.0, variance: str = "small",
                spacing: str | None = None, guidance_interval=None, jump: int = 1, resample: int = 3, seed: int = 0,
                batch: int = 64, engine="auto", device: str = "auto", fp16: bool = False, start: int = 0,
                progress: bool = False) -> np.ndarray:
        """RePaint (Lugmayr et al. 2022): n completions (n, H, W) uint8 of `image` where `mask` says what to redraw.

        mask: the half to redraw ("top", "bottom", "left", "right"), or a picture (file or (H, W) array of the
        image's size; for a stack also one per picture, (N, H, W)) whose white pixels (>= 128, or True) are kept.
        After every reverse row the kept pixels are replaced by the input noised to the row's level; after the last
        one they are the input's exactly. The reverse rows are
        the sampler's (default DDIM-50 with eta 1: stochastic, DDPM-like, as RePaint needs to harmonise; eta 0 gives
        deterministic rows). jump, resample: RePaint's jump length j (in rows of the sampler) and count r (r = 1: no
        resampling; j=1 r=3, the default, makes 148 network calls, about 3x a DDIM-50 generation; the paper's j=10
        r=10 on a 250-step schedule, steps=250, eta=1, jump=10, resample=10, makes 2410, about 48x). Raises
        DdpmError for bad arguments.
        """
        from .runtime.edits import EditJob, noised_projection, repaint_plan, to_model

        imgs, keep, n = self.inpaint_input(image, mask, n)
        plan = self.plan(sampler, steps, eta, variance, spacing, guidance_interval)
        try:
            plan = repaint_plan(plan, jump, resample)
        except ValueError as e:
            raise _wrap(e) from None
        job = EditJob(noised_projection(plan, "mask"), y=to_model(imgs)[:, None],
                      mask=keep.astype(np.float32)[:, None])
        return self._run_edit(n, plan, label, guidance, seed, batch, engine, device, fp16, start, progress, job)

    @checked(n=OPTIONAL_COUNT)
    def edit(self, image, label=None, strength: float = 0.6, n: int | None = None, guidance: float = EDIT_GUIDANCE,
             sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
             spacing: str | None = None, guidance_interval=None, seed: int = 0, batch: int = 64, engine="auto",
             device: str = "auto", fp16: bool = False, start: int = 0, progress: bool = False) -> np.ndarray:
        """SDEdit (Meng et al. 2022): n redrawings (n, H, W) uint8 of `image`, conditioned on `label`.

        The input is noised to t0 = round(strength (T-1)), x_t0 = sqrt(abar_t0) x + sqrt(1 - abar_t0) x_T, and the
        sampler's rows from t0 down denoise it (runtime.edits.sdedit_start; DDIM's grid points below t0, so about
        strength x steps rows). strength in [0, 1]: 0 returns the input unchanged, 1 ignores it (the same digits as
        `generate` with this seed and label). guidance: EDIT_GUIDANCE by default, stronger than generate's (the
        input pulls towards its own class). Raises DdpmError for bad arguments.
        """
        from .runtime.edits import EditJob, sdedit_start, to_model

        imgs, n = self._inputs(image, None, n)
        if strength == 0:
            self.labels(n, label, label is None)   # the arguments are checked all the same
            return np.array(np.broadcast_to(imgs, (n, *imgs.shape[1:])))
        t0, a0, s0 = sdedit_start(self.schedule, float(strength))
        plan = self.plan(sampler, steps, eta, variance, spacing, guidance_interval, top=t0)
        job = EditJob(x_input=to_model(imgs)[:, None], a0=a0, s0=s0)
        return self._run_edit(n, plan, label, guidance, seed, batch, engine, device, fp16, start, progress, job)

    @checked(n=OPTIONAL_COUNT)
    def upscale(self, image, factor: int = 2, n: int | None = None, label=None, method: str = "ilvr",
                guidance: float = GUIDANCE, sampler: str = EDIT_SAMPLER, steps: int | None = None,
                eta: float = 1.0, variance: str = "small", spacing: str | None = None, guidance_interval=None,
                seed: int = 0, batch: int = 64, engine="auto",
                device: str = "auto", fp16: bool = False, start: int = 0, progress: bool = False) -> np.ndarray:
        """Super-resolution: n full-size digits (n, H, W) uint8 whose f x f block means are the small `image`.

        image: (H/f, W/f) (a picture of another size is resized to it, box-averaged when shrinking). method
        "ilvr": ILVR (Choi et al. 2021) low-pass guidance of x at every row, x <- x + up(down(y_t) - down(x)) with
        y_t the input noised to the row's level; "ddnm": DDNM (Wang et al. 2023) range-null-space projection of
        x0_hat, x0_hat <- x0_hat + up(y - down(x0_hat)). Either way the last row makes down(x) = y in the model's
        range; the results are then the nearest pictures whose block means are the input within [0, 255]
        (runtime.edits.fit_blocks: clipping to the pixel range would move bright and dark blocks), rounded: every
        block mean is within 0.5 grey level of the input's pixel. factor: 2 or 4. Raises DdpmError for bad
        arguments.
        """
        from .runtime.edits import EditJob, fit_blocks, noised_projection, to_model, upsample, x0_projection

        H, W = self.image_shape[1:]
        small, n = self._inputs(image, (H // factor, W // factor), n)
        plan = self.plan(sampler, steps, eta, variance, spacing, guidance_interval)
        proj = noised_projection(plan, "lowpass", factor) if method == "ilvr" else x0_projection(plan, factor)
        job = EditJob(proj, y=upsample(to_model(small), factor)[:, None])
        out = self._run_edit(n, plan, label, guidance, seed, batch, engine, device, fp16, start, progress, job)
        return np.rint(fit_blocks(out, np.broadcast_to(small, (n, *small.shape[1:])), factor)).astype(np.uint8)

    @checked(n=OPTIONAL_COUNT)
    def restore(self, image, sigma: float, n: int | None = None, label=None, guidance: float = GUIDANCE,
                sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
                spacing: str | None = None, guidance_interval=None, seed: int = 0, batch: int = 64, engine="auto",
                device: str = "auto", fp16: bool = False, start: int = 0, progress: bool = False) -> np.ndarray:
        """Denoising: n restorations (n, H, W) uint8 of `image` = x + sigma n, n ~ N(0, I), sigma in the model's
        [-1, 1] units (a std of s grey levels is sigma = s / 127.5).

        The reverse process starts at the first t whose noise-to-signal ratio sqrt((1 - abar_t)/abar_t) reaches
        sigma, from x_t = sqrt(abar_t) y (+ x_T for the small variance still missing), which has exactly the law of
        q(x_t | x) (runtime.edits.noise_start), and the sampler's rows from there denoise it. A picture file's
        noise was clipped to [0, 255] and rounded, which this ignores. Raises DdpmError for bad arguments.
        """
        from .runtime.edits import EditJob, noise_start, to_model

        imgs, n = self._inputs(image, None, n)
        try:
            t, a0, s0 = noise_start(self.schedule, float(sigma))
        except ValueError as e:
            raise _wrap(e) from None
        plan = self.plan(sampler, steps, eta, variance, spacing, guidance_interval, top=t)
        job = EditJob(x_input=to_model(imgs)[:, None], a0=a0, s0=s0)
        return self._run_edit(n, plan, label, guidance, seed, batch, engine, device, fp16, start, progress, job)

    def _run_edit(self, n, plan, label, guidance, seed, batch, engine, device, fp16, start, progress, job):
        from .runtime.generate import generate

        labels = self.labels(n, label, label is None)
        eng = self.engine(engine, device, fp16, max_batch=2 * batch) if isinstance(engine, str) else engine
        try:
            return generate(eng, n, plan, labels, guidance, seed, batch, start=start, progress=progress,
                            image_shape=self.image_shape, job=job)
        except (ValueError, EngineUnavailable) as e:   # runners are built (and bound) on first use
            raise _wrap(e) from None

    @checked
    def picture(self, image, size: tuple[int, int] | None = None) -> np.ndarray:
        """A picture file or a (H, W) uint8 array, resized to size (default: the model's): (H', W') uint8.
        Raises DdpmError (runtime.images.read_image's message for files)."""
        return _fit(_read(image, "image"), size or self.image_shape[1:])

    def _inputs(self, image, size, n) -> tuple[np.ndarray, int]:
        """(pictures (m, H', W') uint8 at size (default: the model's), n): one picture (m = 1) with n results
        (default 8), or a stack (N, H, W) with one result per picture (n None or N). Raises DdpmError."""
        raw, n = self._raw(image, n)
        return np.stack([_fit(p, size or self.image_shape[1:]) for p in raw]), n

    @staticmethod
    def _raw(image, n) -> tuple[list[np.ndarray], int]:
        if isinstance(image, (str, os.PathLike)) or np.ndim(image) != 3:
            return [_read(image, "image")], 8 if n is None else n
        stack = np.asarray(image)
        if n not in (None, len(stack)):
            raise DdpmError(f"a stack of {len(stack)} pictures gives one result each: n must be {len(stack)}, got {n}")
        return [_read(p, "image") for p in stack], len(stack)

    @checked(n=OPTIONAL_COUNT)
    def inpaint_input(self, image, mask, n: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(pictures (m, H, W) uint8, known (m or 1, H, W) bool, n) at the model's size, from inpaint's picture(s)
        and mask: a half's name, or picture(s) of the image's size (before resizing) whose white pixels are kept."""
        from .runtime.edits import HALVES, half_mask

        size = self.image_shape[1:]
        raw, n = self._raw(image, n)                     # at the file's size: a mask picture must match it
        fitted = np.stack([_fit(p, size) for p in raw])
        if isinstance(mask, str) and mask in HALVES:
            if size[0] != size[1]:
                raise DdpmError("half masks need a square image")
            return fitted, half_mask(mask, size[0])[None], n
        if isinstance(mask, str) and not Path(mask).suffix:
            raise DdpmError(f"mask must be one of {', '.join(HALVES)} or a picture file, got {mask!r}")
        masks = [_read(mask, "mask", allow_bool=True)] if isinstance(mask, (str, os.PathLike)) or np.ndim(mask) != 3 \
            else [_read(m, "mask", allow_bool=True) for m in mask]
        if len(masks) not in (1, len(raw)):
            raise DdpmError(f"{len(masks)} masks for {len(raw)} pictures")
        for m in masks:
            if m.shape != raw[0].shape:
                raise DdpmError(f"the mask is {m.shape[1]}x{m.shape[0]} pixels and the image {raw[0].shape[1]}x"
                                f"{raw[0].shape[0]}: they must have the same size")
        return fitted, np.stack([_fit(m, size) >= 128 for m in masks]), n


def _read(image, what: str, allow_bool: bool = False) -> np.ndarray:
    """A picture file (path) or an array -> (H, W) uint8 (a bool mask array: True = 255). Raises DdpmError."""
    from .runtime.images import ImageError, read_image

    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(image)
        except ImageError as e:
            raise _wrap(e) from None
    a = np.asarray(image)
    if allow_bool and a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim != 2 or a.dtype != np.uint8 or min(a.shape) < 1:
        raise DdpmError(f"{what} must be a picture file or a (H, W) uint8 array, got {a.dtype} {a.shape}")
    return a


def _fit(image: np.ndarray, size) -> np.ndarray:
    from .runtime.images import fit

    return fit(image, tuple(size))


def _generator_folder(folder: Path, key: str, expected_hash: str | None) -> Bundle | None:
    """The generator folder of a plan (Model.generator_bundle) when it is complete and whole: its export.json, its
    model.onnx and its generator.onnx for this plan_key, checked against their sha256. None otherwise."""
    if not (folder / META_FILE).is_file():
        return None
    try:
        b = Bundle.load(folder, expected_hash=expected_hash)
        b.onnx_path("fp32")
        b.generator_path(key)
    except ExportError:
        return None   # damaged or of another version: built again
    return b


def _build_generator_folder(source: Bundle, folder: Path, plan, key: str, form: str, log) -> None:
    """Make `folder` a generator folder for `plan` (key: its plan_key): the fp32 model.onnx of `source` (hard-linked where possible),
    its export.json without fp16 or generator records, then export.generator.add_generator. Built in a temporary
    folder and published by one rename (files.publish_dir): a kill leaves no half folder, and of two processes
    building the same one the first to finish wins. Raises DdpmError (folder), GeneratorFailed (verification)."""
    import json
    import shutil

    from .export.generator import add_generator
    from .files import OutputError, publish_dir, temp_dir

    src = source.onnx_path("fp32")
    record = dict(source.meta["files"]["fp32"])
    meta = {k: v for k, v in source.meta.items() if k != "generator"}
    meta["files"] = {"fp32": record}
    try:
        tmp = temp_dir(folder)
        try:
            try:
                os.link(src, tmp / record["name"])
            except OSError:   # another file system, or links not allowed there
                shutil.copyfile(src, tmp / record["name"])
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
            add_generator(tmp, plan, GUIDANCE, form, log=log)
            publish_dir(tmp, folder, keep=lambda p: _generator_folder(p, key, None) is not None)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (OSError, OutputError, ExportError) as e:
        raise DdpmError(f"cannot build {folder}: {e}; set $XDG_CACHE_HOME to a writable folder, or make the "
                        f"generator with `ddpm export --generator` and pass that folder (--export)") from None



@checked
def load(path: str | os.PathLike | None = None, export: str | os.PathLike | None = None) -> Model:
    """A Model from a checkpoint (model.safetensors, ckpt.pt or a run folder), from an export folder (`ddpm export`;
    as `path` or `export`), or the shipped default model when both are None.

    With `path` and `export` both given, the export must have been made from that checkpoint (its hash is checked).
    Reading a model.safetensors or an export folder needs no PyTorch; a ckpt.pt does. Raises DdpmError.
    """
    try:
        if path is not None and Path(path).is_dir() and (Path(path) / META_FILE).is_file() and export is None:
            export, path = path, None
        if path is None and export is not None:
            b = Bundle.load(export)
            cfg = ModelConfig.from_dict(b.meta["model_config"]).validate()
            return Model(cfg, b.meta["checkpoint_hash"], None, Path(export), {"step": b.meta.get("step")})
        default = path is None
        cfg, h, info, file = read_model_info(default_model_path() if default else path)
        shipped = default_export_dir()
        export_dir = Path(export) if export is not None else (shipped if default and (shipped / META_FILE).is_file()
                                                             else None)
        model = Model(cfg, h, file, export_dir, info)
        if export is not None:
            model.bundle()      # checks now that the export belongs to these weights
        return model
    except (CheckpointError, TorchMissing, ExportError) as e:
        hint = " (the bundled default model is missing: reinstall the package)" if path is None and export is None \
            else ""
        raise DdpmError(f"{e}{hint}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise DdpmError(f"{export or path}: not a usable model ({type(e).__name__}: {e})") from None


@checked(name=Str())
def evaluate(images, labels, data: str | os.PathLike | None = None, name: str = "samples",
             download: bool = True) -> dict:
    """Quality figures of generated digits, as `ddpm eval` reports them (ddpm.evaluation).

    images: (N, 28, 28) uint8, 0 black .. 255 white (what `Model.generate` returns), N >= 2. labels: (N,) integers,
    the class each digit was drawn for, -1 for unconditional ones. data: the MNIST folder (default $DDPM_DATA, else
    ~/.cache/ddpm/mnist, downloaded when missing unless download=False). Returns a dict: fd (Frechet distance of the
    shipped classifier's 128-d features to the real test set's, Heusel et al. 2017's formula), fd_floor (the same for
    N real training images, mean of 5 draws; floor_min/floor_max their spread), fd_ratio, within_floor_spread,
    cond_accuracy (None without labelled digits), uncond_histogram / uncond_top_prob (None without unconditional
    ones), border_share. Needs PyTorch (the classifier). Raises DdpmError for bad arrays, missing data or no PyTorch.
    """
    from .model.io import require_torch

    try:
        require_torch("ddpm.evaluate")
    except TorchMissing as e:
        raise DdpmError(str(e)) from None
    from .evaluation import evaluate_sets

    return evaluate_sets([(name, images, labels)], data, download=download, log=None, keep=True)[0]
