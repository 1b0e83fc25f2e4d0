"""Samplers as tables: every reverse process here is a `Plan`, one row of coefficients per step (numpy only).

A row i that calls the network (all rows of the samplers here) computes, from the state x and the network's output
out = net(x, t_i) (the noise eps, or the velocity v for a v-prediction model: the plan's `prediction`):

    x0_hat_i = x0_x[i] * x - x0_out[i] * out                  (predicted clean image; clipped to [-1, 1] if plan.clip)
    x        = w_x[i] * x + w_x0[i] * x0_hat_i + w_x0_prev[i] * x0_hat_{i-1} + w_x0_prev2[i] * x0_hat_{i-2}
               + sigma[i] * z[z_slot[i]]

where x0_hat_{i-1}, x0_hat_{i-2} are the predictions of the previous network rows (the history that multistep
solvers use) and z the sample's fresh noise (runtime.noise; z_slot -1: none). A row with calls_net False only
rescales and adds noise (x = w_x x + sigma z), as a forward jump does. DDPM (Ho et al. 2020), DDIM (Song et al.
2021), DPM-Solver++(2M) (Lu et al. 2022) and UniPC-2 (Zhao et al. 2023) only differ in the table; the eager
reference (runtime.eager) and the preallocated runtime (runtime.runner) run the same plan with the same noise.
Classifier-free guidance, when asked for, is applied on the rows where `cfg` is True; the other rows run the
conditional model alone (`Plan.with_guidance_interval`). On those rows the guided output can be rescaled towards
the conditional output's spread (`Plan.with_guidance_rescale`, Lin et al. 2024, eq. 15-16):

    out = out_cfg (1 + phi (std(out_c) / std(out_cfg) - 1)),   std over each sample's C*H*W values

(phi = plan.guidance_rescale; 0: no rescale, 1: the full rescale; diffusers' `rescale_noise_cfg`, written so that
an unguided row, where out_cfg is out_c, is multiplied by exactly 1).

Notation of the solvers (Lu et al. 2022, sec. 2): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), the half
log-SNR lambda_t = log(alpha_t / sigma_t), and the noise level of Karras et al. / Kynkaanniemi et al.
sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) (`Plan.noise_level`).

The final denoising row (`final_t` of the multistep solvers): a solver's output is the x0_hat of its last network
call, x0_hat = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps_hat (Ho et al. 2020, eq. 15), so the network's eps error
reaches the image multiplied by that call's noise level sqrt(1/abar_t - 1): 0.43 at t = 124, the last call of the
trailing 8-step grid, where the shipped model's eps error on MNIST's black frame (0.027 rms) becomes 1.5 grey levels
rms, and its positive half (the clip to [-1, 1] removes the other) the border haze that bench/haze.py measures. With
final_t the last grid row steps to t = final_t instead of to x0, first order (the DDIM step: no extrapolation over
that long interval), and one more network call there gives the output: the last evaluation at a small noise level,
as Karras et al. 2022 end at sigma_min (Algorithm 1) and DDPM at t = 0. It costs one network call per sample.

Every builder writes its rows in terms of x and x0_hat and gives abar_t of each row; `Plan.make` derives the x0_x and
x0_out columns from abar_t and the prediction (runtime.schedule.x0_coefficients), so a v-prediction model runs every
sampler, edit and engine with no other change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from ..errors import OptionError

from .schedule import PREDICTIONS, Schedule, x0_coefficients

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "unipc")
SPACINGS = ("linspace", "trailing", "logsnr")
DEFAULT_STEPS = 50                                   # DDIM
DEFAULT_SOLVER_STEPS = 8                             # DPM-Solver++(2M), UniPC (bench/sweep)
DEFAULT_SPACING = {"ddim": "linspace", "dpm++2m": "trailing", "unipc": "trailing"}


@dataclass(frozen=True)
class Plan:
    name: str
    timesteps: np.ndarray   # (S,) int64: the network's t at row i (decreasing)
    abar: np.ndarray        # abar_t of the row's t: the noise level of the state the row starts from
    x0_x: np.ndarray        # x0_hat = x0_x x - x0_out out: eps: 1/sqrt(abar_t), v: sqrt(abar_t)
    x0_out: np.ndarray      #                               eps: sqrt(1/abar_t - 1), v: sqrt(1 - abar_t)
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
    prediction: str = "eps" # what the network outputs: eps or v (runtime.schedule.PREDICTIONS)
    guidance_rescale: float = 0.0   # phi: rescale the guided output on cfg rows (module docstring); 0: off

    @classmethod
    def make(cls, name: str, timesteps, abar, w_x, w_x0, sigma, abar_next, prediction: str = "eps",
             clip: bool = True, w_x0_prev=None, w_x0_prev2=None, cfg=None, calls_net=None,
             guidance_rescale: float = 0.0) -> "Plan":
        """A plan from its columns: (S,) arrays, abar the abar_t of each row's t in (0, 1]. The x0 columns come
        from abar and `prediction` (runtime.schedule.x0_coefficients) on the rows that call the network, 0 on the
        others; the history weights default to 0, cfg and calls_net to True, and the noise slots are numbered in
        row order over the rows with sigma > 0. ValueError for columns of other lengths or non-finite values."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
        S = len(timesteps)
        f64 = lambda v: np.zeros(S) if v is None else np.asarray(v, dtype=np.float64)
        sigma, abar = f64(sigma), f64(abar)
        z_slot = np.where(sigma > 0, np.cumsum(sigma > 0) - 1, -1).astype(np.int64)
        flag = lambda v: np.ones(S, dtype=bool) if v is None else np.asarray(v, dtype=bool)
        calls_net = flag(calls_net)
        if abar.shape != (S,) or not ((abar > 0) & (abar <= 1)).all():
            raise ValueError("plan column abar must hold one abar_t in (0, 1] per row")
        x0_x, x0_out = (np.where(calls_net, c, 0.0) for c in x0_coefficients(abar, prediction))
        plan = cls(name, np.asarray(timesteps, dtype=np.int64), abar, x0_x, x0_out, f64(w_x), f64(w_x0),
                   f64(w_x0_prev), f64(w_x0_prev2), sigma, f64(abar_next), z_slot, flag(cfg), calls_net, clip,
                   prediction, float(guidance_rescale))
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
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
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
    def noise_level(self) -> np.ndarray:
        """(S,) float64 sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) of each row: the noise level in the units of
        Karras et al. 2022 (the guidance interval's axis)."""
        return np.sqrt(1.0 / self.abar - 1.0)

    @property
    def history(self) -> int:
        """How many earlier x0_hat predictions the rows read (0, 1 or 2)."""
        return 2 if self.w_x0_prev2.any() else 1 if self.w_x0_prev.any() else 0

    def with_cfg(self, cfg) -> "Plan":
        return replace(self, cfg=np.asarray(cfg, dtype=bool)).validate()

    def with_guidance_interval(self, lo: float, hi: float) -> "Plan":
        """Guidance only on the rows whose noise level sigma = sqrt((1 - abar_t)/abar_t) lies in (lo, hi]
        (Kynkaanniemi et al. 2024, eq. 4; sigma in the units of Karras et al. 2022). The other rows run the
        conditional model alone. lo >= 0, hi > lo (hi may be inf); ValueError otherwise."""
        if not (0 <= lo < hi):   # also refuses NaN
            raise OptionError(f"the guidance interval needs 0 <= lo < hi, got ({lo}, {hi}]", "guidance_interval")
        level = self.noise_level
        inside = (level > lo) & (level <= hi)
        return replace(self, name=f"{self.name}-gi{lo:g}-{hi:g}", cfg=inside & self.cfg).validate()

    def with_guidance_rescale(self, phi: float) -> "Plan":
        """The guided output rescaled on the guided rows (Lin et al. 2024, "Common Diffusion Noise Schedules and
        Sample Steps are Flawed", eq. 15-16; the module docstring's formula): phi in [0, 1], 0 the plan itself,
        0.7 the paper's choice. It counters the over-exposure of strong guidance; without guidance (w = 0, or no
        label) it changes nothing. OptionError outside [0, 1]."""
        if not 0.0 <= phi <= 1.0:   # also refuses NaN
            raise OptionError(f"the guidance rescale must be in [0, 1], got {phi}", "guidance_rescale")
        if phi == 0:
            return self
        return replace(self, name=f"{self.name}-gr{phi:g}", guidance_rescale=float(phi)).validate()


