"""Sampler algebra on an exactly known eps-predictor, guidance, the noise stream."""

import numpy as np
import pytest
import torch

from ddpm.model import PRESETS, UNet
from ddpm.runtime.eager import EagerEngine, guided, sample
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.noise import make_noise
from ddpm.runtime.samplers import ddim_plan, ddim_timesteps, ddpm_plan, default_steps, make_plan
from ddpm.runtime.schedule import Schedule
from helpers import MNIST

SCHED = Schedule.make("linear", 1000)
MU, S = 0.3, 0.5   # data distribution N(MU, S^2) per pixel


def gaussian_eps(sched, mu=MU, s=S):
    """The exact eps-predictor E[eps | x_t] for data N(mu, s^2): sqrt(1-abar)/(abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)."""
    def eps_fn(x, t, cfg=True):
        ab = sched.alphas_cumprod[t]
        return (1 - ab) ** 0.5 / (ab * s * s + 1 - ab) * (x - ab ** 0.5 * mu)
    return eps_fn


def closed_form_x0(x_T, sched, mu=MU, s=S):
    """The probability-flow ODE keeps (x_t - sqrt(abar_t) mu) / sqrt(abar_t s^2 + 1 - abar_t) constant."""
    ab = sched.alphas_cumprod[-1]
    return mu + s * (x_T - ab ** 0.5 * mu) / (ab * s * s + 1 - ab) ** 0.5


def test_ddim_eta0_is_exact_for_point_mass_data():
    """For data = MU exactly (s=0), every DDIM step is exact: x_t = sqrt(abar_t) MU + sqrt(1-abar_t)/sqrt(1-abar_T) u_T."""
    x_T = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    u_T = (x_T - SCHED.sqrt_alphas_cumprod[-1] * MU) / SCHED.sqrt_one_minus_alphas_cumprod[-1]
    for steps in (1, 7, 50):
        plan = ddim_plan(SCHED, steps, clip=False)
        seen = []
        out = sample(gaussian_eps(SCHED, s=0.0), x_T, plan, callback=lambda i, t, x, x0: seen.append(x))
        for i, x in enumerate(seen):
            ab = plan.abar_next[i]
            assert torch.allclose(x, ab ** 0.5 * MU + (1 - ab) ** 0.5 * u_T, atol=1e-9)
        assert torch.allclose(out, torch.full_like(out, MU), atol=1e-9)


def test_ddim_eta0_converges_to_closed_form():
    """For s > 0 DDIM discretises the probability-flow ODE: its error shrinks with the number of steps."""
    x_T = torch.randn(256, 1, 2, 2, dtype=torch.float64)
    exact = closed_form_x0(x_T, SCHED)
    errors = [(sample(gaussian_eps(SCHED), x_T, ddim_plan(SCHED, n, clip=False)) - exact).abs().max().item()
              for n in (10, 100, 1000)]
    assert errors[2] < 1e-2 and errors[0] > errors[1] > 3 * errors[2]


