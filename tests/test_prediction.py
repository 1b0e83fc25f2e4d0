"""v-prediction (Salimans & Ho 2022): the model config's `prediction` field, from which every plan derives its x0
coefficients, so that every sampler, edit and engine follows with no code of its own."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ddpm.model.config import ModelConfig
from ddpm.model.io import read_model_info, weights_hash
from ddpm.runtime.edits import repaint_plan
from ddpm.runtime.eager import sample
from ddpm.runtime.samplers import make_plan
from ddpm.runtime.schedule import Schedule, x0_coefficients
from ddpm.train import loop
from helpers import TINY, invoke, randomised_unet
from test_samplers import gaussian_eps

EPS, V = Schedule.make("linear", 1000), Schedule.make("linear", 1000, "v")


def gaussian_v(sched):
    """The exact v-predictor for Gaussian data: v = sqrt(abar) eps - sqrt(1-abar) x0 with x0 = (x - sqrt(1-abar) eps)
    / sqrt(abar), i.e. v = (eps - sqrt(1-abar) x) / sqrt(abar)."""
    eps_fn = gaussian_eps(sched)

    def v_fn(x, t, cfg=True):
        ab = sched.alphas_cumprod[t]
        return (eps_fn(x, t, cfg) - (1 - ab) ** 0.5 * x) / ab ** 0.5
    return v_fn


def test_x0_coefficients_invert_the_forward_process():
    """x0 = c_x x_t - c_out out for x_t = sqrt(abar) x0 + sqrt(1-abar) eps, with out = eps or v."""
    abar = np.linspace(1e-4, 0.9999, 101)
    x0, eps = 0.37, -1.3
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    v = np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    for pred, out in (("eps", eps), ("v", v)):
        c_x, c_out = x0_coefficients(abar, pred)
        assert np.allclose(c_x * x_t - c_out * out, x0, atol=1e-9)
    with pytest.raises(ValueError, match="unknown prediction"):
        x0_coefficients(abar, "x0")


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 10), ("dpm++2m", 8), ("unipc", 8)])
def test_every_sampler_gives_the_same_samples_from_the_exact_v(sampler, steps):
    """The exact v-predictor under the v schedule's plan gives what the exact eps-predictor gives under the eps
    schedule's plan: same path for every sampler, since only the x0 columns differ."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64)
    pe, pv = make_plan(EPS, sampler, steps), make_plan(V, sampler, steps)
    assert pv.prediction == "v" and not np.allclose(pe.x0_x, pv.x0_x)
    z = torch.randn(max(pe.num_slots, 1), 64, 1, 2, 2, generator=g, dtype=torch.float64)
    a = sample(gaussian_eps(EPS), x_T, pe, lambda i: z[i])
    b = sample(gaussian_v(V), x_T, pv, lambda i: z[i])
    assert torch.allclose(a, b, atol=1e-9)


def test_repaint_and_guidance_interval_keep_the_prediction():
    """Plans made from plans (RePaint's rows, the guidance interval) keep the prediction and the noise levels."""
    rp_e, rp_v = (repaint_plan(make_plan(s, "ddim", 6, eta=1.0), 2, 3) for s in (EPS, V))
    assert rp_v.prediction == "v" and np.array_equal(rp_e.abar, rp_v.abar)
    assert np.array_equal(rp_e.calls_net, rp_v.calls_net) and (rp_v.x0_x[~rp_v.calls_net] == 0).all()
    gi_e, gi_v = (make_plan(s, "unipc", 8, guidance_interval=(0.28, 5.42)) for s in (EPS, V))
    assert np.array_equal(gi_e.cfg, gi_v.cfg) and 0 < gi_v.cfg.sum() < 8


