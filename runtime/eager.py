"""Eager PyTorch: the plain per-step loop a user would write, the reference every engine is checked against.

`sample` runs any `Plan` (runtime.samplers), and any edit's projection (runtime.edits), with ordinary tensor
arithmetic, a fresh tensor per operation; the preallocated runtime (runtime.runner) must give the same digits from
the same noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..model.io import copy_to
from .engine import CountedEngine, StepCallback, Supports
from .samplers import Plan

# eps_fn(x, t, cfg) -> eps: the noise prediction at integer timestep t; cfg False on rows outside the guidance
# interval (the conditional model alone)
EpsFn = Callable[[torch.Tensor, int, bool], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


@torch.no_grad()
def sample(eps_fn: EpsFn, x: torch.Tensor, plan: Plan, noise: NoiseFn | None = None,
           callback: Callable[[int, int, torch.Tensor, torch.Tensor | None], None] | None = None, edit=None,
           y: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run a plan from the starting noise x = x_T (B,C,H,W); noise(slot) gives the fresh noise of a slot (B,C,H,W)
    (default: randn_like). Returns x_0 (B,C,H,W), same dtype and device. Equations: runtime.samplers.

    edit: a runtime.edits.Projection with the known image y (B,C,H,W) and, for the mask operator, the mask
    (1: known), both on x's device; its noise slots come from noise() too. callback(i, t, x, x0_hat): after row i
    at timestep t, x0_hat None on rows without a network call (runtime.engine.StepCallback, with tensors).
    """
    noise = noise or (lambda slot: torch.randn_like(x))
    history: list[torch.Tensor | None] = [None, None]      # x0_hat of the previous two network rows

    def project(i: int, v: torch.Tensor) -> torch.Tensor:
        # runtime.edits: v + P(a y + s z - v), written out plainly
        target = edit.a[i] * y
        if edit.z_slot[i] >= 0:
            target = target + edit.s[i] * noise(int(edit.z_slot[i]))
        if edit.operator == "mask":
            return (1 - mask) * v + mask * target
        f = edit.factor
        low = torch.nn.functional.avg_pool2d(target - v, f)
        return v + torch.repeat_interleave(torch.repeat_interleave(low, f, dim=2), f, dim=3)

    for i in range(plan.steps):
        x0 = None
        if plan.calls_net[i]:
            eps = eps_fn(x, int(plan.timesteps[i]), bool(plan.cfg[i]))
            # 1. predicted clean image
            x0 = plan.x0_x[i] * x - plan.x0_out[i] * eps
            if plan.clip:
                x0 = x0.clamp(-1.0, 1.0)
            if edit is not None and edit.on[i] and edit.space == "x0":
                x0 = project(i, x0)
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
        # 4. the edit's projection onto the known image
        if edit is not None and edit.on[i] and edit.space == "x":
            nxt = project(i, nxt)
        x = nxt
        if callback is not None:
            callback(i, int(plan.timesteps[i]), x, x0)
    return x


def guided(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor | None,
           null_label: int, w: float = 0.0, rescale: float = 0.0) -> EpsFn:
    """eps_fn for class labels with classifier-free guidance (Ho & Salimans 2022, eq. 6):

        eps = eps_cond + w (eps_cond - eps_uncond)  =  (1 + w) eps_cond - w eps_uncond

    w = 0 (or a row with cfg False) is the conditional model alone (one batch); w > 0 evaluates both halves in one
    doubled batch. labels=None samples unconditionally with the reserved null label. rescale phi > 0 (the plan's
    guidance_rescale, Lin et al. 2024 eq. 15-16) then multiplies each guided sample's eps by
    1 + phi (std(eps_cond) / std(eps) - 1) (runtime.samplers' module docstring).
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
        eps = cond + w * (cond - uncond)
        if rescale:
            std = lambda e: e.flatten(1).std(dim=1, correction=0).view(-1, *[1] * (e.dim() - 1))
            eps = eps * (1 + rescale * (std(cond) / std(eps) - 1))
        return eps
    return eps_fn


class EagerEngine(CountedEngine):
    """Eager PyTorch: the plain per-step loop a user would write (the reference and the benchmark baseline).
    close() drops its copy of the model (when the runs in flight end)."""

    name = "torch"
    dtype = "float32"
    supports = Supports(edits=True, states=True)

    def __init__(self, model: torch.nn.Module, null_label: int, device: str | torch.device = "cpu"):
        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        self.model: torch.nn.Module | None = copy_to(model, self.torch_device)   # the caller's model stays put
        self.null_label = null_label
        cfg = getattr(model, "cfg", None)   # a network of this project says its image shape (Engine.run checks x_T)
        self.image_shape = None if cfg is None else tuple(cfg.image_shape)
        self._init_uses()

    @torch.no_grad()
    def _run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan, guidance: float,
             callback: StepCallback | None = None, edit=None, y=None, mask=None, states: bool = False) -> np.ndarray:
        """x_T (B,C,H,W) float32, z (B,Q,C,H,W) or None, labels (B,) int64 or None -> x_0 (B,C,H,W) float32
        (runtime.engine.Engine.run).

        edit, y, mask: an edit's projection and its inputs (runtime.runner.Runner.load); callback(i, t, x, x0_hat)
        after each row, with host copies of x and x0_hat when states (x0_hat None on rows without a network
        call), else None and None."""
        with self.in_use():
            model = self.model
            dev = self.torch_device
            lab = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64), device=dev)
            eps_fn = guided(model, lab, self.null_label, guidance, plan.guidance_rescale)
            zd = None if z is None else torch.as_tensor(z, device=dev)
            dev_ = lambda a: None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev)
            host = lambda a: None if a is None or not states else a.cpu().numpy()
            cb = None if callback is None else (lambda i, t, x, x0: callback(i, t, host(x), host(x0)))
            x = sample(eps_fn, torch.as_tensor(x_T, device=dev), plan,
                       noise=None if zd is None else (lambda s: zd[:, s]), callback=cb, edit=edit, y=dev_(y), mask=dev_(mask))
            return x.cpu().numpy()

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def _free(self) -> None:
        """Drop the engine's copy of the model (its weights on the device); close() calls it once no run is in
        flight."""
        self.model = None