def test_ddpm_samples_the_data_distribution():
    """Ancestral sampling with the exact eps lands on N(MU, S^2)."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = lambda slot: torch.randn(x_T.shape, generator=g, dtype=torch.float64)
    out = sample(gaussian_eps(SCHED), x_T, ddpm_plan(SCHED, clip=False), noise)   # clipping would cut N(0.3, 0.5^2)'s tails
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_ddpm_step_statistics():
    """One DDPM step from x_t: mean mu~(x0_hat, x_t) (eq. 7), variance beta~_t."""
    plan = ddpm_plan(SCHED, clip=False)
    i = 400
    t = int(plan.timesteps[i])
    cols = ("timesteps", "abar", "x0_x", "x0_out", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2", "sigma", "abar_next", "z_slot",
            "cfg", "calls_net")
    one = type(plan)(**{**plan.__dict__, **{k: getattr(plan, k)[i:i + 1] for k in cols}})
    x_t = torch.full((100000, 1, 1, 1), 0.4, dtype=torch.float64)
    eps = gaussian_eps(SCHED)
    out = sample(eps, x_t, one)
    x0 = (0.4 - SCHED.sqrt_one_minus_alphas_cumprod[t] * eps(x_t, t)[0].item()) / SCHED.sqrt_alphas_cumprod[t]
    mean = SCHED.posterior_mean_coef1[t] * x0 + SCHED.posterior_mean_coef2[t] * 0.4
    assert out.mean().item() == pytest.approx(mean, abs=3 * (SCHED.posterior_variance[t] / 1e5) ** 0.5 + 1e-9)
    assert out.var().item() == pytest.approx(SCHED.posterior_variance[t], rel=0.02)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_full_equals_ddpm(clip):
    """DDIM with eta=1 over all T steps is DDPM with the "fixed small" variance, table for table, clipping included."""
    sched = Schedule.make("cosine", 100)
    a, b = ddim_plan(sched, 100, eta=1.0, clip=clip), ddpm_plan(sched, clip=clip)
    for k in ("timesteps", "abar", "x0_x", "x0_out", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2", "sigma", "abar_next", "z_slot"):
        assert np.allclose(getattr(a, k), getattr(b, k), rtol=1e-9, atol=1e-12), k
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(8, 1, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(100, 8, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = lambda x, t, cfg: torch.sin(3 * x + t / 50)   # any eps function will do
    assert torch.allclose(sample(eps, x_T, a, lambda i: z[i]), sample(eps, x_T, b, lambda i: z[i]), atol=1e-9)


def test_ddim_direction_uses_noise_consistent_with_clipped_x0():
    """Unclipped, eps' = eps and the table is DDIM eq. 12 as written; clipped, x0 never leaks back via eps."""
    plan = ddim_plan(SCHED, 10)
    i = 3
    ab, ab_prev = float(SCHED.alphas_cumprod[plan.timesteps[i]]), plan.abar_next[i]
    x, eps = torch.tensor([0.3, 2.5], dtype=torch.float64), torch.tensor([-0.2, -0.9], dtype=torch.float64)
    x0 = plan.x0_x[i] * x - plan.x0_out[i] * eps
    assert torch.allclose(x0, (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5, atol=1e-12)   # DDPM eq. 15
    eq12 = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
    assert torch.allclose(plan.w_x0[i] * x0 + plan.w_x[i] * x, eq12, atol=1e-12)
    # clipped: the step is eq. 12 with the clipped x0 and the eps it implies, so nothing of the unclipped x0 remains
    x0c = x0.clamp(-1, 1)
    assert not torch.allclose(x0c, x0)
    eps_c = (x - ab ** 0.5 * x0c) / (1 - ab) ** 0.5
    eq12c = ab_prev ** 0.5 * x0c + (1 - ab_prev) ** 0.5 * eps_c
    assert torch.allclose(plan.w_x0[i] * x0c + plan.w_x[i] * x, eq12c, atol=1e-12)


def test_timesteps_and_plan_errors():
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    assert len(set(ddim_timesteps(1000, 1000).tolist())) == 1000
    assert ddpm_plan(SCHED).sigma[-1] == 0 and ddpm_plan(SCHED).timesteps[-1] == 0
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        ddim_plan(SCHED, 10, eta=1.5)
    with pytest.raises(ValueError):
        ddim_plan(SCHED, 10, eta=float("nan"))
    with pytest.raises(ValueError):
        make_plan(SCHED, "ddpm", steps=10)
    # a model with T < 50: the default step count is T, not an error
    small = Schedule.make("linear", 20)
    assert default_steps(20) == 20 and make_plan(small, "ddim").steps == 20
    # noise slots are numbered over the rows that add noise
    assert ddpm_plan(SCHED).num_slots == 999 and ddim_plan(SCHED, 10).num_slots == 0
    assert ddim_plan(SCHED, 10, eta=1.0).z_slot.tolist() == list(range(9)) + [-1]


def _model(seed=0):
    torch.manual_seed(seed)
    m = UNet(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.slow
def test_guidance():
    m = _model()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond = m(x, torch.full((4,), 300), y)
        uncond = m(x, torch.full((4,), 300), torch.full((4,), 10))
        assert torch.equal(guided(m, y, 10, 0.0)(x, 300), cond)                         # w=0: conditional alone
        assert torch.allclose(guided(m, y, 10, 2.5)(x, 300), cond + 2.5 * (cond - uncond), atol=1e-5)
        assert torch.equal(guided(m, y, 10, 2.5)(x, 300, False), cond)                  # a row outside the interval
        assert torch.equal(guided(m, None, 10, 2.5)(x, 300), uncond)                    # unconditional: null label


@pytest.mark.slow
def test_same_seed_same_digits_across_batch_splits():
    """The noise stream is bit-identical however the samples are split; the images then agree up to the rounding of
    batch-size-dependent convolution sums (at most 1 grey level on a handful of pixels)."""
    full = make_noise(3, 0, 7, 4, MNIST)
    parts = [make_noise(3, lo, n, 4, MNIST) for lo, n in ((0, 3), (3, 3), (6, 1))]
    assert np.array_equal(full[0], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(full[1], np.concatenate([p[1] for p in parts]))
    eng = EagerEngine(_model(), 10)
    plan = ddim_plan(Schedule.make("linear", 100), 4, eta=0.5)    # stochastic: per-step noise matters too
    labels = labels_for(7, None, False)
    a = generate(eng, 7, plan, labels, 1.0, seed=3, batch=7, progress=False, image_shape=MNIST).astype(int)
    b = generate(eng, 7, plan, labels, 1.0, seed=3, batch=3, progress=False, image_shape=MNIST).astype(int)
    c = np.concatenate([generate(eng, 4, plan, labels[:4], 1.0, seed=3, batch=2, progress=False, image_shape=MNIST),
                        generate(eng, 3, plan, labels[4:], 1.0, seed=3, batch=2, start=4, progress=False,
                                 image_shape=MNIST)]).astype(int)
    for other in (b, c):
        diff = np.abs(a - other)
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
    other_seed = generate(eng, 7, plan, labels, 1.0, seed=4, batch=7, progress=False, image_shape=MNIST)
    assert np.abs(a - other_seed).mean() > 20
