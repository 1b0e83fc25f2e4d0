"""Diffusion schedule tables, computed once in float64 (numpy) and cast by whoever consumes them.

Used by training (q(x_t|x_0)), the samplers, and the exporter (which writes the tables into the export metadata).
Notation of Ho et al. 2020 (arXiv 2006.11239): alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, with t = 0..T-1
here (the paper's t = 1..T shifted by one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("linear", "cosine")   # what `ddpm train` offers
# every beta recipe a model may name (make_betas): SCHEDULES, and those of diffusers' schedulers a model imported from
# a diffusers folder may have (model/diffusers.py)
RECIPES = SCHEDULES + ("scaled_linear", "table")
MAX_T = 100_000   # diffusion steps: the tables are 13 float64 arrays of T (10 MB at this T; this project uses 1000)
# What the network predicts: the noise eps (Ho et al. 2020) or the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
# (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D).
PREDICTIONS = ("eps", "v")


# The least abar_T = prod(1 - beta_t) a schedule may reach: its last noise level sigma_T = sqrt((1 - abar_T) / abar_T)
# is then at most 1e15, and the plans' float32 coefficients (1 / sqrt(abar) and the like) stay far from overflow. The
# schedules of this project and diffusers' reach 4e-5 (linear) and 2e-13 (cosine at T = 100000).
MIN_ABAR = 1e-30


def make_betas(name: str, T: int, beta_range: tuple[float, float] | None = None, betas=None) -> np.ndarray:
    """beta_t, t = 0..T-1, float64, of the schedule `name` (RECIPES), checked (check_abar):

        linear         beta_range None: DDPM's 1e-4 .. 0.02, rescaled by 1000/T; else (beta_start, beta_end) as given
        scaled_linear  sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) (diffusers' "scaled_linear")
        cosine         Nichol & Dhariwal 2021 (diffusers' "squaredcos_cap_v2")
        table          `betas` themselves (diffusers' trained_betas)

    ValueError for an unknown name, a recipe without what it needs (a table of T betas in (0, 1); scaled_linear
    needs beta_range), or betas whose abar_T is below MIN_ABAR."""
    return check_abar(_betas(name, T, beta_range, betas))


def check_abar(betas: np.ndarray) -> np.ndarray:
    """`betas` (float64, in (0, 1)) when abar_T = prod(1 - beta_t) is at least MIN_ABAR; ValueError (one line) when
    less (e.g. diffusers' default linear betas 1e-4 .. 0.02 over T = 100000, not rescaled: abar_T = 10^-434, 0 in
    float64), before any table is computed from them."""
    log10_abar = float(np.log1p(-betas).sum()) / math.log(10)
    if not log10_abar >= math.log10(MIN_ABAR):
        raise ValueError(f"the schedule's abar_T = prod(1 - beta_t) is 10^{log10_abar:.0f}, below {MIN_ABAR:g}: its "
                         f"last noise level sigma_T = sqrt((1 - abar_T) / abar_T) is past what float32 sampling can "
                         f"follow (give fewer or smaller betas)")
    return betas


def _betas(name: str, T: int, beta_range: tuple[float, float] | None, betas) -> np.ndarray:
    """make_betas before its check."""
    if name == "table":
        b = np.asarray(betas if betas is not None else [], dtype=np.float64)
        if b.shape != (T,) or not ((b > 0) & (b < 1)).all():
            raise ValueError(f"a table schedule needs {T} betas in (0, 1)")
        return b.copy()
    if betas is not None:
        raise ValueError(f"betas are given for the {name!r} schedule; only a table schedule takes them")
    if name == "linear" and beta_range is None:
        # DDPM paper section 4: beta linear from 1e-4 to 0.02 over T=1000 steps (rescaled by 1000/T for other T,
        # as in Nichol & Dhariwal 2021, and clipped at 0.999 so that abar_t never reaches 0 for tiny T).
        scale = 1000.0 / T
        return np.clip(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64), 0.0, 0.999)
    if name in ("linear", "scaled_linear"):
        if beta_range is None:
            raise ValueError(f"the {name} schedule needs beta_range (beta_start, beta_end)")
        lo, hi = (float(v) for v in beta_range)
        if not (0 < lo < 1 and 0 < hi < 1):
            raise ValueError(f"beta_range must lie in (0, 1), got {lo:g}, {hi:g}")
        # diffusers' DDPMScheduler: linspace(beta_start, beta_end, T), or for scaled_linear
        # linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Stable Diffusion's schedule); not rescaled with T
        if name == "linear":
            return np.linspace(lo, hi, T, dtype=np.float64)
        return np.linspace(math.sqrt(lo), math.sqrt(hi), T, dtype=np.float64) ** 2
    if beta_range is not None:
        raise ValueError(f"beta_range is given for the {name!r} schedule, which does not use it")
    if name == "cosine":
        # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008;
        # beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999.
        s = 0.008
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(RECIPES)}")


@dataclass(frozen=True)
class Schedule:
    name: str
    T: int
    betas: np.ndarray                          # beta_t
    alphas: np.ndarray                         # alpha_t = 1 - beta_t
    alphas_cumprod: np.ndarray                 # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: np.ndarray            # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: np.ndarray            # sqrt(abar_t): q(x_t|x_0) mean factor (eq. 4)
    sqrt_one_minus_alphas_cumprod: np.ndarray  # sqrt(1 - abar_t): q(x_t|x_0) std (eq. 4)
    sqrt_recip_alphas_cumprod: np.ndarray      # 1/sqrt(abar_t): x0 = x_t/sqrt(abar_t) - ...
    sqrt_recipm1_alphas_cumprod: np.ndarray    # sqrt(1/abar_t - 1): ... - sqrt(1/abar_t - 1) eps   (eq. 15)
    posterior_variance: np.ndarray             # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)   (eq. 7)
    posterior_log_variance_clipped: np.ndarray  # log beta~_t, with beta~_0 (= 0) replaced by beta~_1
    posterior_mean_coef1: np.ndarray           # mu~ = coef1 x_0 + coef2 x_t: beta_t sqrt(abar_{t-1}) / (1 - abar_t)
    posterior_mean_coef2: np.ndarray           # (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)   (eq. 7)
    prediction: str = "eps"                    # the network's output: eps or v (PREDICTIONS)

    @classmethod
    def make(cls, name: str = "linear", T: int = 1000, prediction: str = "eps",
             beta_range: tuple[float, float] | None = None, betas=None) -> "Schedule":
        """The tables of the beta schedule `name` (RECIPES; beta_range, betas: make_betas) with T steps, for a
        network that predicts `prediction` (PREDICTIONS). ValueError for T outside 2..MAX_T, an unknown name or
        prediction, or a recipe make_betas refuses."""
        if not 2 <= T <= MAX_T:
            raise ValueError(f"T must be in 2..{MAX_T}, got {T}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
        betas = make_betas(name, T, beta_range, betas)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            name=name, T=T, betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            prediction=prediction,
        )

    @classmethod
    def of(cls, cfg) -> "Schedule":
        """The schedule a model was trained with: its config's (model.config.ModelConfig) schedule, T, prediction
        and beta recipe (beta_range, betas)."""
        return cls.make(cfg.schedule, cfg.timesteps, cfg.prediction, cfg.beta_range, cfg.betas)

    @classmethod
    def from_betas(cls, name: str, betas, prediction: str = "eps") -> "Schedule":
        """Rebuild from stored betas (export metadata), checking they are what `name` gives."""
        betas = np.asarray(betas, dtype=np.float64)
        sched = cls.make(name, len(betas), prediction)
        if not np.allclose(sched.betas, betas, rtol=1e-6, atol=1e-12):
            raise ValueError(f"stored betas do not match the {name!r} schedule with T={len(betas)}")
        return sched


def x0_coefficients(abar, prediction: str = "eps") -> tuple[np.ndarray, np.ndarray]:
    """(c_x, c_out), float64 arrays shaped like abar, with x0_hat = c_x x_t - c_out out for the network output `out`
    at a noise level abar_t (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps):

        eps:  x0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps          (Ho et al. 2020, eq. 15)
        v:    x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v                 (Salimans & Ho 2022, appendix D)

    ValueError for an unknown prediction."""
    abar = np.asarray(abar, dtype=np.float64)
    if prediction == "eps":
        return 1.0 / np.sqrt(abar), np.sqrt(1.0 / abar - 1.0)
    if prediction == "v":
        return np.sqrt(abar), np.sqrt(1.0 - abar)
    raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
