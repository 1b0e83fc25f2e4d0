"""The Python API: load a model, generate digits, as numpy arrays. The `ddpm` command is a thin layer over it.

    import ddpm

    model = ddpm.load()                      # the shipped default model (or a checkpoint, run folder, export folder)
    images = model.generate(16, label=7)     # (16, 28, 28) uint8, white digits on black like MNIST
    images = model.generate(64, seed=3, guidance=1.0, engine="torch")
    filled = model.inpaint("digit.png", mask="bottom", n=8)            # RePaint: the bottom half regenerated
    edited = model.edit("digit.png", label=8, strength=0.6, n=8)       # SDEdit: the digit redrawn as an 8
    big = model.upscale(small_14x14, factor=2, n=8)                    # ILVR: 28x28 digits that downsample to it
    clean = model.restore("noisy.png", sigma=0.3, n=8)                 # Gaussian noise of std 0.3 removed

Sampling needs numpy and onnxruntime on a CPU (the `onnx` engine, the default there) with an ONNX export: the
shipped model has one, another checkpoint is exported into the cache once (export/cache.py; needs PyTorch). Each
method puts its sampling keywords into one options.Sampling and runs the job pipeline (pipeline.py). Errors are
`DdpmError` subclasses whose message is meant for a user.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, locations
from .arguments import OPTIONAL_COUNT, PLAN, checked, given
from .errors import DdpmError, OptionError, clip
from .export import cache as export_cache
from .model.config import ModelConfig
from .model.io import CheckpointError, TorchMissing, default_model_path, load_model, read_model_info
from .options import (DEFAULT_SAMPLER, EDIT_GUIDANCE, EDIT_SAMPLER, GUIDANCE, GUIDANCE_INTERVAL, Sampling,
                      check_sampler_settings, recorded_plan)
from .runtime.bundle import META_FILE, Bundle, ExportError
from .runtime.engine import EngineCache
from .runtime.schedule import Schedule

default_export_dir = export_cache.shipped_dir   # the verified ONNX export shipped with the default model
cache_dir = locations.cache_dir                 # the package's cache folder, $XDG_CACHE_HOME/ddpm; exports/ in it


@dataclass
class Model:
    """A diffusion model ready to sample: its config, the weights' identity and the ways to run it.

    Made by `load()`. `cfg` is the model config (ModelConfig: image size, classes, schedule, T). `hash` identifies
    the weights (sha256, model.io.weights_hash). `path` is the checkpoint file (None for an export folder alone);
    `export_dir` the export folder it was loaded with (the shipped one for the shipped model; None for a checkpoint,
    whose export the onnx/trt engines find in the cache, export/cache.py). A folder given (`export_given`) is read as
    it is; the shipped model loaded by default finds what its folder does not ship (fp16, int8, other plans'
    generators) in its weights' cache folder (export.cache.export_bundle). Engines are kept until `close()`.
    """

    cfg: ModelConfig
    hash: str
    path: Path | None
    export_dir: Path | None = None
    info: dict = field(default_factory=dict)
    export_given: bool = False
    _torch_model: object = field(default=None, repr=False)
    _engines: EngineCache = field(default_factory=EngineCache, repr=False)   # guarded by its own lock
    # guards the other lazily made parts (the torch model, exports, generators): a Model is shared by threads
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ------------------------------------------------------------------------------------------- what it runs on
    @property
    def null_label(self) -> int:
        """The reserved "no label" class index (unconditional sampling, classifier-free guidance)."""
        return self.cfg.null_label

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images (ModelConfig.image_shape)."""
        return self.cfg.image_shape

    @property
    def recorded(self) -> dict | None:
        """The sampling plan the model records (a distilled student's: sampler, steps, spacing, eta, guidance,
        guidance_interval, and how it was distilled), None when it records none: its model file's metadata "plan",
        or for an export folder loaded alone its export.json's, or a diffusers folder's ddpm.json's."""
        plan = self.info.get("plan")
        return plan if isinstance(plan, dict) else None

    @property
    def schedule(self):
        """The model's diffusion schedule (runtime.schedule.Schedule)."""
        return Schedule.of(self.cfg)

    @property
    def torch_model(self):
        """The PyTorch UNet (CPU, fp32, eval mode), loaded on first use. Raises DdpmError without PyTorch or weights."""
        with self._lock:
            if self._torch_model is None:
                if self.path is None:
                    raise DdpmError("this model is an export folder only: torch engines need its checkpoint (--ckpt)")
                self._torch_model = load_model(self.path, self.hash).model   # the weights load() hashed, or one line
            return self._torch_model

    @checked
    def bundle(self, fp16: bool = False, int8: bool = False) -> Bundle:
        """The export folder (runtime.bundle.Bundle) the onnx/trt engines read (export.cache.export_bundle); fp16,
        int8: one with that model too. Raises DdpmError."""
        with self._lock:   # one export per Model, whatever the threads
            return export_cache.export_bundle(self, fp16, int8)

    @checked(plan=PLAN)
    def generator_bundle(self, plan, form: str = "loop", log=None, int8: bool = False) -> Bundle:
        """An export folder with a generator (export/generator.py) for `plan` (int8: its int8 one): the model's own or
        the shipped one, else its weights' folder in the cache, built there once (needs the onnx package) beside
        those of other plans (export.cache.generator_bundle). log(line): what a build does (None: nowhere). Raises
        DdpmError for a plan the generator cannot run, or an explicit export folder without one for it."""
        with self._lock:
            return export_cache.generator_bundle(self, plan, form, log, int8)

    @checked
    def engine(self, name: str = "auto", device: str = "auto", fp16: bool = False, cuda_graph: bool = True,
               threads: int | None = None, max_batch: int = 512, dist=None, log=None, plan=None,
               int8: bool = False):
        """A runtime engine (runtime.engines), made once per (name, device, fp16, cuda_graph, threads) and kept (made
        anew when the kept one was closed).

        name: auto | torch | runtime-torch | onnx | trt | onnx-generator (auto: onnx on a CPU, runtime-torch on a
        GPU; onnx-generator needs the `plan` it will run). device: auto, cpu, cuda, cuda:N. max_batch: the largest
        network batch (runtime.generate.network_batch), what a TensorRT engine is made for. dist, log: see
        export.cache.engine_bundle. int8: onnx or onnx-generator on a CPU with int8 convolutions (docs/int8.md).
        Threads may share an engine (calls at once give the digits of the same calls one after another). Raises
        DdpmError when the engine cannot run here (the message says what is missing)."""
        from .pipeline import open_engine
        from .runtime.engines import auto_engine, resolve_device
        from .runtime.runner import plan_key

        dev = resolve_device(device)
        name = auto_engine(dev) if name == "auto" else name
        if name == "onnx-generator" and plan is None:
            raise OptionError("the onnx-generator engine needs the plan it will run", "plan")
        # a TensorRT engine serves a batch range: a larger batch than it was made for needs another one
        key = (name, dev, fp16, cuda_graph, threads, max_batch if name == "trt" else None,
               plan_key(plan) if name == "onnx-generator" else None, int8)
        # made once per key, one at a time (under torchrun every process makes the same ones: all meet at engine_bundle)
        return self._engines.get(key, lambda: open_engine(self, name, dev, fp16, cuda_graph, threads, max_batch,
                                                          plan, dist, log, int8))

    @checked
    def close(self) -> None:
        """Close every engine the Model made (runtime.engine.Engine.close: runners, onnxruntime sessions, TensorRT
        contexts, CUDA graphs); closing again does nothing, and a later call makes the engines it needs anew. Calls in
        other threads finish on the engine their batch picked up, closed when that batch ends (EngineCache); an engine
        `engine` returned before refuses work (EngineClosed) once closed. `with ddpm.load() as m:` closes."""
        self._engines.close()

    @checked
    def __enter__(self) -> "Model":
        return self

    @checked
    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- sampling
    @checked
    def plan(self, sampler: str = DEFAULT_SAMPLER, steps: int | None = None, eta: float = 0.0,
             variance: str = "small", spacing: str | None = None, guidance_interval=GUIDANCE_INTERVAL,
             top: int | None = None, guidance_rescale: float = 0.0):
        """The sampler's table (runtime.samplers.make_plan) for this model's schedule: sampler ddpm | ddim | dpm++2m |
        unipc; steps None: the sampler's default; spacing None: the sampler's; guidance_interval (lo, hi): guidance
        only where the noise level sigma = sqrt((1-abar)/abar) is in (lo, hi] (Kynkaanniemi et al. 2024), None: on
        every step; top: start at t = top (editing, runtime.edits); guidance_rescale phi in [0, 1]: each guided
        sample's eps rescaled towards the conditional eps's standard deviation, eps (1 + phi (std(eps_c) / std(eps)
        - 1)) (Lin et al. 2024, eq. 15-16; diffusers' guidance_rescale; 0: off). Raises OptionError (a DdpmError
        naming the argument) for steps outside 1..T, DDPM with fewer than T steps, eta outside [0, 1], eta != 0
        without DDIM or variance large without DDPM (they would change nothing). A model whose file records a plan
        (a distilled student: `recorded_plan`) uses it for the arguments not passed."""
        from .runtime.samplers import make_plan

        v = recorded_plan(self.recorded, dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                                              guidance_interval=guidance_interval), given())
        sampler, steps, eta, spacing, guidance_interval = (v[k] for k in ("sampler", "steps", "eta", "spacing",
                                                                         "guidance_interval"))
        check_sampler_settings(sampler, eta, variance, given())
        return make_plan(self.schedule, sampler, steps, eta, variance, spacing, guidance_interval, top,
                         guidance_rescale)

    @checked
    def labels(self, n: int, label=None, uncond: bool = False, start: int = 0) -> np.ndarray:
        """(n,) int64 labels of samples start..start+n-1 (pipeline.labels): the classes in turn (label None), one
        class (an int) or one per sample (a sequence); -1 everywhere when uncond. Raises OptionError."""
        from .pipeline import labels

        return labels(self.cfg.num_classes, n, label, uncond, start)

    @checked
    def generate(self, n: int = 64, label=None, uncond: bool = False, guidance: float = GUIDANCE,
                 sampler: str = DEFAULT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
                 spacing: str | None = None, guidance_interval=GUIDANCE_INTERVAL, guidance_rescale: float = 0.0,
                 seed: int = 0, batch: int = 64, engine="auto", device: str = "auto", fp16: bool = False,
                 int8: bool = False, start: int = 0, progress: bool = False, plan=None) -> np.ndarray:
        """n digits as (n, H, W) uint8 (0 black .. 255 white, MNIST's convention; colour: (n, H, W, 3) RGB).

        label: None (classes 0..9 in turn), an int, or n ints. uncond: the unconditional model (no label).
        guidance: classifier-free guidance w >= 0, eps = eps_c + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6).
        sampler/steps/eta/variance/spacing/guidance_interval/guidance_rescale: see `plan` (plan: a ready Plan
        instead, never with them). seed: 0..2^64-1; sample k of a seed is the same digit whatever n, batch, engine
        or process (runtime.noise); start: the index of the first. engine: a name (see `engine`) or an engine
        `engine` returned. fp16, int8: the network's precision (see `engine`). A model whose file records a plan (a
        distilled student) samples with it, guidance included, where these arguments are not passed
        (`Model.recorded`). Raises DdpmError for bad arguments (every argument is checked against
        ddpm.arguments.ARGS) or an engine that cannot run here."""
        from . import pipeline

        opts = Sampling.of(locals(), given(), labelled=not uncond, record=self.recorded)
        job = pipeline.Job.of(self, n, plan or self.plan(**opts.plan_args()), label, uncond, opts, start)
        return pipeline.generate(self, opts, job, progress)

    # -------------------------------------------------------------------------------------------------- editing
    # An edit is a plan and an EditJob (runtime.edits' job builders) run by the pipeline like `generate` (same seeded
    # stream per sample, any engine that runs row by row, any batch). A picture is a (H, W) uint8 array or a picture
    # file (runtime.images), resized as the edit needs: n results of it (default 8); or a stack (N, H, W): result k
    # from picture k. label None: the unconditional model (upscale: the label read from the picture); EDIT_SAMPLER.

    @checked(n=OPTIONAL_COUNT)
    def inpaint(self, image, mask="bottom", n: int | None = None, label=None, guidance: float = GUIDANCE,
                sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 1.0, variance: str = "small",
                spacing: str | None = None, guidance_interval=None, guidance_rescale: float = 0.0, jump: int = 1,
                resample: int = 3, seed: int = 0, batch: int = 64, engine="auto", device: str = "auto",
                fp16: bool = False, int8: bool = False, start: int = 0, progress: bool = False) -> np.ndarray:
        """RePaint (Lugmayr et al. 2022; runtime.edits.inpaint_job): n completions (n, H, W) uint8 of `image` where
        `mask` says what to redraw: the half to redraw ("top", "bottom", "left", "right"), or a picture (file or
        (H, W) array of the image's size; for a stack one per picture, (N, H, W)) whose white pixels (>= 128, or
        True) are kept exactly. jump, resample: RePaint's jump length j (in rows of the sampler) and count r (1: no
        resampling; j=1 r=3, the default, makes 148 network calls, about 3x a DDIM-50 generation; the paper's
        steps=250, jump=10, resample=10 makes 2410, about 48x). Raises DdpmError for bad arguments."""
        from . import pipeline
        from .runtime.edits import inpaint_job

        opts = Sampling.of(locals(), given(), labelled=label is not None)
        images, keep, n = self.inpaint_input(image, mask, n)
        job = inpaint_job(pipeline.plans(self, opts), images, keep, jump, resample)
        return pipeline.edit(self, opts, n, label, start, progress, job)

    @checked(n=OPTIONAL_COUNT)
    def edit(self, image, label=None, strength: float = 0.6, n: int | None = None, guidance: float = EDIT_GUIDANCE,
             sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
             spacing: str | None = None, guidance_interval=None, guidance_rescale: float = 0.0, seed: int = 0,
             batch: int = 64, engine="auto", device: str = "auto", fp16: bool = False, int8: bool = False,
             start: int = 0, progress: bool = False) -> np.ndarray:
        """SDEdit (Meng et al. 2022; runtime.edits.sdedit_job): n redrawings (n, H, W) uint8 of `image`, noised to
        t0 = round(strength (T-1)) and denoised conditioned on `label`. strength in [0, 1]: 0 returns the input
        unchanged, 1 ignores it (the same digits as `generate` with this seed and label). guidance: EDIT_GUIDANCE by
        default, stronger than generate's (the input pulls towards its own class). Raises DdpmError."""
        from . import pipeline
        from .runtime.edits import sdedit_job
        from .runtime.images import fitted

        opts = Sampling.of(locals(), given(), labelled=label is not None)
        images, n = fitted(image, n, self.image_shape[1:], self.image_shape[0])
        job = sdedit_job(pipeline.plans(self, opts), self.schedule, images, strength)
        return pipeline.edit(self, opts, n, label, start, progress, job)

    @checked(n=OPTIONAL_COUNT)
    def upscale(self, image, factor: int = 2, n: int | None = None, label=None, uncond: bool = False,
                method: str = "ilvr", guidance: float = GUIDANCE, sampler: str = EDIT_SAMPLER,
                steps: int | None = None, eta: float = 1.0, variance: str = "small", spacing: str | None = None,
                guidance_interval=None, guidance_rescale: float = 0.0, seed: int = 0, batch: int = 64,
                engine="auto", device: str = "auto", fp16: bool = False, int8: bool = False, start: int = 0,
                progress: bool = False) -> np.ndarray:
        """Super-resolution (runtime.edits.upscale_job): n full-size digits (n, H, W) uint8 whose f x f block means
        are the small `image` (H/f, W/f) (a picture of another size is resized to it, box-averaged when shrinking)
        within 0.5 grey level. method "ilvr": ILVR (Choi et al. 2021), low-pass guidance of x at every row; "ddnm":
        DDNM (Wang et al. 2023), range-null-space projection of x0_hat. factor: 2 or 4. label None: the class the
        shipped classifier reads from the small picture, the unconditional model where it is unsure or with uncond
        (pipeline.Job.of); the result's `labels` say which (pipeline.Edited). Raises DdpmError."""
        from . import pipeline
        from .runtime.edits import upscale_job
        from .runtime.images import fitted

        opts = Sampling.of(locals(), given(), labelled=label is not None or not uncond)
        H, W = self.image_shape[1:]
        small, n = fitted(image, n, (H // factor, W // factor), self.image_shape[0])
        job = upscale_job(pipeline.plans(self, opts), small, factor, method)
        return pipeline.edit(self, opts, n, label, start, progress, job, uncond)

    @checked(n=OPTIONAL_COUNT)
    def restore(self, image, sigma: float, n: int | None = None, label=None, guidance: float = GUIDANCE,
                sampler: str = EDIT_SAMPLER, steps: int | None = None, eta: float = 0.0, variance: str = "small",
                spacing: str | None = None, guidance_interval=None, guidance_rescale: float = 0.0, seed: int = 0,
                batch: int = 64, engine="auto", device: str = "auto", fp16: bool = False, int8: bool = False,
                start: int = 0, progress: bool = False) -> np.ndarray:
        """Denoising (runtime.edits.restore_job): n restorations (n, H, W) uint8 of `image` = x + sigma n,
        n ~ N(0, I), sigma in the model's [-1, 1] units (s grey levels: sigma = s / 127.5), from the first t whose
        noise-to-signal ratio reaches sigma (runtime.edits.noise_start). A picture file's noise was clipped to
        [0, 255] and rounded, which this ignores. Raises DdpmError for bad arguments."""
        from . import pipeline
        from .runtime.edits import restore_job
        from .runtime.images import fitted

        opts = Sampling.of(locals(), given(), labelled=label is not None)
        images, n = fitted(image, n, self.image_shape[1:], self.image_shape[0])
        job = restore_job(pipeline.plans(self, opts), self.schedule, images, sigma)
        return pipeline.edit(self, opts, n, label, start, progress, job)

    @checked
    def picture(self, image, size: tuple[int, int] | None = None) -> np.ndarray:
        """A picture file or a (H, W) uint8 array (colour model: also (H, W, 3)), resized to size (default: the
        model's): (H', W') uint8 (colour: (H', W', 3); runtime.images), as the editing methods read it. Raises
        DdpmError, also for a light background (runtime.images.editing_picture)."""
        from .runtime.images import editing_picture

        return editing_picture(image, tuple(size or self.image_shape[1:]), channels=self.image_shape[0])

    @checked(n=OPTIONAL_COUNT)
    def inpaint_input(self, image, mask, n: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(pictures (m, H, W) uint8, known (m or 1, H, W) bool, n) at the model's size, from inpaint's picture(s)
        and mask: a half's name, or picture(s) of the image's size (before resizing) whose white pixels are kept
        (runtime.images.inpaint_inputs)."""
        from .runtime.images import inpaint_inputs

        return inpaint_inputs(image, mask, n, self.image_shape[1:], self.image_shape[0])


@checked
def load(path: str | os.PathLike | None = None, export: str | os.PathLike | None = None) -> Model:
    """A Model from a checkpoint (model.safetensors, ckpt.pt or a run folder), from an export folder (`ddpm export`;
    as `path` or `export`), or the shipped default model when both are None.

    With `path` and `export` both given, the export must have been made from that checkpoint (its hash is checked).
    Reading a model.safetensors or an export folder needs no PyTorch; a ckpt.pt does. Raises DdpmError. The Model
    keeps absolute paths; a later read of them that finds other weights (a rewritten file) raises DdpmError.
    """
    try:   # bound by absolute paths: a later chdir must not make them name other files
        path, export = (None if p is None else files.absolute(p) for p in (path, export))
        if path is not None and os.path.isdir(path) and os.path.lexists(Path(path) / META_FILE) and export is None:
            export, path = path, None
        if path is None and export is not None:
            b = Bundle.load(export)
            cfg = ModelConfig.from_dict(b.meta["model_config"]).validate()
            info = {"step": b.meta.get("step"), **({"plan": b.plan} if b.plan else {})}   # the model's own plan
            return Model(cfg, b.meta["checkpoint_hash"], None, Path(export), info, export_given=True)
        default = path is None
        cfg, h, info, file = read_model_info(default_model_path() if default else path)
        shipped = export_cache.shipped_dir()
        export_dir = Path(export) if export is not None else (shipped if default and (shipped / META_FILE).is_file()
                                                             else None)
        model = Model(cfg, h, file, export_dir, info, export_given=export is not None)
        if export is not None:
            model.bundle()      # checks now that the export belongs to these weights
        return model
    except (CheckpointError, TorchMissing, ExportError) as e:
        hint = "" if path or export else " (the shipped default model is missing: reinstall the package)"
        raise DdpmError(f"{e}{hint}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise DdpmError(f"{export or path}: not a usable model ({type(e).__name__}: {clip(e)})") from None

