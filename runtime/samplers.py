"""Samplers: plain functions over a noise predictor eps_fn(x, t) -> eps, the starting noise and the schedule.

Every reverse process here is first turned into a `Plan`, a table with one row per step:

    x0_hat = a[i] * x - b[i] * eps                        (predicted clean image; clipped to [-1, 1] if plan.clip)
    x      = c[i] * x0_hat + d[i] * eps + e[i] * x + sigma[i] * z_i

DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) only differ in the table, so the eager reference loop below
(`sample`) and the preallocated runtime (`runtime.runner`) run the same plan with the same noise z_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .schedule import Schedule

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    name: str
    timesteps: np.ndarray   # (S,) int64: the network's t at step i (decreasing)
    a: np.ndarray           # x0_hat = a x - b eps: 1/sqrt(abar_t)
    b: np.ndarray           #                       sqrt(1/abar_t - 1)
    c: np.ndarray           # weight of x0_hat in the next x
    d: np.ndarray           # weight of eps in the next x
    e: np.ndarray           # weight of the current x in the next x
    sigma: np.ndarray       # std of the fresh noise z_i added at step i
    abar_prev: np.ndarray   # abar of the timestep reached after step i (1 after the last): for inpainting
    clip: bool = True       # clip x0_hat to [-1, 1] (the data range)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.sigma > 0))


def ddpm_plan(sched: Schedule, variance: str = "small", clip: bool = True) -> Plan:
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2 in its x0-parameterised form)."""
    if variance not in ("small", "large"):
        raise ValueError("variance must be 'small' (beta~_t) or 'large' (beta_t)")
    t = np.arange(sched.T - 1, -1, -1)
    # 1. x0_hat = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps                            (eq. 15)
    # 2. mu~(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t                                 (eq. 7)
    # 3. x_{t-1} = mu~ + sigma_t z, sigma_t^2 = beta~_t ("fixed small") or beta_t ("fixed large"); z = 0 at t = 0
    var = sched.posterior_variance[t] if variance == "small" else sched.betas[t]
    sigma = np.where(t > 0, np.sqrt(var), 0.0)
    return Plan(f"ddpm-{variance}", t.astype(np.int64), sched.sqrt_recip_alphas_cumprod[t],
                sched.sqrt_recipm1_alphas_cumprod[t], sched.posterior_mean_coef1[t], np.zeros(sched.T),
                sched.posterior_mean_coef2[t], sigma, sched.alphas_cumprod_prev[t], clip)


def ddim_timesteps(T: int, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], both ends included, decreasing."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in 1..{T}, got {steps}")
    if steps == 1:
        return np.array([T - 1], dtype=np.int64)
    return np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1].copy()


def ddim_plan(sched: Schedule, steps: int = 50, eta: float = 0.0, clip: bool = True) -> Plan:
    """DDIM (Song et al. 2021) on a subsequence of timesteps; eta=0 deterministic, eta=1 DDPM-like."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    t = ddim_timesteps(sched.T, steps)
    ab = sched.alphas_cumprod[t]
    ab_prev = np.append(sched.alphas_cumprod[t[1:]], 1.0)
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                              (DDIM eq. 12, "predicted x0")
    # 2. sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)         (eq. 16)
    # 3. x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps' + sigma z     (eq. 12)
    #    with eps' = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), the noise that is consistent with x0_hat: equal to
    #    eps when x0_hat is not clipped; when it is, the direction term does not re-inject what clipping removed
    #    (that leak made guided samples blobby). Folded into the table: x_prev = c x0_hat + e x_t + sigma z.
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    dir_ = np.sqrt(np.clip(1 - ab_prev - sigma ** 2, 0.0, None))
    e = dir_ / np.sqrt(1 - ab)
    c = np.sqrt(ab_prev) - e * np.sqrt(ab)
    return Plan(f"ddim{steps}-eta{eta:g}", t, 1 / np.sqrt(ab), np.sqrt(1 / ab - 1), c, np.zeros(len(t)), e, sigma,
                ab_prev, clip)


def make_plan(sched: Schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
              variance: str = "small") -> Plan:
    if sampler == "ddpm":
        if steps not in (None, sched.T):
            raise ValueError(f"the DDPM sampler runs all T={sched.T} steps; use --sampler ddim for fewer")
        return ddpm_plan(sched, variance)
    if sampler == "ddim":
        return ddim_plan(sched, steps or 50, eta)
    raise ValueError(f"unknown sampler {sampler!r} (ddpm or ddim)")


@torch.no_grad()
def sample(eps_fn: EpsFn, x: torch.Tensor, plan: Plan, noise: NoiseFn | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run a plan from the starting noise x (= x_T); noise(i) gives z_i (default: randn_like). Eager reference."""
    noise = noise or (lambda i: torch.randn_like(x))
    for i, t in enumerate(plan.timesteps.tolist()):
        eps = eps_fn(x, t)
        # 1. predicted clean image
        x0 = plan.a[i] * x - plan.b[i] * eps
        if plan.clip:
            x0 = x0.clamp(-1.0, 1.0)
        # 2. mean of the next state, 3. plus fresh noise
        x = plan.c[i] * x0 + plan.d[i] * eps + plan.e[i] * x
        if plan.sigma[i] > 0:
            x = x + plan.sigma[i] * noise(i)
        if callback is not None:
            callback(i, x)
    return x


