import numpy as np
import pytest
import torch

from ddpm.runtime.schedule import Schedule
from ddpm.train.loop import BatchOrder, TrainConfig, make_batch


def test_linear_schedule_pinned_values():
    s = Schedule.make("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    # hand-computed: abar_0 = 1 - 1e-4; abar_1 = (1 - 1e-4)(1 - (1e-4 + 0.0199/999))
    b1 = 1e-4 + (0.02 - 1e-4) / 999
    assert s.alphas_cumprod[0] == pytest.approx(0.9999, rel=1e-12)
    assert s.alphas_cumprod[1] == pytest.approx(0.9999 * (1 - b1), rel=1e-12)
    assert s.alphas_cumprod[-1] == pytest.approx(4.0358e-05, rel=1e-3)   # the familiar value for DDPM's schedule
    # posterior variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t): 0 at t=0, then
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_variance[1] == pytest.approx(b1 * (1 - 0.9999) / (1 - 0.9999 * (1 - b1)), rel=1e-12)
    assert s.posterior_log_variance_clipped[0] == pytest.approx(np.log(s.posterior_variance[1]))
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    # posterior mean coefficients reproduce x_{t-1}'s mean for a consistent (x0, x_t) pair (eq. 7)
    t = 500
    assert s.posterior_mean_coef1[t] + s.posterior_mean_coef2[t] * s.sqrt_alphas_cumprod[t] == pytest.approx(
        np.sqrt(s.alphas_cumprod_prev[t]), rel=1e-9)


def test_cosine_schedule():
    s = Schedule.make("cosine", 1000)
    assert np.all(s.betas > 0) and np.all(s.betas <= 0.999)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alphas_cumprod[0] > 0.9999 and s.alphas_cumprod[-1] < 1e-4
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule.make("quadratic", 10)


def test_from_betas_checks_consistency():
    s = Schedule.make("linear", 100)
    assert np.array_equal(Schedule.from_betas("linear", s.betas).alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError):
        Schedule.from_betas("cosine", s.betas)


def test_training_timesteps_cover_full_range():
    """t ~ U{0..T-1}: t=0 and t=T-1 are both drawn (catches randint(1, T) off-by-ones)."""
    T = 10
    cfg = TrainConfig(batch_size=64, timesteps=T)
    images, labels = torch.zeros(640, 28, 28, dtype=torch.uint8), torch.zeros(640, dtype=torch.long)
    order = BatchOrder(640, 64, 0)
    seen = torch.cat([make_batch(s, cfg, order, images, labels, T, 10)[2] for s in range(20)])
    assert set(seen.tolist()) == set(range(T))


def test_q_sample_statistics():
    """x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps has mean sqrt(abar_t) x0 and std sqrt(1-abar_t)."""
    from ddpm.train.loop import diffusion_loss  # noqa: F401  (the loss uses exactly this forward process)

    s = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    for t in (0, 250, 999):
        xt = s.sqrt_alphas_cumprod[t] * x0 + s.sqrt_one_minus_alphas_cumprod[t] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        assert xt.mean().item() == pytest.approx(0.7 * s.sqrt_alphas_cumprod[t], abs=4e-3)
        assert xt.std().item() == pytest.approx(s.sqrt_one_minus_alphas_cumprod[t], rel=1e-2)
