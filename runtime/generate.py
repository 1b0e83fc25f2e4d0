"""generate(): N samples in batches from any engine, with the seeded noise stream and a progress bar.

An engine is any object with `run(x_T, z, labels, plan, guidance, callback) -> x_0` for one batch (numpy arrays in,
a numpy array out: x_0 (B,C,H,W) float32, or the images (B,H,W) uint8 already quantised as images.to_uint8 does,
as the onnx-generator engine returns them); `labels` is None for unconditional sampling. Engines with
`supports_edits` (eager and the runtime's) also take `edit, y, mask` (an edit's projection, runtime.edits, with its
known image and mask) and `watch` (the states after every row). The eager PyTorch reference is
`runtime.eager.EagerEngine`; the preallocated runtime engines live in `runtime.runner`. Nothing here needs PyTorch.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .images import to_uint8
from .noise import make_noise
from .samplers import Plan


class Engine(Protocol):
    name: str

    def run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan,
            guidance: float, callback: Callable[[int], None] | None = None) -> np.ndarray: ...


def labels_for(n: int, label: int | None, uncond: bool, num_classes: int = 10) -> np.ndarray:
    """The label of every sample: -1 (unconditional), a fixed class, or the classes in turn (k % num_classes)."""
    if uncond:
        return np.full(n, -1, dtype=np.int64)
    if label is not None:
        return np.full(n, label, dtype=np.int64)
    return np.arange(n, dtype=np.int64) % num_classes


def generate(engine: Engine, n: int, plan: Plan, labels: np.ndarray, guidance: float = 0.0, seed: int = 0,
             batch: int = 64, start: int = 0, progress: bool = True, image_shape=(1, 28, 28), job=None,
             watch: Callable | None = None) -> np.ndarray:
    """Samples start..start+n-1 of the stream `seed` as (n, H, W) uint8. labels: (n,), -1 = unconditional.

    job: an edit (runtime.edits.EditJob): its projection and known images, or its starting images; its noise slots
    follow the plan's in every sample's stream. watch(i, x, x0): the states of the first batch after every row
    (host arrays (B,C,H,W), x0 None on rows without a network call). ValueError for an engine that cannot run the
    edit's projection or be watched (`supports_edits`).
    """
    from tqdm import tqdm

    edit = job.projection if job is not None else None
    if (edit is not None or watch is not None) and not getattr(engine, "supports_edits", False):
        raise ValueError(f"the {engine.name} engine runs whole plans in one call: it cannot "
                         f"{'project onto a known image' if edit is not None else 'show every step'}; use "
                         f"--engine onnx (or torch, runtime-torch)")
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    if n > 0 and (labels < 0).any() and (labels >= 0).any():
        raise ValueError("mixing conditional and unconditional samples in one call is not supported")
    out = np.empty((n, *image_shape[1:]), dtype=np.uint8)
    bar = tqdm(total=-(-n // batch) * plan.steps, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{engine.name} {plan.name}")
    slots = plan.num_slots + (job.num_slots if job is not None else 0)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        x_T, z = make_noise(seed, start + lo, hi - lo, slots, image_shape)
        y = None if labels[lo] < 0 else labels[lo:hi].astype(np.int64)
        extra = {}
        if job is not None:
            known, mask, x_input = job.batch(lo, hi)
            x_T = job.start(x_T, x_input)
            if edit is not None:
                extra.update(edit=edit, y=known, mask=mask)
        if watch is not None and lo == 0:
            extra["watch"] = watch
        x = engine.run(x_T, z, y, plan, guidance, callback=lambda i: bar.update(1), **extra)
        out[lo:hi] = x if x.dtype == np.uint8 else to_uint8(x)
    bar.close()
    return out