def sample_ddpm(eps_fn: EpsFn, x: torch.Tensor, sched: Schedule, noise: NoiseFn | None = None,
                variance: str = "small", **kw) -> torch.Tensor:
    """DDPM ancestral sampler, T steps."""
    return sample(eps_fn, x, ddpm_plan(sched, variance), noise, **kw)


def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, sched: Schedule, steps: int = 50, eta: float = 0.0,
                noise: NoiseFn | None = None, **kw) -> torch.Tensor:
    """DDIM sampler, any number of steps, eta in [0, 1]."""
    return sample(eps_fn, x, ddim_plan(sched, steps, eta), noise, **kw)


@torch.no_grad()
def inpaint(eps_fn: EpsFn, known: torch.Tensor, mask: torch.Tensor, plan: Plan, generator: torch.Generator | None = None,
            resample: int = 1) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022): generate where mask == 0, keep `known` where mask == 1.

    Each step the known region is re-noised from q(x_prev | x_0) (eq. 4 of DDPM) and the unknown region comes from
    the reverse step; with resample > 1 each step is redone after a one-step jump back to x_t (RePaint's
    "resampling", jump length 1), which harmonises the two regions.
    """
    if resample < 1:
        raise ValueError("resample must be >= 1")
    randn = lambda: torch.randn(known.shape, generator=generator, dtype=known.dtype).to(known.device)
    mask = mask.to(known.dtype)
    x = randn()
    for i, t in enumerate(plan.timesteps.tolist()):
        abar_t = plan.abar_prev[i - 1] if i > 0 else 1.0 / plan.a[0] ** 2
        for r in range(resample):
            eps = eps_fn(x, t)
            x0 = plan.a[i] * x - plan.b[i] * eps
            if plan.clip:
                x0 = x0.clamp(-1.0, 1.0)
            x_unknown = plan.c[i] * x0 + plan.d[i] * eps + plan.e[i] * x + plan.sigma[i] * randn()
            ab = plan.abar_prev[i]
            x_known = ab ** 0.5 * known + (1 - ab) ** 0.5 * randn()
            x_prev = mask * x_known + (1 - mask) * x_unknown
            if r < resample - 1:
                # jump back: x_t ~ q(x_t | x_prev) = N(sqrt(abar_t/abar_prev) x_prev, (1 - abar_t/abar_prev) I)
                ratio = abar_t / ab
                x = ratio ** 0.5 * x_prev + (1 - ratio) ** 0.5 * randn()
            else:
                x = x_prev
    return x


def guided(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor | None,
           null_label: int, w: float = 0.0) -> EpsFn:
    """eps_fn for class labels with classifier-free guidance (Ho & Salimans 2022, eq. 6):

        eps = eps_cond + w (eps_cond - eps_uncond)  =  (1 + w) eps_cond - w eps_uncond

    w = 0 is the conditional model alone (one batch); w > 0 evaluates both halves in one doubled batch.
    labels=None samples unconditionally with the reserved null label.
    """
    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        n = x.shape[0]
        if labels is None or w == 0:
            y = labels if labels is not None else torch.full((n,), null_label, dtype=torch.long, device=x.device)
            return model_fn(x, torch.full((n,), t, dtype=torch.long, device=x.device), y)
        y = torch.cat([labels, torch.full_like(labels, null_label)])
        eps = model_fn(torch.cat([x, x]), torch.full((2 * n,), t, dtype=torch.long, device=x.device), y)
        cond, uncond = eps.chunk(2)
        return cond + w * (cond - uncond)
    return eps_fn
