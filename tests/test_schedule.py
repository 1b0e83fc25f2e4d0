import math

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
    # hand-computed from Nichol & Dhariwal 2021 eq. 17: abar_t = f(t+1)/f(0) (t = 0..T-1 is the paper's t+1),
    # f(u) = cos^2(((u/T + 0.008)/1.008) pi/2); the last beta (abar reaches 0) is clipped at 0.999
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 1, 499, 998):
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas[0] == pytest.approx(1 - f(1) / f(0), rel=1e-9) and s.betas[-1] == 0.999
    assert np.all(s.betas > 0) and np.all(s.betas <= 0.999)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alphas_cumprod[0] > 0.9999 and s.alphas_cumprod[-1] < 1e-4
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule.make("quadratic", 10)


def test_from_betas_checks_consistency():
    s = Schedule.make("linear", 100)
    assert np.array_equal(Schedule.from_betas("linear", s.betas).alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError, match="stored betas do not match the 'cosine' schedule with T=100"):
        Schedule.from_betas("cosine", s.betas)
    nudged = s.betas.copy()
    nudged[50] *= 1 + 1e-4   # one beta off by 1e-4 relative: not the linear schedule either
    with pytest.raises(ValueError, match="do not match the 'linear' schedule"):
        Schedule.from_betas("linear", nudged)


def test_training_timesteps_cover_full_range():
    """t ~ U{0..T-1}: t=0 and t=T-1 are both drawn (catches randint(1, T) off-by-ones)."""
    T = 10
    cfg = TrainConfig(batch_size=64, timesteps=T)
    images, labels = torch.zeros(640, 28, 28, dtype=torch.uint8), torch.zeros(640, dtype=torch.long)
    order = BatchOrder(640, 64, 0)
    seen = torch.cat([make_batch(s, cfg, order, images, labels, T, 10)[2] for s in range(20)])
    assert set(seen.tolist()) == set(range(T))


def test_diffusion_loss_noises_x0_by_q_and_regresses_the_noise():
    """diffusion_loss feeds the network x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps (q(x_t|x0), DDPM eq. 4): over many
    eps it has mean sqrt(abar_t) x0 and std sqrt(1-abar_t) at every t. The loss is E||eps - eps_hat||^2 (eq. 14): 0
    for a network that recovers eps from x_t, E[eps^2] = 1 for one that answers 0; with v-prediction its target is
    v = sqrt(abar_t) eps - sqrt(1-abar_t) x0, so E[v^2] = abar_t + (1-abar_t) x0^2 for the network that answers 0."""
    from ddpm.train.loop import diffusion_loss

    s = Schedule.make("linear", 1000)
    sa = torch.tensor(s.sqrt_alphas_cumprod, dtype=torch.float32)
    s1 = torch.tensor(s.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    seen = []

    def zero(x_t, t, y):   # records what the network is given
        seen.append(x_t)
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    n = 4096
    x0, y = torch.full((n, 1, 8, 8), 0.7), torch.zeros(n, dtype=torch.long)
    for t in (0, 250, 999):
        tt = torch.full((n,), t)
        eps = torch.randn(x0.shape, generator=g)
        abar = s.alphas_cumprod[t]
        loss = diffusion_loss(zero, x0, y, tt, eps, sa, s1).item()
        x_t = seen[-1].double()
        assert x_t.mean().item() == pytest.approx(0.7 * math.sqrt(abar), abs=4e-3)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=1e-2)
        assert torch.allclose(seen[-1], sa[t] * x0 + s1[t] * eps)
        assert loss == pytest.approx(eps.pow(2).mean().item(), rel=1e-6) and loss == pytest.approx(1.0, rel=1e-2)
        v_loss = diffusion_loss(zero, x0, y, tt, eps, sa, s1, prediction="v").item()
        assert v_loss == pytest.approx(abar + (1 - abar) * 0.49, rel=2e-2)
        # networks that know x0 and so recover eps (or v) from x_t exactly
        eps_of = lambda x_t, t_: (x_t - sa[t_].view(-1, 1, 1, 1) * x0) / s1[t_].view(-1, 1, 1, 1)
        v_of = lambda x_t, t_: sa[t_].view(-1, 1, 1, 1) * eps_of(x_t, t_) - s1[t_].view(-1, 1, 1, 1) * x0
        assert diffusion_loss(lambda x_t, t_, y_: eps_of(x_t, t_), x0, y, tt, eps, sa, s1).item() < 1e-6
        assert diffusion_loss(lambda x_t, t_, y_: v_of(x_t, t_), x0, y, tt, eps, sa, s1, prediction="v").item() < 1e-6
