"""DPM-Solver++(2M) and UniPC as plans: against diffusers' schedulers, exactness, convergence, spacings, the guidance
interval.

The reference is diffusers (a test-only dependency, the `test` extra; checked with diffusers 0.42.1): its
DPMSolverMultistepScheduler and UniPCMultistepScheduler run on the same schedule and the same deterministic eps
function as our plans, clipping off, and the trajectories must agree step for step.
"""

import numpy as np
import pytest
import torch

from ddpm.runtime.eager import sample
from ddpm.runtime.samplers import (SPACINGS, ddim_plan, dpmpp_2m_plan, half_log_snr, make_plan, timesteps,
                                   unipc_plan)
from ddpm.runtime.schedule import Schedule

from helpers import LazyModule
from test_samplers import MU, closed_form_x0, gaussian_eps   # the Gaussian data whose exact eps is known

diffusers = LazyModule("diffusers")   # the `test` extra

SCHED = Schedule.make("linear", 1000)
SOLVERS = {"dpm++2m": dpmpp_2m_plan, "unipc": unipc_plan}


def wavy_eps(x, t, cfg=True):
    """Any smooth eps function will do for comparing two implementations of one update rule."""
    return 0.5 * torch.sin(2 * x + t / 300.0) + 0.3 * x


class _Float64:
    """Stands in for the `torch` module inside diffusers' DPM-Solver file, so that its `sample.to(torch.float32)`
    keeps float64: the comparison is then of the update rules, not of float32 rounding."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def diffusers_scheduler(sampler, sched, steps, spacing):
    """diffusers' scheduler for our sampler on our schedule; its timesteps, and its sigmas in float64 from our abar
    (diffusers keeps them in float32; the first check is that they are the same numbers)."""
    common = dict(num_train_timesteps=sched.T, beta_start=float(sched.betas[0]), beta_end=float(sched.betas[-1]),
                  beta_schedule="linear", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
                  timestep_spacing="trailing")
    if sampler == "dpm++2m":
        ds = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    else:
        ds = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    ds.set_timesteps(steps)
    if spacing == "trailing":
        t = ds.timesteps.numpy()
        ab = sched.alphas_cumprod[t]
        own = np.sqrt((1 - ab) / ab)
        assert np.allclose(ds.sigmas[:-1].numpy(), own, rtol=2e-5) and ds.sigmas[-1] == 0   # the same schedule
    else:   # diffusers has no spacing with t = 0 included: hand it ours
        t = timesteps(sched, steps, spacing)
        ds.timesteps = torch.from_numpy(t.copy())
        ds.num_inference_steps = len(t)
    ab = sched.alphas_cumprod[t]
    ds.sigmas = torch.from_numpy(np.append(np.sqrt((1 - ab) / ab), 0.0))
    return ds, t


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("T, steps, spacing", [(1000, 1, "trailing"), (1000, 2, "trailing"), (1000, 3, "trailing"),
                                                (1000, 5, "trailing"), (1000, 8, "trailing"), (1000, 20, "trailing"),
                                                (1000, 10, "linspace"), (1000, 10, "logsnr"), (100, 4, "trailing"),
                                                (100, 10, "trailing"), (100, 7, "linspace")])
def test_trajectory_matches_diffusers(monkeypatch, sampler, T, steps, spacing):
    """Every state the network sees, and the output, equal diffusers' to float64 precision."""
    monkeypatch.setattr(diffusers.schedulers.scheduling_dpmsolver_multistep, "torch", _Float64())
    sched = Schedule.make("linear", T)
    ds, t = diffusers_scheduler(sampler, sched, steps, spacing)
    plan = SOLVERS[sampler](sched, steps, spacing, clip=False)
    assert np.array_equal(plan.timesteps, t)
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    seen, x = [], x_T.clone()
    for tt in ds.timesteps:
        seen.append(x.clone())
        x = ds.step(wavy_eps(x, int(tt)), tt, x).prev_sample
    ours = [x_T]
    out = sample(wavy_eps, x_T, plan, callback=lambda i, t, xi, x0: ours.append(xi))
    for i, (a, b) in enumerate(zip(seen, ours)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), f"network input of row {i}"
    assert torch.allclose(out, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "unipc"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_point_mass_data_is_solved_exactly(sampler, spacing):
    """For data = MU exactly every x0_hat is MU, and every row must give the exact ODE state
    x_{t'} = alpha_{t'} MU + (sigma_{t'}/sigma_t)(x_t - alpha_t MU) (w_x, and the x0 weights summing right)."""
    x_T = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2, 3, 9):
        plan = make_plan(SCHED, sampler, steps, spacing=spacing)
        u = (x_T - SCHED.sqrt_alphas_cumprod[-1] * MU) / SCHED.sqrt_one_minus_alphas_cumprod[-1]
        seen = []
        out = sample(gaussian_eps(SCHED, s=0.0), x_T, plan, callback=lambda i, t, x, x0: seen.append(x))
        for i, x in enumerate(seen):
            ab = plan.abar_next[i]
            assert torch.allclose(x, ab ** 0.5 * MU + (1 - ab) ** 0.5 * u, atol=1e-9), (steps, i)
        assert torch.allclose(out, torch.full_like(out, MU), atol=1e-9)


