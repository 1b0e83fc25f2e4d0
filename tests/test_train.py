import json

import pytest
import torch
from click.testing import CliRunner

from ddpm.cli import main
from ddpm.model import PRESETS, UNet
from ddpm.model.io import load_checkpoint, load_model
from ddpm.runtime.schedule import Schedule
from ddpm.train import loop
from ddpm.train.loop import TrainConfig, TrainingError, diffusion_loss, train


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset="tiny", steps=6, batch_size=16, ckpt_every=3, log_every=2,
                warmup=2, lr=1e-3, timesteps=50, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    sched = Schedule.make("linear", 1000)
    sa = torch.tensor(sched.sqrt_alphas_cumprod, dtype=torch.float32)
    s1 = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 28, 28, generator=g) * 2 - 1
    y, t = torch.randint(0, 10, (16,), generator=g), torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = diffusion_loss(model, x0, y, t, noise, sa, s1).item()
    for _ in range(30):
        loss = diffusion_loss(model, x0, y, t, noise, sa, s1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(1.0, abs=0.15)        # zero-initialised output: eps_hat = 0, loss = E[eps^2]
    assert loss.item() < 0.8 * first


def test_train_writes_run_and_resume_is_exact(fake_mnist, tmp_path):
    full = train(_cfg(fake_mnist, tmp_path / "full"), progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("ckpt.pt", "model.safetensors", "samples.png", "options.json"):
        assert (tmp_path / "full" / name).is_file()
    opts = json.loads((tmp_path / "full" / "options.json").read_text())
    assert opts["preset"] == "tiny" and opts["model_config"]["timesteps"] == 50
    # interrupted at step 3 (its checkpoint), then resumed to 6: identical to the uninterrupted run
    train(_cfg(fake_mnist, run, steps=3), progress=False, log=lambda *_: None)
    assert load_checkpoint(run / "ckpt.pt")["step"] == 3
    resumed = train(_cfg(fake_mnist, run), resume=True, progress=False, log=lambda *_: None)
    assert resumed["steps"] == 3
    assert load_checkpoint(run / "ckpt.pt")["step"] == 6
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["losses"][-2:] == resumed["losses"][-2:]
    assert load_model(run).info["step"] == 6


def test_init_starts_from_given_weights(fake_mnist, tmp_path):
    train(_cfg(fake_mnist, tmp_path / "a"), progress=False, log=lambda *_: None)
    start = load_model(tmp_path / "a").model.state_dict()   # the EMA weights of run a
    # a tiny learning rate: after one step the model is still, to 1e-6, where it started
    train(_cfg(fake_mnist, tmp_path / "b", steps=1, lr=1e-12, init=str(tmp_path / "a")), progress=False,
          log=lambda *_: None)
    tuned = load_checkpoint(tmp_path / "b" / "ckpt.pt")["model"]
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in start.items())
    train(_cfg(fake_mnist, tmp_path / "c", steps=1, lr=1e-12), progress=False, log=lambda *_: None)   # from scratch
    assert not torch.allclose(load_checkpoint(tmp_path / "c" / "ckpt.pt")["model"]["conv_in.weight"],
                              start["conv_in.weight"], atol=1e-6)
    with pytest.raises(TrainingError, match="another config"):
        train(_cfg(fake_mnist, tmp_path / "d", schedule="cosine", init=str(tmp_path / "a")), progress=False)
    with pytest.raises(TrainingError, match="--init: .* does not exist"):
        train(_cfg(fake_mnist, tmp_path / "d", init=str(tmp_path / "nothing.pt")), progress=False)


def test_resume_refuses_other_config_and_finished_runs(fake_mnist, tmp_path):
    train(_cfg(fake_mnist, tmp_path, steps=3), progress=False, log=lambda *_: None)
    with pytest.raises(TrainingError, match="another model config"):
        train(_cfg(fake_mnist, tmp_path, schedule="cosine"), resume=True, progress=False)
    with pytest.raises(TrainingError, match="already at step 3"):
        train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, progress=False)
    with pytest.raises(TrainingError, match="no ckpt.pt"):
        train(_cfg(fake_mnist, tmp_path / "empty"), resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_mnist, tmp_path, monkeypatch):
    real = loop.diffusion_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", flaky)
    with pytest.raises(TrainingError, match="non-finite"):
        train(_cfg(fake_mnist, tmp_path), progress=False, log=lambda *_: None)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def test_cli_train_and_bad_options(fake_mnist, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(fake_mnist), "--out", str(tmp_path / "r"), "--preset", "tiny",
                                  "--steps", "2", "--batch", "8", "--timesteps", "20", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output and (tmp_path / "r" / "ckpt.pt").is_file()
    for args, msg in ((["--steps", "-5"], "--steps"), (["--preset", "huge"], "--preset"), (["--lr", "0"], "--lr")):
        r = CliRunner().invoke(main, ["train", "--data", str(fake_mnist), *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_cli_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    import ddpm.train.data as data

    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x"),
                                  "--device", "cpu", "--steps", "1"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "Error: MNIST files missing" in r.output and "--data" in r.output and "Traceback" not in r.output
