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
from helpers import invoke, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("small_sample_grids")   # these tests are about runs, not their samples.png


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset="tiny", steps=6, batch_size=16, ckpt_every=3, log_every=2,
                warmup=2, lr=1e-3, timesteps=50, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(TrainingError, match=r"holds a tiny model \(linear schedule, T=50\), not --schedule cosine"):
        train(_cfg(fake_mnist, tmp_path / "d", schedule="cosine", init=str(tmp_path / "a")), progress=False)
    with pytest.raises(TrainingError, match="--init: .* does not exist"):
        train(_cfg(fake_mnist, tmp_path / "d", init=str(tmp_path / "nothing.pt")), progress=False)


@pytest.mark.slow
def test_resume_refuses_other_config_and_finished_runs(fake_mnist, tmp_path):
    train(_cfg(fake_mnist, tmp_path, steps=3), progress=False, log=lambda *_: None)
    with pytest.raises(TrainingError, match="--resume: .* holds a tiny model .*, not --schedule cosine; leave out "
                                            "--schedule"):
        train(_cfg(fake_mnist, tmp_path, schedule="cosine"), resume=True, progress=False)
    with pytest.raises(TrainingError, match="already at step 3"):
        train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, progress=False)
    with pytest.raises(TrainingError, match="no ckpt.pt"):
        train(_cfg(fake_mnist, tmp_path / "empty"), resume=True, progress=False)


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_train_and_bad_options(fake_mnist, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(fake_mnist), "--out", str(tmp_path / "r"), "--preset", "tiny",
                                  "--steps", "2", "--batch", "8", "--timesteps", "20", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output and (tmp_path / "r" / "ckpt.pt").is_file()
    for args, msg in ((["--steps", "-5"], "--steps"), (["--preset", "huge"], "--preset"), (["--lr", "0"], "--lr")):
        r = CliRunner().invoke(main, ["train", "--data", str(fake_mnist), *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_init_and_resume_take_the_model_config_from_the_run(fake_mnist, tmp_path, monkeypatch):
    """--init and --resume without --preset/--schedule/--timesteps train the model they are given; a contradicting
    explicit option is one clear line (no dumped config); options.json holds the resolved values."""
    quiet = dict(progress=False, log=lambda *_: None)
    train(_cfg(fake_mnist, tmp_path / "a", steps=2, timesteps=40), **quiet)   # tiny, T=40: not the defaults
    bare = dict(data=str(fake_mnist), steps=3, batch_size=16, ckpt_every=3, log_every=1, warmup=1, device="cpu")
    train(TrainConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a"), **bare), **quiet)
    opts = json.loads((tmp_path / "b" / "options.json").read_text())
    assert (opts["preset"], opts["schedule"], opts["timesteps"]) == ("tiny", "linear", 40)
    assert opts["init"] == str((tmp_path / "a" / "model.safetensors").absolute())
    assert load_model(tmp_path / "b").cfg == load_model(tmp_path / "a").cfg
    train(TrainConfig(out=str(tmp_path / "a"), **{**bare, "steps": 4, "warmup": 2}), resume=True, **quiet)
    assert load_checkpoint(tmp_path / "a" / "ckpt.pt")["step"] == 4
    # $DDPM_DATA (no --data): options.json names the folder that was used, not null
    monkeypatch.setenv("DDPM_DATA", str(fake_mnist))
    train(TrainConfig(out=str(tmp_path / "a"), **{**bare, "data": None, "steps": 5, "warmup": 2}), resume=True,
          **quiet)
    opts = json.loads((tmp_path / "a" / "options.json").read_text())
    assert opts["data"] == str(fake_mnist.absolute()) and opts["timesteps"] == 40 and opts["resumed_from"] == 4
    for kw, msg in (({"preset": "small"}, "not --preset small; leave out --preset"),
                    ({"timesteps": 1000, "preset": "tiny"}, "not --timesteps 1000; leave out --timesteps")):
        with pytest.raises(TrainingError, match=msg):
            train(TrainConfig(out=str(tmp_path / "c"), init=str(tmp_path / "a"), **bare, **kw), **quiet)
    # the CLI: no --preset needed; a contradicting one is one line, exit 1
    args = ["train", "--data", str(fake_mnist), "--steps", "1", "--batch", "8", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--init", str(tmp_path / "a"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--init", str(tmp_path / "a"), "--out", str(tmp_path / "e"),
                                  "--preset", "small"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "base_channels" not in r.output
    assert r.output.strip().splitlines() == [f"Error: --init: {tmp_path / 'a'} holds a tiny model (linear schedule, "
                                             f"T=40), not --preset small; leave out --preset to train that model"]


def test_init_of_another_image_shape_is_one_clear_error(fake_mnist, tmp_path):
    """Training reads MNIST only: --init with a model of 32x32 images is refused in one line, before a step."""
    import dataclasses

    from helpers import TINY, tiny_checkpoint

    tiny_checkpoint(tmp_path, cfg=dataclasses.replace(TINY, image_size=32))
    r = CliRunner().invoke(main, ["train", "--data", str(fake_mnist), "--init", str(tmp_path), "--out",
                                  str(tmp_path / "r"), "--steps", "1", "--batch", "8", "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1:] == ["Error: the model takes images of 1x32x32, the training data (MNIST) "
                                             "holds 1x28x28: training reads MNIST only, so train a model of that "
                                             "shape"]
    assert not (tmp_path / "r" / "ckpt.pt").exists()


def test_cli_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    import ddpm.train.data as data

    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x"),
                                  "--device", "cpu", "--steps", "1"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "Error: MNIST files missing" in r.output and "--data" in r.output and "Traceback" not in r.output


def test_learning_rate_schedules_by_hand():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="cosine", lr_final=0.01)
    lr = lambda s: loop.learning_rate(cfg, s)
    assert lr(0) == pytest.approx(1e-4) and lr(4) == pytest.approx(5e-4)        # warm-up: (s+1)/10
    assert lr(10) == pytest.approx(1e-3)                                        # cosine starts at lr
    assert lr(59.5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))               # half-way: the mean of the two ends
    assert lr(109) == pytest.approx(1e-5)                                       # the last step: lr_final * lr
    assert all(lr(s) > lr(s + 1) for s in range(10, 109))                       # decays monotonically
    const = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="constant")
    assert loop.learning_rate(const, 4) == pytest.approx(5e-4) and loop.learning_rate(const, 109) == 1e-3


def test_min_snr_weights_by_hand():
    sched = Schedule.make("linear", 1000)
    w = loop.loss_weights("min-snr", sched.alphas_cumprod)
    ac = sched.alphas_cumprod
    for t in (0, 10, 100, 500, 999):
        snr = ac[t] / (1 - ac[t])
        assert w[t].item() == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert w[0].item() < 1e-3 and w[999].item() == 1.0       # low noise (high SNR) is down-weighted, high noise kept
    assert torch.equal(loop.loss_weights("eps", ac), torch.ones(1000))
    # the weighted loss is the batch mean of w[t_i] * MSE_i
    model = UNet(PRESETS["tiny"]).eval()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1, torch.randn(4, 1, 28, 28, generator=g)
    y, t = torch.tensor([0, 1, 2, 10]), torch.tensor([0, 10, 500, 999])
    sa = torch.tensor(sched.sqrt_alphas_cumprod, dtype=torch.float32)
    s1 = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    per = torch.stack([diffusion_loss(model, x0[i:i + 1], y[i:i + 1], t[i:i + 1], noise[i:i + 1], sa, s1)
                       for i in range(4)])
    with torch.no_grad():
        assert diffusion_loss(model, x0, y, t, noise, sa, s1, weights=w).item() == pytest.approx(
            (w[t] * per).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_cosine_min_snr_resume_is_exact_and_kept(fake_mnist, tmp_path):
    kw = dict(lr_schedule="cosine", loss_weight="min-snr")
    full = train(_cfg(fake_mnist, tmp_path / "full", **kw), progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    train(_cfg(fake_mnist, run, steps=3, **kw), progress=False, log=lambda *_: None)
    # --resume without the options keeps the run's own: the same weights as the uninterrupted run
    resumed = train(_cfg(fake_mnist, run), resume=True, progress=False, log=lambda *_: None)
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert full["losses"][-2:] == resumed["losses"][-2:]
    opts = json.loads((run / "options.json").read_text())
    assert opts["lr_schedule"] == "cosine" and opts["loss_weight"] == "min-snr"
    assert b["train_config"]["lr_schedule"] == "cosine"
    # and a different one is refused
    with pytest.raises(TrainingError, match="lr_schedule='cosine'"):
        train(_cfg(fake_mnist, run, steps=9, lr_schedule="constant"), resume=True, progress=False,
              log=lambda *_: None)
    # cosine differs from constant: the runs are not the same
    plain = train(_cfg(fake_mnist, tmp_path / "plain"), progress=False, log=lambda *_: None)
    assert plain["losses"][-1] != full["losses"][-1]


def _log_rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_cuts_the_log_back_to_the_checkpoint(fake_mnist, tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    train(_cfg(fake_mnist, tmp_path / "full"), **quiet)
    run = tmp_path / "run"
    train(_cfg(fake_mnist, run, steps=3), **quiet)
    at3 = (run / "ckpt.pt").read_bytes()
    # killed after it had logged steps 4-5 but before their checkpoint: ckpt.pt still at step 3
    train(_cfg(fake_mnist, run, steps=5), resume=True, **quiet)
    (run / "ckpt.pt").write_bytes(at3)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                     # and a line cut by the kill
    train(_cfg(fake_mnist, run), resume=True, **quiet)
    assert [r["step"] for r in _log_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert _log_rows(run) == _log_rows(tmp_path / "full")     # the same losses as the uninterrupted run


def _outputs(run):
    """samples.png's bytes, model.safetensors' metadata and tensors."""
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "np") as f:
        model = (f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()})
    return (run / "samples.png").read_bytes(), model


@pytest.mark.slow
def test_resume_completes_a_run_killed_in_its_last_checkpoint(fake_mnist, tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    train(_cfg(fake_mnist, tmp_path, steps=3), **quiet)
    want = _outputs(tmp_path)
    (tmp_path / "samples.png").unlink()                          # killed while it wrote the last grid
    messages = []
    res = train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, progress=False, log=messages.append)
    assert res["steps"] == 0 and messages[-1].endswith(": wrote samples.png (it was missing)"), messages[-1]
    assert _outputs(tmp_path) == want
    (tmp_path / "model.safetensors").write_bytes(b"cut")          # a damaged model is rewritten too
    train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, progress=False, log=messages.append)
    assert messages[-1].endswith(": wrote model.safetensors (it was unreadable)"), messages[-1]
    assert _outputs(tmp_path) == want
    from safetensors.torch import load_file, save_file                # a model of an earlier step: said so

    meta, _ = _outputs(tmp_path)[1]
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "model.safetensors", metadata={**meta, "step": "2"})
    train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, progress=False, log=messages.append)
    assert messages[-1].endswith(": wrote model.safetensors (it held step 2)"), messages[-1]
    assert _outputs(tmp_path) == want
    with pytest.raises(TrainingError, match="already at step 3"):  # complete: nothing to do
        train(_cfg(fake_mnist, tmp_path, steps=3), resume=True, **quiet)


@pytest.mark.slow   # 5 runs; `train --resume` on the command line is in the loop: test_resume_refuses_an_option_it_cannot_honour
def test_cli_resume_keeps_the_options_the_run_was_given(fake_mnist, tmp_path):
    """`ddpm train --resume` with only --steps continues with the first run's --batch, --p-uncond, --seed, --lr,
    --ckpt-every ...: the same weights as the uninterrupted run. A given option that changes the run's maths is one
    line; one that may change on resume (--ckpt-every) is taken."""
    base = ["train", "--data", fake_mnist, "--preset", "tiny", "--timesteps", 10, "--device", "cpu"]
    first = ["--batch", 16, "--p-uncond", 0.3, "--seed", 5, "--lr", 1e-3, "--warmup", 2, "--ckpt-every", 4]
    assert invoke(*base, *first, "--steps", 4, "--out", tmp_path / "full").exit_code == 0
    assert invoke(*base, *first, "--steps", 2, "--out", tmp_path / "run").exit_code == 0
    r = invoke("train", "--steps", 4, "--out", tmp_path / "run", "--resume")
    assert r.exit_code == 0, r.output
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert (opts["batch_size"], opts["p_uncond"], opts["seed"], opts["lr"], opts["ckpt_every"], opts["timesteps"]) \
        == (16, 0.3, 5, 1e-3, 4, 10)
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a contradicting option: one line naming what the run was trained with
    r = invoke("train", "--steps", 5, "--out", tmp_path / "run", "--resume", "--batch", 32, "--seed", 0)
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: --resume: {tmp_path / 'run' / 'ckpt.pt'} was trained with --batch 16, --seed 5, not --batch 32, "
        f"--seed 0; leave them out to continue the run, or start a new run from its weights with --init"]
    # the default value given explicitly is given too: --seed 0 contradicts the run's seed 5
    r = invoke("train", "--steps", 5, "--out", tmp_path / "run", "--resume", "--seed", 0)
    assert r.exit_code == 1 and "--seed 5, not --seed 0" in r.output
    r = invoke("train", "--steps", 5, "--out", tmp_path / "run", "--resume", "--ckpt-every", 5)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "options.json").read_text())["ckpt_every"] == 5


