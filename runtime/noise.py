"""The seeded noise stream shared by every engine.

Sample k of a generation with seed s owns a CPU torch.Generator seeded from (s, k); from it it draws, in this order,
its starting noise x_T (C,H,W) and then one z_i (C,H,W) per step, all at once as (S,C,H,W). A sample's digits
therefore depend only on (seed, k, plan), never on how the N samples are split into batches or processes, and any
engine reproduces them by filling its buffers from this host-side stream. Plans without noise (DDIM, eta=0) draw
only x_T.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for sample `index` of a run with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]) >> 1


def fill_noise(seed: int, start: int, x_T: torch.Tensor, z: torch.Tensor | None) -> None:
    """Fill x_T (B,C,H,W) and z (B,S,C,H,W) in place for samples start..start+B-1 (CPU tensors)."""
    g = torch.Generator()
    for b in range(x_T.shape[0]):
        g.manual_seed(sample_seed(seed, start + b))
        torch.randn(x_T.shape[1:], generator=g, out=x_T[b])
        if z is not None:
            torch.randn(z.shape[1:], generator=g, out=z[b])


def make_noise(seed: int, start: int, count: int, steps: int, shape=(1, 28, 28), stochastic: bool = True):
    """(x_T (B,C,H,W), z (B,S,C,H,W) or None) for samples start..start+count-1."""
    x_T = torch.empty((count, *shape))
    z = torch.empty((count, steps, *shape)) if stochastic else None
    fill_noise(seed, start, x_T, z)
    return x_T, z
