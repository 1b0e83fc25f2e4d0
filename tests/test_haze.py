"""Border haze: a solver's output is the x0_hat of its last network call, so the network's eps error reaches the
image multiplied by that call's noise level; the final denoising row (`final_t`) makes that level small."""

import numpy as np
import pytest
import torch

from ddpm.errors import OptionError
from ddpm.evaluation.metrics import border_share
from ddpm.runtime.eager import sample
from ddpm.runtime.images import to_uint8
from ddpm.runtime.samplers import dpmpp_2m_plan, make_plan, unipc_plan
from ddpm.runtime.schedule import Schedule

SCHED = Schedule.make("linear", 1000)
EPS_ERROR = -0.05   # a network that is wrong by this much on every pixel, everywhere in t


def _black_digits(plan, n=4):
    """The plan's output for data that is all black (x0 = -1 everywhere, so the frame too) from a network whose eps is
    the exact one for that data plus EPS_ERROR: x0_hat = -1 - sqrt(1/abar_t - 1) EPS_ERROR at every row, whatever
    the state, so the output is -1 + noise_level[last call] * 0.05."""
    def eps_fn(x, t, cfg):
        ab = float(SCHED.alphas_cumprod[t])
        return (x + ab ** 0.5) / (1 - ab) ** 0.5 + EPS_ERROR
    x_T = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sample(eps_fn, x_T, plan).float()


@pytest.mark.parametrize("solver", [unipc_plan, dpmpp_2m_plan])
def test_final_denoising_row_keeps_the_eps_error_out_of_the_frame(solver):
    plain, final = solver(SCHED, 8), solver(SCHED, 8, final_t=5)
    for plan in (plain, final):
        out = _black_digits(plan)
        level = plan.noise_level[np.flatnonzero(plan.calls_net)[-1]]
        np.testing.assert_allclose(out.numpy(), -1 - level * EPS_ERROR, atol=1e-5)
    # the trailing grid's last call is at t = 124 (level 0.43): 0.05 eps error is 2.7 grey levels, a haze pixel;
    # at t = 5 (level 0.03) it is 0.2 of a grey level
    assert border_share(to_uint8(_black_digits(plain))) == 1.0
    assert border_share(to_uint8(_black_digits(final))) == 0.0
    assert to_uint8(_black_digits(final)).max() == 0


@pytest.mark.parametrize("sampler", ["unipc", "dpm++2m"])
def test_final_denoising_row_table(sampler):
    plain = make_plan(SCHED, sampler, 8, guidance_interval=(0.28, 5.42))
    plan = make_plan(SCHED, sampler, 8, guidance_interval=(0.28, 5.42), final_t=5)
    assert plan.name == plain.name.replace("trailing", "trailing-final5")
    assert list(plan.timesteps) == list(plain.timesteps) + [5] and plan.calls == 9
    # the rows before the last grid row are the plain plan's; the final row outputs its own x0_hat, unguided (its
    # level 0.03 is below the interval)
    for col in ("w_x", "w_x0", "w_x0_prev", "w_x0_prev2", "x0_x", "x0_out", "cfg"):
        np.testing.assert_array_equal(getattr(plan, col)[:-2], getattr(plain, col)[:-1], err_msg=col)
    assert (plan.w_x[-1], plan.w_x0[-1], plan.w_x0_prev[-1], plan.w_x0_prev2[-1], plan.cfg[-1]) == (0, 1, 0, 0, False)
    # the step into it lands on the final row's noise level: from x = sqrt(abar) x0 + sqrt(1 - abar) e with every
    # prediction x0_hat = x0 (a perfect network) on sqrt(abar_5) x0 + sqrt(1 - abar_5) e; DPM-Solver++ takes it
    # first order (no earlier prediction), as UniPC's predictor does (its earlier ones enter through the corrector)
    ab, ab5 = SCHED.alphas_cumprod[124], SCHED.alphas_cumprod[5]
    x0, e = 0.3, 1.7
    x = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * e
    step = plan.w_x[-2] * x + (plan.w_x0[-2] + plan.w_x0_prev[-2] + plan.w_x0_prev2[-2]) * x0
    assert step == pytest.approx(ab5 ** 0.5 * x0 + (1 - ab5) ** 0.5 * e, abs=1e-12)
    # (a second-order step would extrapolate over the long last interval, weighting the previous prediction by
    # about -1.5; UniPC's -0.04 is its corrector, scaled by sigma_5 / sigma_124)
    assert abs(plan.w_x0_prev[-2]) < 0.05 and (sampler == "unipc" or plan.w_x0_prev[-2] == 0)


@pytest.mark.parametrize("final_t, sampler", [(124, "unipc"), (-1, "unipc"), (2.0, "dpm++2m"), (True, "unipc"),
                                              (0, "ddim"), (0, "ddpm")])
def test_final_denoising_row_refused(final_t, sampler):
    with pytest.raises(OptionError, match="final"):
        make_plan(SCHED, sampler, None if sampler == "ddpm" else 8, final_t=final_t)