def test_config_field_keeps_eps_files_as_they_were():
    """A config stored without `prediction` means eps, and an eps config is stored and hashed as before the field
    existed; a v config is stored with it and changes the hash."""
    assert "prediction" not in TINY.to_dict()
    assert ModelConfig.from_dict(TINY.to_dict()).prediction == "eps"
    v = dataclasses.replace(TINY, prediction="v")
    assert v.to_dict()["prediction"] == "v" and ModelConfig.from_dict(v.to_dict()) == v
    state = randomised_unet().state_dict()
    assert weights_hash(v, state) != weights_hash(TINY, state)
    with pytest.raises(ValueError, match="prediction"):
        dataclasses.replace(TINY, prediction="x0").validate()


def test_v_loss_and_min_snr_weights():
    """The v target gives zero loss for a network that outputs the true v; min-SNR for v weighs the x0-MSE by
    min(SNR, 5) as it does for eps (Hang et al. 2023)."""
    sa = torch.tensor(V.sqrt_alphas_cumprod, dtype=torch.float32)
    s1 = torch.tensor(V.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1, torch.randn(8, 1, 4, 4, generator=g)
    t, y = torch.randint(0, 1000, (8,), generator=g), torch.zeros(8, dtype=torch.long)
    a, s = sa[t].view(-1, 1, 1, 1), s1[t].view(-1, 1, 1, 1)
    true_v = lambda x_t, tt, yy: a * noise - s * x0
    assert loop.diffusion_loss(true_v, x0, y, t, noise, sa, s1, prediction="v").item() < 1e-10
    assert loop.diffusion_loss(true_v, x0, y, t, noise, sa, s1, prediction="eps").item() > 0.1
    ac = torch.tensor(V.alphas_cumprod)
    snr = ac / (1 - ac)
    # the x0 error of a v error dv is sqrt(1-abar) dv, of an eps error de sqrt(1/abar - 1) de
    x0_weight_v = loop.loss_weights("min-snr", V.alphas_cumprod, "v").double() / (1 - ac)
    x0_weight_e = loop.loss_weights("min-snr", V.alphas_cumprod, "eps").double() / (1 / ac - 1)
    assert torch.allclose(x0_weight_v, snr.clamp(max=5), rtol=1e-5)
    assert torch.allclose(x0_weight_e, snr.clamp(max=5), rtol=1e-5)


@pytest.mark.slow
def test_a_v_model_trains_exports_and_generates_alike_on_every_engine(fake_mnist, tmp_path):
    """`ddpm train --prediction v`, its export, and the same digits from the eager and onnx engines; --init may switch
    the prediction, --resume may not."""
    out = tmp_path / "run"
    r = invoke("train", "--data", fake_mnist, "--out", out, "--preset", "tiny", "--timesteps", 50, "--steps", 4,
               "--batch", 16, "--ckpt-every", 2, "--prediction", "v", "--device", "cpu")
    assert r.exit_code == 0, r.output
    cfg = read_model_info(out)[0]
    assert cfg.prediction == "v"
    assert json.loads((out / "options.json").read_text())["prediction"] == "v"
    r = invoke("train", "--data", fake_mnist, "--out", out, "--steps", 6, "--resume", "--prediction", "eps")
    assert r.exit_code == 1 and "v-prediction), not --prediction eps" in r.output
    r = invoke("train", "--data", fake_mnist, "--out", tmp_path / "back", "--init", out, "--steps", 2,
               "--batch", 16, "--prediction", "eps", "--device", "cpu")
    assert r.exit_code == 0 and read_model_info(tmp_path / "back")[0].prediction == "eps", r.output
    exp = tmp_path / "exp"
    assert invoke("export", "--ckpt", out, "--out", exp).exit_code == 0
    assert json.loads((exp / "export.json").read_text())["model_config"]["prediction"] == "v"
    grids = {}
    for engine in ("torch", "onnx"):
        f = tmp_path / f"{engine}.npz"
        r = invoke("gen", "--ckpt", out, "--export", exp, "--engine", engine, "-n", 4, "--steps", 5, "--out", f, "-q")
        assert r.exit_code == 0, r.output
        grids[engine] = np.load(f)["images"].astype(int)
    assert np.abs(grids["torch"] - grids["onnx"]).max() <= 1