def test_resume_refuses_an_option_it_cannot_honour(fake_mnist, tmp_path):
    """`train --resume --init X` is a usage error (exit 2, one line) and the run's record keeps its bytes: the run goes
    on from its checkpoint's weights, so --init would only be recorded, falsely. The library refuses another --init
    too, and takes the one recorded."""
    run = tmp_path / "run"
    base = ("train", "--data", fake_mnist, "--preset", "tiny", "--timesteps", 10, "--batch", 4, "--device", "cpu")
    (tmp_path / "other").mkdir()
    tiny_checkpoint(tmp_path / "other")   # another model's weights
    assert invoke(*base, "--steps", 2, "--out", run).exit_code == 0
    before = (run / "options.json").read_bytes()
    for init in (tmp_path / "other", run):
        r = invoke("train", "--out", run, "--resume", "--steps", 3, "--init", init)
        [line] = r.output.strip().splitlines()
        assert r.exit_code == 2 and line.startswith(
            "Error: --init cannot be given with --resume: the run goes on from its checkpoint's weights, not from "
            "another model's; leave out --init to continue the run, or leave out --resume and give another --out to "
            "start a new run"), r.output
    assert (run / "options.json").read_bytes() == before
    with pytest.raises(TrainingError, match="leave out --init, or start a new run from its weights with --init"):
        train(TrainConfig(out=str(run), init=str(tmp_path / "other"), steps=3), resume=True, progress=False)
    assert (run / "options.json").read_bytes() == before
