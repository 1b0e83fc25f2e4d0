"""generate(): N samples in batches from any engine, with the seeded noise stream and a progress bar.

An engine is a runtime.engine.Engine: `run(x_T, z, labels, plan, guidance, callback) -> x_0` for one batch (numpy
arrays in, a numpy array out: x_0 (B,C,H,W) float32, or the images (B,H,W) uint8 already quantised as
images.to_uint8 does, as the onnx-generator engine returns them); `labels` is None for unconditional sampling. What
else an engine can do it declares (`engine.supports`): edits (an edit's projection, runtime.edits, with its known
image and mask) and states (x and x0_hat after every row, for a watch). Nothing here needs PyTorch.

`iter_generate` yields the batches as they are made, so that a caller can write them out (samples.save_samples) and
hold one batch at a time; `generate` collects them. Both refuse before allocating a batch whose noise tables and
buffers would not fit in memory (`OutOfMemory`), and stop at a batch that came out NaN or inf (`NonFiniteSamples`).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ..errors import DdpmError, OptionError
from .engine import Engine, StepCallback, check_output
from .images import picture_shape, to_uint8
from .noise import check_seed, check_start, make_noise
from .samplers import Plan


class OutOfMemory(DdpmError):
    """A request whose buffers would not fit in the memory available; the message gives the size and the option to
    change."""


class NonFiniteSamples(DdpmError):
    """An engine returned NaN or inf: the model, its export or the guidance scale is broken; nothing is saved."""


def network_batch(batch: int, guided: bool) -> int:
    """The batch the network runs at for `batch` samples: 2 x batch with classifier-free guidance (Ho & Salimans
    2022), which evaluates the conditional and the unconditional halves in one call, else batch."""
    return 2 * batch if guided else batch


def labels_for(n: int, label: int | None, uncond: bool, num_classes: int = 10, start: int = 0) -> np.ndarray:
    """The label of samples start..start+n-1: -1 (unconditional), a fixed class, or the classes in turn
    (k % num_classes)."""
    if uncond:
        return np.full(n, -1, dtype=np.int64)
    if label is not None:
        return np.full(n, label, dtype=np.int64)
    return (np.arange(n, dtype=np.int64) + start % num_classes) % num_classes   # any start below 2^64


# ------------------------------------------------------------------------------------------------- memory guard
def gib(n: float) -> str:
    """n bytes for a message: "1.5 GiB" from 1 GiB on, else "12 MiB"."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_memory(device: str = "cpu", cuda=None) -> int | None:
    """Bytes that can still be allocated: on a GPU, the free device memory (torch.cuda, or the stand-in `cuda`); on
    the host, /proc/meminfo's MemAvailable, capped by the cgroup (container) limit. None where it cannot be told."""
    if str(device).startswith("cuda"):
        if cuda is None:
            import torch

            if not torch.cuda.is_available():
                return None
            cuda, device = torch.cuda, torch.device(device)
        return int(cuda.mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:   # cgroup v2: a container's own limit
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                left = int(limit) - int(f.read().strip())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def ensure_memory(need: int, what: str, fix: str, device: str = "cpu", per_unit: int | None = None,
                  cuda=None) -> None:
    """Raise OutOfMemory when `need` bytes (for `what`) exceed 90% of the memory available on `device`.

    fix: the option to change (e.g. "lower --batch"); per_unit: the bytes of one unit of that option, to say how
    many would fit."""
    avail = available_memory(device, cuda)
    if avail is None or need <= 0.9 * avail:
        return
    where = "GPU" if str(device).startswith("cuda") else "host"
    fits = ""
    if per_unit:
        k = int(0.9 * avail // per_unit)
        fits = f" (at most {k} fit)" if k >= 1 else " (not even 1 fits)"
    raise OutOfMemory(f"{what} needs {gib(need)} of {where} memory, more than the {gib(avail)} available; "
                      f"{fix}{fits}")


def batch_bytes(plan: Plan, batch: int, image_shape: tuple[int, int, int], guided: bool = True,
                extra: int = 0) -> tuple[int, int]:
    """(host bytes, engine bytes) that one batch needs: the noise the host draws (x_T and the plan's noise table,
    runtime.noise.make_noise) and the engine's buffers (runtime.runner.Runner: its own copy of the noise table, the
    image, x0_hat ring, scratch, and the network's input and output at network_batch), all float32. extra: images
    per sample that an edit adds on both sides (its noise slots, known image and mask; runtime.edits.EditJob).
    image_shape: the model's (C, H, W)."""
    img = int(np.prod(image_shape)) * 4
    host = batch * (1 + plan.num_slots + extra) * img
    engine = img * (batch * (plan.num_slots + extra + 3 + plan.history) + 2 * network_batch(batch, guided))
    return host, engine


def check_batch_fits(plan: Plan, batch: int, image_shape: tuple[int, int, int], guided: bool = True,
                     device: str = "cpu", cuda=None, extra: int = 0) -> None:
    """OutOfMemory, before anything is allocated, when one batch's noise tables and buffers would not fit (cuda: a
    stand-in for torch.cuda's memory functions; extra: see batch_bytes)."""
    host, eng = batch_bytes(plan, batch, image_shape, guided, extra)
    per_host, per_eng = host // batch, eng // batch
    what = f"batch {batch} of {plan.name} ({plan.num_slots} noise images per sample)"
    if str(device).startswith("cuda"):
        ensure_memory(eng, what, "lower --batch", device, per_eng, cuda)
        ensure_memory(host, what, "lower --batch", "cpu", per_host)
    else:
        ensure_memory(host + eng, what, "lower --batch", "cpu", per_host + per_eng)


# ------------------------------------------------------------------------------------------------- generation
def _cause(engine: Engine, guidance: float) -> str:
    if engine.dtype == "float16":
        return "an fp16 overflow (run without --fp16)"
    if guidance > 20:
        return f"the guidance scale {guidance:g}, far too large (the model card's sweep uses 0-5)"
    return ("broken weights (a diverged training run?) or a broken export; `ddpm export` checks a checkpoint and "
            "refuses one whose outputs are not finite")


def whole_loop_refusal(engine: str, edit: bool) -> OptionError:
    """The refusal of an edit (option "engine") or of a watch of every row (option "trajectory", the CLI's) by an
    engine that runs whole plans in one call (Supports.edits, Supports.states: onnx-generator)."""
    what = "project onto a known image between rows (edits run row by row)" if edit else "show every step"
    return OptionError(f"the {engine} engine runs whole plans in one call: it cannot {what}; use the onnx engine (or "
                       f"auto, torch, runtime-torch)", "engine" if edit else "trajectory")


class _NoBar:
    """What iter_generate counts its rows on when no progress is shown: tqdm is not even imported (about 50 ms of
    CPU, and its monitor thread, that `ddpm gen -q` and the API without progress do without)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool, **kwargs):
    """A tqdm bar of these arguments when `progress`, else a bar that shows nothing (_NoBar)."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**kwargs)


def iter_generate(engine: Engine, n: int, plan: Plan, labels: np.ndarray, guidance: float = 0.0, seed: int = 0,
                  batch: int = 64, start: int = 0, progress: bool = True, *, image_shape: tuple[int, int, int],
                  job=None, watch: StepCallback | None = None) -> Iterator[np.ndarray]:
    """Samples start..start+n-1 of the stream `seed`, yielded batch by batch as pictures (b, H, W) uint8 (colour:
    (b, H, W, C); images.to_uint8) in order.
    image_shape: the model's (C, H, W) (the engine's input; api.Model.image_shape).

    labels: (n,), -1 = unconditional; or a function (lo, hi) -> the labels of samples lo..hi-1 of these n, so that
    nothing of size n is held. job: an edit (runtime.edits.EditJob): its projection and known images, or its starting
    images; its noise slots follow the plan's in every sample's stream. watch(i, t, x, x0_hat): the states of the
    first batch after every row (runtime.engine.StepCallback with host arrays (B,C,H,W), x0_hat None on rows without
    a network call). Raises OutOfMemory before the first batch when one batch would not fit, and NonFiniteSamples at
    a batch that comes out NaN or inf (naming the likely cause); ValueError for bad labels; OptionError (naming
    engine) for a plan the engine does not run or an edit's projection it cannot run, (naming trajectory) for a
    watch it cannot show (engine.supports); EngineUnavailable for a batch beyond the engine's."""
    from .nets import EngineUnavailable
    from .runner import plan_key

    check_seed(seed)
    edit = job.projection if job is not None else None
    can = engine.supports
    if edit is not None and not can.edits:
        raise whole_loop_refusal(engine.name, edit=True)
    if watch is not None and not can.states:
        raise whole_loop_refusal(engine.name, edit=False)
    if can.plan_key is not None and can.plan_key != plan_key(plan):
        raise OptionError(f"the {engine.name} engine runs one plan, not {plan.name}; use the onnx engine (or torch, "
                          f"runtime-torch)", "engine")
    if callable(labels):
        get = labels
    else:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} samples")
        if n > 0 and (labels < 0).any() and (labels >= 0).any():
            raise ValueError("mixing conditional and unconditional samples in one call is not supported")
        get = lambda lo, hi: labels[lo:hi]
    if n == 0:
        return
    check_start(start, n)
    b = min(batch, n)
    guided = bool(guidance != 0 and get(0, 1)[0] >= 0)
    if can.max_batch is not None and network_batch(b, guided) > can.max_batch:
        raise EngineUnavailable(f"the {engine.name} engine runs network batches up to {can.max_batch}, batch {b} "
                                f"needs {network_batch(b, guided)}{' (guidance doubles it)' if guided else ''}; "
                                f"lower --batch")
    extra = job.num_slots + 2 if job is not None else 0    # the edit's noise slots, its known image and mask
    check_batch_fits(plan, b, image_shape, guided, engine.device, extra=extra)
    slots = plan.num_slots + (job.num_slots if job is not None else 0)
    # the bar counts what the engine reports as it happens: rows for an engine that steps row by row (can.states),
    # calls for one that runs the whole loop in one call (onnx-generator: its rows are known only once it returns)
    rows = can.states
    bar = progress_bar(progress, total=-(-n // batch) * (plan.steps if rows else 1),
                       unit="step" if rows else "batch", dynamic_ncols=True,
                       desc=f"{engine.name} {plan.name}" + ("" if rows else " (whole loop per call)"))
    count_row = (lambda i, t, x, x0: bar.update(1)) if rows else None   # noqa: E731
    try:
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            x_T, z = make_noise(seed, start + lo, hi - lo, slots, image_shape)
            y = np.asarray(get(lo, hi), dtype=np.int64)
            if len(y) != hi - lo or ((y < 0).any() and (y >= 0).any()):
                raise ValueError(f"labels of samples {lo}..{hi - 1}: {hi - lo} labels, all -1 or all classes")
            y = None if y[0] < 0 else y
            more: dict = {}
            if job is not None:
                known, mask, x_input = job.batch(lo, hi)
                x_T = job.start(x_T, x_input)
                if edit is not None:
                    more.update(edit=edit, y=known, mask=mask)
            callback = count_row
            if watch is not None and lo == 0:
                callback = lambda i, t, x, x0: (bar.update(1), watch(i, t, x, x0))   # noqa: E731
                more["states"] = True
            x = engine.run(x_T, z, y, plan, guidance, callback=callback, **more)
            del x_T, z
            check_output(engine, x, hi - lo, image_shape)
            if not rows:
                bar.update(1)
            if not np.isfinite(x).all():
                raise NonFiniteSamples(f"samples {start + lo}..{start + hi - 1} came out NaN or inf from the "
                                       f"{engine.name} engine, so nothing was saved; likely cause: "
                                       f"{_cause(engine, guidance)}")
            yield x if x.dtype == np.uint8 else to_uint8(x)
    finally:
        bar.close()


def generate(engine: Engine, n: int, plan: Plan, labels: np.ndarray, guidance: float = 0.0, seed: int = 0,
             batch: int = 64, start: int = 0, progress: bool = True, *, image_shape: tuple[int, int, int],
             job=None, watch: StepCallback | None = None) -> np.ndarray:
    """Samples start..start+n-1 of the stream `seed` as pictures, (n, H, W) uint8 (colour: (n, H, W, C);
    images.to_uint8). labels: (n,), -1 = unconditional.

    Holds all n images: OutOfMemory when they would not fit (iter_generate streams them instead); see iter_generate
    for job, watch and the other errors."""
    per = int(np.prod(image_shape))
    ensure_memory(n * per, f"holding {n} samples", "lower -n, or stream them into a file (`ddpm gen --out x.npz`)",
                  per_unit=per)
    out = np.empty((n, *picture_shape(image_shape)), dtype=np.uint8)
    lo = 0
    for part in iter_generate(engine, n, plan, labels, guidance, seed, batch, start, progress,
                              image_shape=image_shape, job=job, watch=watch):
        out[lo:lo + len(part)] = part
        lo += len(part)
    return out