def _check_top(T: int, top) -> int:
    """The starting timestep of a plan truncated for editing (None: T-1). ValueError outside 0..T-1."""
    if top is None:
        return T - 1
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 0 <= top <= T - 1:
        raise OptionError(f"top (the starting timestep) must be an integer in 0..{T - 1}, got {top!r}", "top")
    return int(top)


def _from(top: int, T: int) -> str:
    return "" if top == T - 1 else f"-from{top}"


def ddpm_plan(sched: Schedule, variance: str = "small", clip: bool = True, top: int | None = None) -> Plan:
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2 in its x0-parameterised form).

    top: start from x_top instead of x_{T-1} (rows t = top..0: a plan truncated for editing, runtime.edits)."""
    if variance not in ("small", "large"):
        raise OptionError("variance must be 'small' (beta~_t) or 'large' (beta_t)", "variance")
    top = _check_top(sched.T, top)
    t = np.arange(top, -1, -1)
    # 1. x0_hat = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps                            (eq. 15)
    # 2. mu~(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t                                 (eq. 7)
    # 3. x_{t-1} = mu~ + sigma_t z, sigma_t^2 = beta~_t ("fixed small") or beta_t ("fixed large"); z = 0 at t = 0
    var = sched.posterior_variance[t] if variance == "small" else sched.betas[t]
    sigma = np.where(t > 0, np.sqrt(var), 0.0)
    name = f"ddpm-{variance}{_from(top, sched.T)}"
    return Plan.make(name, t, sched.alphas_cumprod[t], w_x=sched.posterior_mean_coef2[t],
                     w_x0=sched.posterior_mean_coef1[t], sigma=sigma, abar_next=sched.alphas_cumprod_prev[t],
                     prediction=sched.prediction, clip=clip)


def ddim_timesteps(T: int, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], both ends included, decreasing."""
    if not 1 <= steps <= T:
        raise OptionError(f"DDIM steps must be in 1..{T}, got {steps}", "steps")
    if steps == 1:
        return np.array([T - 1], dtype=np.int64)
    return np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1].copy()


