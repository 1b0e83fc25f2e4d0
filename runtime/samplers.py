"""Samplers as tables: every reverse process here is a `Plan`, one row of coefficients per step (numpy only).

A row i that calls the network (all rows of the samplers here) computes, from the state x and eps = eps_theta(x, t_i):

    x0_hat_i = x0_x[i] * x - x0_eps[i] * eps                  (predicted clean image; clipped to [-1, 1] if plan.clip)
    x        = w_x[i] * x + w_x0[i] * x0_hat_i + w_x0_prev[i] * x0_hat_{i-1} + w_x0_prev2[i] * x0_hat_{i-2}
               + sigma[i] * z[z_slot[i]]

where x0_hat_{i-1}, x0_hat_{i-2} are the predictions of the previous network rows (the history that multistep
solvers use) and z the sample's fresh noise (runtime.noise; z_slot -1: none). A row with calls_net False only
rescales and adds noise (x = w_x x + sigma z), as a forward jump does. DDPM (Ho et al. 2020) and DDIM (Song et al.
2021) only differ in the table; the eager reference (runtime.eager) and the preallocated runtime (runtime.runner)
run the same plan with the same noise. Classifier-free guidance, when asked for, is applied on the rows where
`cfg` is True; the other rows run the conditional model alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from .schedule import Schedule

SAMPLERS = ("ddpm", "ddim")
DEFAULT_STEPS = 50


@dataclass(frozen=True)
class Plan:
    name: str
    timesteps: np.ndarray   # (S,) int64: the network's t at row i (decreasing)
    x0_x: np.ndarray        # x0_hat = x0_x x - x0_eps eps: 1/sqrt(abar_t)
    x0_eps: np.ndarray      #                              sqrt(1/abar_t - 1)
    w_x: np.ndarray         # weight of the current x in the next x
    w_x0: np.ndarray        # weight of this row's x0_hat in the next x
    w_x0_prev: np.ndarray   # weight of the previous network row's x0_hat (multistep solvers)
    w_x0_prev2: np.ndarray  # weight of the x0_hat two network rows back (multistep solvers)
    sigma: np.ndarray       # std of the fresh noise added at row i
    abar_next: np.ndarray   # abar of the noise level reached after row i (1 after the last): for editing
    z_slot: np.ndarray      # (S,) int64: which of the sample's noise slots row i adds (-1: none); see runtime.noise
    cfg: np.ndarray         # (S,) bool: apply classifier-free guidance at row i (else the conditional model alone)
    calls_net: np.ndarray   # (S,) bool: row i evaluates the network (False: a rescale-and-noise row)
    clip: bool = True       # clip x0_hat to [-1, 1] (the data range)

    @classmethod
    def make(cls, name: str, timesteps, x0_x, x0_eps, w_x, w_x0, sigma, abar_next, clip: bool = True,
             w_x0_prev=None, w_x0_prev2=None, cfg=None, calls_net=None) -> "Plan":
        """A plan from its columns; the history weights default to 0, cfg and calls_net to True, and the noise slots
        are numbered in row order over the rows with sigma > 0."""
        S = len(timesteps)
        f64 = lambda v: np.zeros(S) if v is None else np.asarray(v, dtype=np.float64)
        sigma = f64(sigma)
        z_slot = np.where(sigma > 0, np.cumsum(sigma > 0) - 1, -1).astype(np.int64)
        flag = lambda v: np.ones(S, dtype=bool) if v is None else np.asarray(v, dtype=bool)
        plan = cls(name, np.asarray(timesteps, dtype=np.int64), f64(x0_x), f64(x0_eps), f64(w_x), f64(w_x0),
                   f64(w_x0_prev), f64(w_x0_prev2), sigma, f64(abar_next), z_slot, flag(cfg), flag(calls_net), clip)
        return plan.validate()

    def validate(self) -> "Plan":
        S = len(self.timesteps)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and v.shape != (S,):
                raise ValueError(f"plan column {f.name} has shape {v.shape}, expected ({S},)")
            if isinstance(v, np.ndarray) and v.dtype == np.float64 and not np.isfinite(v).all():
                raise ValueError(f"plan column {f.name} is not finite")
        if S == 0:
            raise ValueError("a plan needs at least one row")
        if (self.sigma < 0).any():
            raise ValueError("sigma must be >= 0")
        return self

    @property
    def steps(self) -> int:
        """Rows of the plan (the progress bar's unit)."""
        return len(self.timesteps)

    @property
    def calls(self) -> int:
        """Network evaluations per sample (twice that in images when guided)."""
        return int(self.calls_net.sum())

    @property
    def num_slots(self) -> int:
        """Noise slots the plan draws per sample, besides x_T (runtime.noise)."""
        return int(self.z_slot.max()) + 1 if (self.z_slot >= 0).any() else 0

    @property
    def stochastic(self) -> bool:
        return self.num_slots > 0

    @property
    def history(self) -> int:
        """How many earlier x0_hat predictions the rows read (0, 1 or 2)."""
        return 2 if self.w_x0_prev2.any() else 1 if self.w_x0_prev.any() else 0

    def with_cfg(self, cfg) -> "Plan":
        return replace(self, cfg=np.asarray(cfg, dtype=bool)).validate()


def _check_top(T: int, top) -> int:
    if top is None:
        return T - 1
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 0 <= top <= T - 1:
        raise ValueError(f"the starting timestep must be an integer in 0..{T - 1}, got {top!r}")
    return int(top)


def ddpm_plan(sched: Schedule, variance: str = "small", clip: bool = True, top: int | None = None) -> Plan:
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2 in its x0-parameterised form).

    top: start from x_top instead of x_{T-1} (rows t = top..0: a plan truncated for editing, runtime.edits)."""
    if variance not in ("small", "large"):
        raise ValueError("variance must be 'small' (beta~_t) or 'large' (beta_t)")
    top = _check_top(sched.T, top)
    t = np.arange(top, -1, -1)
    # 1. x0_hat = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps                            (eq. 15)
    # 2. mu~(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t                                 (eq. 7)
    # 3. x_{t-1} = mu~ + sigma_t z, sigma_t^2 = beta~_t ("fixed small") or beta_t ("fixed large"); z = 0 at t = 0
    var = sched.posterior_variance[t] if variance == "small" else sched.betas[t]
    sigma = np.where(t > 0, np.sqrt(var), 0.0)
    name = f"ddpm-{variance}" + ("" if top == sched.T - 1 else f"-from{top}")
    return Plan.make(name, t, sched.sqrt_recip_alphas_cumprod[t], sched.sqrt_recipm1_alphas_cumprod[t],
                     w_x=sched.posterior_mean_coef2[t], w_x0=sched.posterior_mean_coef1[t], sigma=sigma,
                     abar_next=sched.alphas_cumprod_prev[t], clip=clip)


def ddim_timesteps(T: int, steps: int, top: int | None = None) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], both ends included, decreasing.

    top: the grid truncated for editing, starting at t = top: top itself, then the grid's points below it."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in 1..{T}, got {steps}")
    top = _check_top(T, top)
    if steps == 1:
        grid = np.array([T - 1], dtype=np.int64)
    else:
        grid = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1].copy()
    return grid if top == T - 1 else np.concatenate([[top], grid[grid < top]]).astype(np.int64)


def ddim_plan(sched: Schedule, steps: int = DEFAULT_STEPS, eta: float = 0.0, clip: bool = True,
              top: int | None = None) -> Plan:
    """DDIM (Song et al. 2021) on a subsequence of timesteps; eta=0 deterministic, eta=1 DDPM-like.

    top: start from x_top (ddim_timesteps' truncated grid: a plan for editing, runtime.edits)."""
    if not 0.0 <= eta <= 1.0:   # also refuses NaN
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    t = ddim_timesteps(sched.T, steps, top)
    ab = sched.alphas_cumprod[t]
    ab_prev = np.append(sched.alphas_cumprod[t[1:]], 1.0)
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                              (DDIM eq. 12, "predicted x0")
    # 2. sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)         (eq. 16)
    # 3. x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps' + sigma z     (eq. 12)
    #    with eps' = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), the noise that is consistent with x0_hat: equal to
    #    eps when x0_hat is not clipped; when it is, the direction term does not re-inject what clipping removed
    #    (that leak made guided samples blobby). Folded into the table: x_prev = w_x0 x0_hat + w_x x_t + sigma z.
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    dir_ = np.sqrt(np.clip(1 - ab_prev - sigma ** 2, 0.0, None))
    w_x = dir_ / np.sqrt(1 - ab)
    w_x0 = np.sqrt(ab_prev) - w_x * np.sqrt(ab)
    name = f"ddim{steps}-eta{eta:g}" + ("" if t[0] == sched.T - 1 else f"-from{t[0]}")
    return Plan.make(name, t, 1 / np.sqrt(ab), np.sqrt(1 / ab - 1), w_x=w_x, w_x0=w_x0,
                     sigma=sigma, abar_next=ab_prev, clip=clip)


def default_steps(T: int) -> int:
    """The default number of steps of the few-step samplers: DEFAULT_STEPS, or T for a model with fewer."""
    return min(DEFAULT_STEPS, T)


def make_plan(sched: Schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
              variance: str = "small", top: int | None = None) -> Plan:
    """The plan of a sampler by name (SAMPLERS); steps None: its default; top: start at t = top (editing).
    ValueError for what does not fit."""
    if sampler == "ddpm":
        if steps not in (None, sched.T):
            raise ValueError(f"the DDPM sampler runs all T={sched.T} steps; use --sampler ddim for fewer")
        return ddpm_plan(sched, variance, top=top)
    if sampler == "ddim":
        return ddim_plan(sched, steps or default_steps(sched.T), eta, top=top)
    raise ValueError(f"unknown sampler {sampler!r} ({' or '.join(SAMPLERS)})")