@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_converges_to_the_closed_form_at_second_order(sampler):
    """Gaussian data: the solvers integrate the probability-flow ODE; from 10 to 80 steps (log-SNR spacing, which
    ends at t = 0) the error falls by far more than DDIM's first-order 8x, and it stays well below DDIM's."""
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = closed_form_x0(x_T, SCHED)
    err = lambda plan: (sample(gaussian_eps(SCHED), x_T, plan) - exact).abs().max().item()
    ours = {n: err(SOLVERS[sampler](SCHED, n, "logsnr", clip=False)) for n in (10, 20, 40, 80)}
    ddim = {n: err(ddim_plan(SCHED, n, clip=False, spacing="logsnr")) for n in (10, 20, 40, 80)}
    assert ours[80] < ours[10] / 20 and ddim[80] > ddim[10] / 10
    for n in (20, 40, 80):
        assert ours[n] < ddim[n] / 5, (n, ours[n], ddim[n])


def test_spacings():
    T = SCHED.T
    for steps in (1, 2, 7, 50, 999, 1000):
        for spacing in SPACINGS:
            t = timesteps(SCHED, steps, spacing)
            assert len(t) == steps and t[0] == T - 1 and (np.diff(t) < 0).all() and t[-1] >= 0, (spacing, steps)
    assert timesteps(SCHED, 10, "linspace")[-1] == 0
    assert timesteps(SCHED, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(SCHED, 3, "trailing").tolist() == [999, 666, 332]        # round(1000 - k 1000/3) - 1
    t = timesteps(SCHED, 20, "logsnr")
    lam = half_log_snr(SCHED.alphas_cumprod[t])
    assert t[-1] == 0                                                          # log-SNR spacing ends at t = 0
    step = (lam[-1] - lam[0]) / 19
    # even in lambda up to the rounding of t to integers, which matters only near t = 0 (lambda moves by 0.39
    # from t = 0 to 1, by less than 0.03 per t above t = 20)
    assert np.abs(np.diff(lam)[t[1:] >= 20] - step).max() < 0.05 * step
    with pytest.raises(ValueError, match="spacing"):
        timesteps(SCHED, 10, "leading")
    with pytest.raises(ValueError, match="steps"):
        timesteps(SCHED, 1001, "trailing")


def test_solver_tables():
    for f in SOLVERS.values():
        plan = f(SCHED, 8)
        assert plan.calls == 8 and plan.num_slots == 0 and plan.clip
        assert plan.w_x[-1] == 0 and plan.w_x0[-1] == 1 and plan.abar_next[-1] == 1    # the last row gives x0_hat
        assert plan.w_x0_prev[0] == 0 and plan.w_x0_prev2[:2].tolist() == [0, 0]        # no history before it exists
    assert dpmpp_2m_plan(SCHED, 8).history == 1 and unipc_plan(SCHED, 8).history == 2
    # two steps: first order, then the final row, whose corrector is multiplied by sigma_N/sigma_{N-1} = 0
    assert unipc_plan(SCHED, 2).history == 0 and dpmpp_2m_plan(SCHED, 2).history == 0
    assert unipc_plan(SCHED, 3).history == 1 and unipc_plan(SCHED, 4).history == 2


def test_guidance_interval():
    plan = make_plan(SCHED, "unipc", 10, guidance_interval=(0.28, 5.42))
    level = np.sqrt(1 / SCHED.alphas_cumprod[plan.timesteps] - 1)
    assert plan.cfg.tolist() == ((level > 0.28) & (level <= 5.42)).tolist()
    assert 0 < plan.cfg.sum() < 10 and plan.name.endswith("-gi0.28-5.42")
    assert make_plan(SCHED, "unipc", 10, guidance_interval=(0, float("inf"))).cfg.all()
    assert not make_plan(SCHED, "ddim", 10, guidance_interval=(200, 300)).cfg.any()
    everything_else = make_plan(SCHED, "unipc", 10)
    for k in ("timesteps", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2"):
        assert np.array_equal(getattr(plan, k), getattr(everything_else, k))
    for bad in ((1.0, 1.0), (-1.0, 2.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="guidance interval"):
            plan.with_guidance_interval(*bad)


def test_make_plan_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_plan(SCHED, "heun")
    with pytest.raises(ValueError, match="spacing"):
        make_plan(SCHED, "ddpm", spacing="trailing")
    with pytest.raises(ValueError, match="spacing"):
        make_plan(SCHED, "unipc", spacing="leading")
    assert make_plan(SCHED, "unipc").steps == 8 and make_plan(SCHED, "dpm++2m").steps == 8
    assert make_plan(Schedule.make("linear", 5), "unipc").steps == 5    # T < the default: T steps
