"""Eager PyTorch: the plain per-step loop a user would write, the reference every engine is checked against.

`sample` runs any `Plan` (runtime.samplers) with ordinary tensor arithmetic, a fresh tensor per operation; the
preallocated runtime (runtime.runner) must give the same digits from the same noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..model.io import copy_to
from .samplers import Plan

# eps_fn(x, t, cfg) -> eps: the noise prediction at integer timestep t; cfg False on rows outside the guidance
# interval (the conditional model alone)
EpsFn = Callable[[torch.Tensor, int, bool], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


@torch.no_grad()
def sample(eps_fn: EpsFn, x: torch.Tensor, plan: Plan, noise: NoiseFn | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run a plan from the starting noise x = x_T (B,C,H,W); noise(slot) gives the fresh noise of a slot (B,C,H,W)
    (default: randn_like). Returns x_0 (B,C,H,W), same dtype and device. Equations: runtime.samplers."""
    noise = noise or (lambda slot: torch.randn_like(x))
    history: list[torch.Tensor | None] = [None, None]      # x0_hat of the previous two network rows
    for i in range(plan.steps):
        if plan.calls_net[i]:
            eps = eps_fn(x, int(plan.timesteps[i]), bool(plan.cfg[i]))
            # 1. predicted clean image
            x0 = plan.x0_x[i] * x - plan.x0_eps[i] * eps
            if plan.clip:
                x0 = x0.clamp(-1.0, 1.0)
            # 2. the next state: this prediction and the remembered ones
            nxt = plan.w_x[i] * x + plan.w_x0[i] * x0
            if plan.w_x0_prev[i]:
                nxt = nxt + plan.w_x0_prev[i] * history[0]
            if plan.w_x0_prev2[i]:
                nxt = nxt + plan.w_x0_prev2[i] * history[1]
            history = [x0, history[0]]
        else:
            nxt = plan.w_x[i] * x
        # 3. plus fresh noise
        if plan.z_slot[i] >= 0:
            nxt = nxt + plan.sigma[i] * noise(int(plan.z_slot[i]))
        x = nxt
        if callback is not None:
            callback(i, x)
    return x


def guided(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor | None,
           null_label: int, w: float = 0.0) -> EpsFn:
    """eps_fn for class labels with classifier-free guidance (Ho & Salimans 2022, eq. 6):

        eps = eps_cond + w (eps_cond - eps_uncond)  =  (1 + w) eps_cond - w eps_uncond

    w = 0 (or a row with cfg False) is the conditional model alone (one batch); w > 0 evaluates both halves in one
    doubled batch. labels=None samples unconditionally with the reserved null label.
    """
    def eps_fn(x: torch.Tensor, t: int, cfg: bool = True) -> torch.Tensor:
        n = x.shape[0]
        ts = lambda k: torch.full((k,), t, dtype=torch.long, device=x.device)
        if labels is None or w == 0 or not cfg:
            y = labels if labels is not None else torch.full((n,), null_label, dtype=torch.long, device=x.device)
            return model_fn(x, ts(n), y)
        y = torch.cat([labels, torch.full_like(labels, null_label)])
        eps = model_fn(torch.cat([x, x]), ts(2 * n), y)
        cond, uncond = eps.chunk(2)
        return cond + w * (cond - uncond)
    return eps_fn


class EagerEngine:
    """Eager PyTorch: the plain per-step loop a user would write (the reference and the benchmark baseline)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, null_label: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = copy_to(model, self.device)   # the caller's model stays where it was
        self.null_label = null_label

    @torch.no_grad()
    def run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan, guidance: float,
            callback=None) -> np.ndarray:
        """x_T (B,C,H,W) float32, z (B,Q,C,H,W) or None, labels (B,) int64 or None -> x_0 (B,C,H,W) float32."""
        dev = self.device
        y = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64), device=dev)
        eps_fn = guided(self.model, y, self.null_label, guidance)
        zd = None if z is None else torch.as_tensor(z, device=dev)
        x = sample(eps_fn, torch.as_tensor(x_T, device=dev), plan, noise=None if zd is None else (lambda s: zd[:, s]),
                   callback=None if callback is None else (lambda i, _x: callback(i)))
        return x.cpu().numpy()


@torch.no_grad()
def inpaint(eps_fn: EpsFn, known: torch.Tensor, mask: torch.Tensor, plan: Plan, generator: torch.Generator | None = None,
            resample: int = 1) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022): generate where mask == 0, keep `known` where mask == 1 (eager, DDPM/DDIM plans).

    Each step the known region is re-noised from q(x_prev | x_0) (eq. 4 of DDPM) and the unknown region comes from
    the reverse step; with resample > 1 each step is redone after a one-step jump back to x_t (RePaint's
    "resampling", jump length 1), which harmonises the two regions.
    """
    if resample < 1:
        raise ValueError("resample must be >= 1")
    if plan.history:
        raise ValueError("inpainting runs single-step plans (DDPM, DDIM)")
    randn = lambda: torch.randn(known.shape, generator=generator, dtype=known.dtype).to(known.device)
    mask = mask.to(known.dtype)
    x = randn()
    for i, t in enumerate(plan.timesteps.tolist()):
        abar_t = plan.abar_next[i - 1] if i > 0 else 1.0 / plan.x0_x[0] ** 2
        for r in range(resample):
            eps = eps_fn(x, t, bool(plan.cfg[i]))
            x0 = plan.x0_x[i] * x - plan.x0_eps[i] * eps
            if plan.clip:
                x0 = x0.clamp(-1.0, 1.0)
            x_unknown = plan.w_x0[i] * x0 + plan.w_x[i] * x + plan.sigma[i] * randn()
            ab = plan.abar_next[i]
            x_known = ab ** 0.5 * known + (1 - ab) ** 0.5 * randn()
            x_prev = mask * x_known + (1 - mask) * x_unknown
            if r < resample - 1:
                # jump back: x_t ~ q(x_t | x_prev) = N(sqrt(abar_t/abar_prev) x_prev, (1 - abar_t/abar_prev) I)
                ratio = abar_t / ab
                x = ratio ** 0.5 * x_prev + (1 - ratio) ** 0.5 * randn()
            else:
                x = x_prev
    return x