def half_log_snr(abar: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2 (Lu et al. 2022, sec. 2), float64."""
    abar = np.asarray(abar, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def timesteps(sched: Schedule, steps: int, spacing: str = "linspace", top: int | None = None) -> np.ndarray:
    """The network's timesteps of a few-step sampler, (steps,) int64, strictly decreasing from T-1; with top (a plan
    truncated for editing, runtime.edits): top itself, then the points of that grid below it.

    linspace  evenly spread over [0, T-1], both ends included: the last call is at t = 0 (DDIM's spacing, Song et
              al. 2021, sec. 4.2 / appendix D.2; `ddim_timesteps`)
    trailing  round(T - k T/steps) - 1 for k = 0..steps-1: the last call is at t ~ T/steps - 1, and the last row lands
              on x0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2;
              diffusers' timestep_spacing="trailing")
    logsnr    evenly spread in lambda_t over [lambda_{T-1}, lambda_0], both ends included (Lu et al. 2022, DPM-Solver
              sec. 3.3, "logSNR" steps; diffusers' use_lu_lambdas), each rounded to the nearest integer t (the
              network takes integers; the plan's coefficients use that t's abar); near t = 0, where lambda moves
              fastest, repeats that rounding makes are pushed apart to neighbouring integers.

    ValueError for steps outside 1..T or an unknown spacing.
    """
    T = sched.T
    if not 1 <= steps <= T:
        raise OptionError(f"steps must be in 1..{T}, got {steps}", "steps")
    top = _check_top(T, top)
    if top < T - 1:
        grid = timesteps(sched, steps, spacing)
        return np.concatenate([[top], grid[grid < top]]).astype(np.int64)
    if spacing == "linspace":
        return ddim_timesteps(T, steps)
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].copy()
    if spacing == "logsnr":
        lam = half_log_snr(sched.alphas_cumprod)                 # decreasing in t
        target = np.linspace(lam[-1], lam[0], steps)              # from t = T-1 down to t = 0
        t = np.round(np.interp(-target, -lam, np.arange(T, dtype=np.float64))).astype(np.int64)[::-1]
        t[0], t[-1] = 0, T - 1
        for j in range(1, steps):                                 # increasing order: make every t distinct,
            t[j] = max(t[j], t[j - 1] + 1)                        # pushing repeats up ...
        t[-1] = T - 1
        for j in range(steps - 2, -1, -1):                        # ... and back below T-1 (t[j] >= j stays)
            t[j] = min(t[j], t[j + 1] - 1)
        return t[::-1].copy()
    raise OptionError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}", "spacing")


def ddim_plan(sched: Schedule, steps: int = DEFAULT_STEPS, eta: float = 0.0, clip: bool = True,
              spacing: str = "linspace", top: int | None = None) -> Plan:
    """DDIM (Song et al. 2021) on a subsequence of timesteps (`timesteps`; top: truncated to start at x_top, for
    editing); eta=0 deterministic, eta=1 DDPM-like. The last row lands on x0 (abar = 1)."""
    if not 0.0 <= eta <= 1.0:   # also refuses NaN
        raise OptionError(f"eta must be in [0, 1], got {eta}", "eta")
    t = timesteps(sched, steps, spacing, top)
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
    name = f"ddim{steps}-eta{eta:g}" + ("" if spacing == "linspace" else f"-{spacing}") + _from(int(t[0]), sched.T)
    return Plan.make(name, t, ab, w_x=w_x, w_x0=w_x0, sigma=sigma, abar_next=ab_prev, prediction=sched.prediction,
                     clip=clip)


def final_t_check(final_t, last: int) -> int:
    """final_t as an int when it lies below the grid's last timestep `last` (0 <= final_t < last); OptionError
    (option "final_t") otherwise."""
    if isinstance(final_t, bool) or not isinstance(final_t, (int, np.integer)) or not 0 <= final_t < last:
        raise OptionError(f"the final denoising timestep must be an integer in 0..{last - 1} (below the grid's "
                          f"last timestep {last}), got {final_t!r}", "final_t")
    return int(final_t)


def _final(final_t: int | None) -> str:
    return "" if final_t is None else f"-final{final_t}"


def _solver_grid(sched: Schedule, steps: int, spacing: str, top: int | None = None, final_t: int | None = None):
    """The timesteps of a multistep solver (top: truncated to start there; final_t: one more row at t = final_t
    after them, `final_t_check`) and, for rows i = 0..N-1 and the final target N (x0: alpha 1, sigma 0), alpha,
    sigma and lambda (lambda_N = inf is never used: the final row is written out separately)."""
    t = timesteps(sched, steps, spacing, top)
    if final_t is not None:
        t = np.append(t, final_t_check(final_t, int(t[-1])))
    ab = sched.alphas_cumprod[t]
    alpha = np.append(np.sqrt(ab), 1.0)
    sigma = np.append(np.sqrt(1.0 - ab), 0.0)
    lam = np.append(half_log_snr(ab), np.inf)
    return t, ab, alpha, sigma, lam


def dpmpp_2m_plan(sched: Schedule, steps: int = DEFAULT_SOLVER_STEPS, spacing: str = "trailing",
                  clip: bool = True, top: int | None = None, final_t: int | None = None) -> Plan:
    """DPM-Solver++(2M): multistep, second order, data prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2).

    Row i (network at t_i, state x = x_{t_i}, x0_i its x0_hat) steps to t_{i+1}, or to x0 after the last row:

        h_i = lambda_{t_{i+1}} - lambda_{t_i},   r_i = h_{i-1} / h_i
        D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}             (second order; D_i = x0_i for first order)
        x_{t_{i+1}} = (sigma_{i+1}/sigma_i) x - alpha_{i+1} (e^{-h_i} - 1) D_i

    which is affine in (x, x0_i, x0_{i-1}): w_x = sigma_{i+1}/sigma_i, w_x0 = alpha_{i+1} (1 - e^{-h_i})
    (1 + 1/(2 r_i)), w_x0_prev = -alpha_{i+1} (1 - e^{-h_i}) / (2 r_i). The first row is first order (no
    history yet; Algorithm 2's x~_{t_1}), and so is the last (lower_order_final, as diffusers'
    DPMSolverMultistepScheduler with final_sigmas_type="zero"): it lands on x0 (alpha 1, sigma 0, h = inf), so the
    output is the last row's x0_hat. With clip=False the table equals diffusers' scheduler (solver_order=2,
    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero";
    tests/test_solvers.py). final_t: one more network row at t = final_t, stepped into first order (the module
    docstring's final denoising row). Deterministic: no noise slots. ValueError for steps outside 1..T or an
    unknown spacing.
    """
    t, ab, alpha, sigma, lam = _solver_grid(sched, steps, spacing, top, final_t)
    N = len(t)
    w_x, w_x0, w_prev = np.zeros(N), np.zeros(N), np.zeros(N)
    for i in range(N):
        if i == N - 1:                               # the final row: x0 = x0_hat (sigma_N = 0, e^{-h} = 0)
            w_x0[i] = 1.0
            continue
        h = lam[i + 1] - lam[i]
        phi = -np.expm1(-h)                          # 1 - e^{-h}
        w_x[i] = sigma[i + 1] / sigma[i]
        if i == 0 or (final_t is not None and i == N - 2):   # 1. first order: the DDIM step (Lu et al. eq. 5)
            w_x0[i] = alpha[i + 1] * phi
        else:                                        # 2. second order: D_i of Algorithm 2
            r = (lam[i] - lam[i - 1]) / h
            w_x0[i] = alpha[i + 1] * phi * (1 + 1 / (2 * r))
            w_prev[i] = -alpha[i + 1] * phi / (2 * r)
    abar_next = np.append(ab[1:], 1.0)
    name = f"dpm++2m{steps}-{spacing}{_from(int(t[0]), sched.T)}{_final(final_t)}"
    return Plan.make(name, t, ab, w_x=w_x, w_x0=w_x0, w_x0_prev=w_prev, sigma=None, abar_next=abar_next,
                     prediction=sched.prediction, clip=clip)


def _unipc_b(h: float, rk: float) -> tuple[float, float]:
    """(rho_0, rho_1) of the UniC-2 corrector, B(h) = e^h - 1 ("bh2"), data prediction: the solution of

        [[1, 1], [r_1, 1]] (rho_0, rho_1) = (b_1, b_2),   b_k = k! hh phi_{k+1}(hh) / B(hh),   hh = -h,

    with phi_1(z) = (e^z - 1)/z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z, for the step h = lambda_t - lambda_s > 0 and
    r_1 = (lambda_{s'} - lambda_s) / h of the point s' before s (Zhao et al. 2023, the order conditions of UniC-p,
    for p = 2). Computed as diffusers' multistep_uni_c_bh_update (0.42.1) computes them: h_phi = expm1(hh)/hh - 1
    (= hh phi_2), b_1 = h_phi / B; h_phi <- h_phi/hh - 1/2 (= hh phi_3), b_2 = 2 h_phi / B."""
    hh = -h
    B = np.expm1(hh)
    h_phi_k = np.expm1(hh) / hh - 1.0
    b1 = h_phi_k / B
    h_phi_k = h_phi_k / hh - 0.5
    b2 = 2.0 * h_phi_k / B
    rho0 = (b1 - b2) / (1.0 - rk)
    return rho0, b1 - rho0


def unipc_plan(sched: Schedule, steps: int = DEFAULT_SOLVER_STEPS, spacing: str = "trailing",
               clip: bool = True, top: int | None = None, final_t: int | None = None) -> Plan:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, arXiv 2302.04867): the predictor
    UniP-2 and the corrector UniC, as diffusers' UniPCMultistepScheduler (solver_order=2, solver_type="bh2",
    predict_x0=True, lower_order_final=True, final_sigmas_type="zero") runs them; tests/test_solvers.py checks the
    trajectory against it.

    Write m_i for the x0_hat that the network gives at the state x~_i the runner holds at t_i (the predicted, not
    yet corrected, state: the network's input), h_i = lambda_{i+1} - lambda_i (lambda_{N} = inf: the final target
    x0), B_i = expm1(-h_i), a_i = sigma_{i+1}/sigma_i (0 after the last row). Diffusers' step i:

      1. corrector (UniC, i >= 1; its order p_c is the predictor order of step i-1): from the corrected state
         x^c_{i-1} of the previous step,
             x^c_i = a_{i-1} x^c_{i-1} - alpha_i B_{i-1} m_{i-1} - alpha_i B_{i-1} C_i,
             C_i = (m_i - m_{i-1}) / 2                                   (p_c = 1)
             C_i = rho_0 D_i + rho_1 (m_i - m_{i-1})                     (p_c = 2)
         with D_i = (m_{i-2} - m_{i-1}) / r_i, r_i = (lambda_{i-2} - lambda_{i-1}) / h_{i-1} and (rho_0, rho_1)
         solving [[1, 1], [r_i, 1]] rho = b (`_unipc_b`). It reuses m_i, the network call of this step: it
         costs no extra call.
      2. predictor (UniP, order p_i = 1 at i = 0 and at the last row (lower_order_final), else 2) from x^c_i:
             x~_{i+1} = a_i x^c_i - alpha_{i+1} B_i m_i - alpha_{i+1} B_i P_i,
             P_i = 0 (p_i = 1),   P_i = (m_{i-1} - m_i) / (2 r'_i), r'_i = (lambda_{i-1} - lambda_i) / h_i (p_i = 2)
         (in bh2, UniP-2 is DPM-Solver++(2M)); the last row gives x~_N = m_{N-1}.

    The runner holds x~_i, not x^c_{i-1}. The predictor of step i-1 is x~_i = a_{i-1} x^c_{i-1} - alpha_i B_{i-1}
    m_{i-1} - alpha_i B_{i-1} P_{i-1}, with a_{i-1} != 0 (t_i is not the final target), so

        a_{i-1} x^c_{i-1} - alpha_i B_{i-1} m_{i-1} = x~_i + alpha_i B_{i-1} P_{i-1},   and therefore
        x^c_i = x~_i - alpha_i B_{i-1} (C_i - P_{i-1}),

    where P_{i-1} uses the same h_{i-1}, r_i and D_i as C_i (P_{i-1} = D_i / 2 when p_{i-1} = 2, else 0). Step i
    of the plan is then

        x~_{i+1} = a_i x~_i - a_i alpha_i B_{i-1} (C_i - P_{i-1}) - alpha_{i+1} B_i (m_i + P_i),

    affine in (x~_i, m_i, m_{i-1}, m_{i-2}) -> (w_x, w_x0, w_x0_prev, w_x0_prev2), with w_x = a_i. The corrector of
    the last row is multiplied by a_{N-1} = 0: as in diffusers, the output is the last row's x0_hat. final_t: one
    more network row at t = final_t, its predictor first order (the module docstring's final denoising row).
    Deterministic: no noise slots. ValueError for steps outside 1..T or an unknown spacing.
    """
    t, ab, alpha, sigma, lam = _solver_grid(sched, steps, spacing, top, final_t)
    N = len(t)
    W = np.zeros((N, 3))                             # weights of (m_i, m_{i-1}, m_{i-2}) in x~_{i+1}
    w_x = np.zeros(N)
    order = [1 if i in (0, N - 1) or (final_t is not None and i == N - 2) else 2 for i in range(N)]
    for i in range(N):
        if i == N - 1:                               # the final row lands on x0: x~_N = m_{N-1}
            W[i, 0] = 1.0
            continue
        a = sigma[i + 1] / sigma[i]
        w_x[i] = a
        # 1. the corrector, written relative to x~_i: x^c_i - x~_i = -alpha_i B_{i-1} (C_i - P_{i-1})
        if i >= 1:
            hp = lam[i] - lam[i - 1]
            Bp = np.expm1(-hp)
            if order[i - 1] == 1:                    # C_i = (m_i - m_{i-1})/2, P_{i-1} = 0
                corr = 0.5 * np.array([1.0, -1.0, 0.0])
            else:
                r = (lam[i - 2] - lam[i - 1]) / hp
                D = np.array([0.0, -1.0, 1.0]) / r   # (m_{i-2} - m_{i-1}) / r_i
                rho0, rho1 = _unipc_b(hp, r)
                corr = rho0 * D + rho1 * np.array([1.0, -1.0, 0.0]) - 0.5 * D
            W[i] += a * (-alpha[i] * Bp) * corr
        # 2. the predictor from x^c_i
        h = lam[i + 1] - lam[i]
        B = np.expm1(-h)
        pred = np.array([1.0, 0.0, 0.0])
        if order[i] == 2:
            r = (lam[i - 1] - lam[i]) / h
            pred = pred + 0.5 * np.array([-1.0, 1.0, 0.0]) / r
        W[i] += -alpha[i + 1] * B * pred
    abar_next = np.append(ab[1:], 1.0)
    name = f"unipc{steps}-{spacing}{_from(int(t[0]), sched.T)}{_final(final_t)}"
    return Plan.make(name, t, ab, w_x=w_x, w_x0=W[:, 0], w_x0_prev=W[:, 1], w_x0_prev2=W[:, 2], sigma=None,
                     abar_next=abar_next, prediction=sched.prediction, clip=clip)


def default_steps(T: int, sampler: str = "ddim") -> int:
    """The default number of steps of a few-step sampler (DEFAULT_STEPS for DDIM, DEFAULT_SOLVER_STEPS for the
    multistep solvers), or T for a model with fewer."""
    return min(DEFAULT_STEPS if sampler == "ddim" else DEFAULT_SOLVER_STEPS, T)


def make_plan(sched: Schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
              variance: str = "small", spacing: str | None = None,
              guidance_interval: tuple[float, float] | None = None, top: int | None = None,
              guidance_rescale: float = 0.0, final_t: int | None = None) -> Plan:
    """The plan of a sampler by name (SAMPLERS); steps None: its default; spacing None: the sampler's default
    (DEFAULT_SPACING); guidance_interval (lo, hi): guidance only where sigma in (lo, hi]
    (`Plan.with_guidance_interval`); top: start at x_top, a plan truncated for editing (runtime.edits);
    guidance_rescale phi in [0, 1]: the guided output rescaled (`Plan.with_guidance_rescale`); final_t: one more
    network row at t = final_t after the grid (FINAL_DENOISING; dpm++2m and unipc, whose grid ends above it).
    OptionError (a ValueError naming the argument) for what does not fit: steps outside 1..T, top outside
    0..T-1, an unknown sampler or spacing, DDPM with fewer than T steps or a spacing, a final_t that does not
    fit."""
    if steps is not None and not 1 <= steps <= sched.T:
        raise OptionError(f"steps must be in 1..{sched.T} (the model's T), got {steps}", "steps")
    _check_top(sched.T, top)
    if sampler not in SAMPLERS:
        raise OptionError(f"unknown sampler {sampler!r} ({', '.join(SAMPLERS)})", "sampler")
    if spacing is not None and spacing not in SPACINGS:
        raise OptionError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}", "spacing")
    if final_t is not None and sampler not in ("dpm++2m", "unipc"):
        raise OptionError(f"a final denoising row is for the multistep solvers (dpm++2m, unipc); {sampler}'s last "
                          f"row already calls the network at its grid's last timestep", "final_t")
    if sampler == "ddpm":
        if steps not in (None, sched.T):
            raise OptionError(f"the DDPM sampler runs all T={sched.T} steps; use the ddim sampler for fewer", "steps")
        if spacing not in (None, "linspace"):
            raise OptionError("the DDPM sampler runs every timestep: it has no spacing", "spacing")
        plan = ddpm_plan(sched, variance, top=top)
    else:
        steps = steps or default_steps(sched.T, sampler)
        spacing = spacing or DEFAULT_SPACING[sampler]
        if sampler == "ddim":
            plan = ddim_plan(sched, steps, eta, spacing=spacing, top=top)
        elif sampler == "dpm++2m":
            plan = dpmpp_2m_plan(sched, steps, spacing, top=top, final_t=final_t)
        else:
            plan = unipc_plan(sched, steps, spacing, top=top, final_t=final_t)
    plan = plan if guidance_interval is None else plan.with_guidance_interval(*guidance_interval)
    return plan.with_guidance_rescale(guidance_rescale)
