"""`ddpm distill` (train/distill.py): the student's one DDIM step moves towards its teacher's two, the student file
records its plan and `ddpm gen --ckpt` / the API sample with it, and a resumed run is bit-identical."""

import json
import re

import numpy as np

import pytest
import torch

import ddpm
from ddpm.errors import Interrupted
from ddpm.model.io import load_checkpoint, load_model, read_model_info, save_model
from ddpm.runtime.eager import guided
from ddpm.runtime.schedule import Schedule
from ddpm.train import distill as D
from helpers import TINY, invoke, randomised_unet, tiny_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the runs here are tiny, and two threads on a shared machine are slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    tiny_checkpoint(root)
    return root


def _cfg(fake_mnist, teacher, out, **kw):
    base = dict(data=str(fake_mnist), out=str(out), init=str(teacher), steps_from=4, steps_to=2, iters=3,
                fold_iters=0, batch_size=4, lr=1e-4, warmup=1, log_every=1, ckpt_every=100, device="cpu")
    return D.DistillConfig(**{**base, **kw})


def _quiet():
    return dict(progress=False, log=lambda *_: None)


def test_guided_eps_is_the_samplers_guidance():
    """The teacher's per-sample guidance is runtime.eager.guided's (1 + w) eps_c - w eps_u, bit for bit; w = 0 is
    the conditional model alone."""
    net = randomised_unet(TINY)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 1, 28, 28, generator=g), torch.tensor([1, 4, 7])
    t = torch.full((3,), 40)
    with torch.no_grad():
        want = guided(net, y, TINY.null_label, 0.45)(z, 40, True)
        assert torch.equal(D.guided_eps(net, z, t, y, TINY.null_label, torch.full((3,), 0.45)), want)
        assert torch.equal(D.guided_eps(net, z, t, y, TINY.null_label, torch.zeros(3)), net(z, t, y))


def test_two_step_target_is_where_one_student_step_lands():
    """x~ (Salimans & Ho 2022, Algorithm 2) is the x0_hat with which the student's one DDIM step (the sampler's
    table) lands exactly where the teacher's two land."""
    net = randomised_unet(TINY)
    cfg = D.DistillConfig(steps_from=4, steps_to=2, fold_iters=0)
    sched = Schedule.of(TINY)
    tt, ts = (D.Table(D.plan_of(cfg, sched, n), torch.device("cpu"), 0.28, 5.42) for n in (4, 2))
    stage = D.stages(cfg)[0]
    g = torch.Generator().manual_seed(1)
    z, y, rows = torch.randn(4, 1, 28, 28, generator=g), torch.tensor([0, 3, 10, 5]), torch.tensor([0, 1, 0, 1])
    x = D.target(net, stage, tt, ts, rows, z, y, TINY.null_label)
    w = lambda r: 0.45 * tt.col("guided", r).view(-1)
    with torch.no_grad():
        z1 = D.ddim_step(tt, 2 * rows, z, D.guided_eps(net, z, tt.t[2 * rows], y, 10, w(2 * rows)))
        z2 = D.ddim_step(tt, 2 * rows + 1, z1, D.guided_eps(net, z1, tt.t[2 * rows + 1], y, 10, w(2 * rows + 1)))
    one = ts.col("w_x", rows) * z + ts.col("w_x0", rows) * x      # the student's step with x0_hat = x~, unclipped
    assert torch.allclose(one, z2, atol=1e-5)
    assert torch.equal(x[1], z2[1]) and torch.equal(x[3], z2[3])  # the last row lands on x0: x~ = z_0


def _distance(student, teacher, cfg, fake_mnist):
    """On one fixed batch: the loss, and per student row the mean squared distance between the student's x0_hat and
    x~, the x0_hat with which its one DDIM step lands where the teacher's two land (unclipped: the randomised tiny
    teacher's x0_hat lies mostly outside [-1, 1], where clipping would hide every change)."""
    from ddpm.train.data import load_mnist

    sched = Schedule.of(TINY)
    tt, ts = (D.Table(D.plan_of(cfg, sched, n), torch.device("cpu"), cfg.guidance_lo, cfg.guidance_hi)
              for n in (cfg.steps_from, cfg.steps_to))
    stage = D.stages(cfg)[0]
    images, labels = load_mnist(str(fake_mnist), "train")
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(images), generator=g)[:64].numpy()
    x0 = torch.from_numpy(images[idx]).unsqueeze(1).float() / 127.5 - 1
    y = torch.from_numpy(labels[idx]).long()
    rows, noise = torch.randint(0, ts.rows, (64,), generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        loss = D.distill_loss(student, teacher, stage, tt, ts, x0, y, rows, noise, TINY.null_label).item()
        z = ts.col("sqrt_abar", rows) * x0 + ts.col("sqrt_1m_abar", rows) * noise
        want = D.target(teacher, stage, tt, ts, rows, z, y, TINY.null_label)
        x0_hat = ts.col("x0_x", rows) * z - ts.col("x0_out", rows) * student(z, ts.t[rows], y)
    return loss, [(x0_hat - want)[rows == r].pow(2).mean().item() for r in range(ts.rows)]


@pytest.mark.slow   # 12 distillation steps; the inner loop checks the steps' maths above and the options below
def test_a_few_steps_move_the_students_step_towards_the_teachers_two(fake_mnist, teacher, tmp_path):
    """`ddpm distill` for 12 steps (guidance folded into the first round, 4 -> 2 steps): the loss falls, and on a
    fixed batch the student's x0_hat is nearer the two-step target x~, at both of its rows, than the teacher's was."""
    out = tmp_path / "run"
    r = invoke("distill", "--teacher", teacher, "--data", fake_mnist, "--out", out, "--steps-from", 4, "--steps-to",
               2, "--fold-iters", 0, "--iters", 12, "--batch", 8, "--lr", 3e-4, "--warmup", 1, "--ema", 0.5,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "distilled 12 steps" in r.output and "student2.safetensors" in r.output
    losses = [row["loss"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])
    opts = json.loads((out / "options.json").read_text())
    assert (opts["steps_from"], opts["steps_to"], opts["guidance"], opts["loss_weight"]) == (4, 2, 0.45,
                                                                                              "truncated-snr")
    cfg = _cfg(fake_mnist, teacher, out, iters=12)
    t = load_model(teacher).model
    s = load_model(out / "student2.safetensors").model
    loss0, d0 = _distance(t, t, cfg, fake_mnist)      # the student starts as the teacher: its own one step
    loss1, d1 = _distance(s, t, cfg, fake_mnist)
    assert loss1 < 0.9 * loss0 and all(b < 0.9 * a for a, b in zip(d0, d1)), (loss0, loss1, d0, d1)


def _student_file(path, steps=2):
    plan = D.recorded_plan(steps, {"guidance": 0.45, "guidance_interval": [0.28, 5.42], "teacher": "0" * 64,
                                   "teacher_steps": 4})
    save_model(path, TINY, randomised_unet(TINY).state_dict(), step=1, plan=plan)
    return path


def test_student_file_round_trips_its_plan_and_gen_uses_it(tmp_path):
    """The student's model file records its plan; `ddpm gen --ckpt` and the API sample with it (DDIM-2 trailing,
    no guidance: one batch per call) unless an option overrides it; a model that records none is unchanged."""
    path = _student_file(tmp_path / "student2.safetensors")
    info = read_model_info(path)[2]
    assert info["plan"]["steps"] == 2 and info["plan"]["spacing"] == "trailing" and info["plan"]["guidance"] == 0
    model = ddpm.load(path)
    assert model.plan().name == "ddim2-eta0-trailing"
    assert model.plan(steps=4).name == "ddim4-eta0-trailing"
    assert model.plan(sampler="unipc").name == "unipc8-trailing"        # another sampler: its own defaults
    a = model.generate(4, seed=3, engine="torch")
    b = model.generate(4, seed=3, engine="torch", sampler="ddim", steps=2, spacing="trailing", guidance=0.0,
                       guidance_interval=None)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, model.generate(4, seed=3, engine="torch", steps=4))
    base = ["gen", "--ckpt", path, "-n", 2, "--engine", "torch", "-q", "--out", tmp_path / "d.png"]
    r = invoke(*base)
    assert r.exit_code == 0, r.output
    assert "(ddim2-eta0-trailing, guidance 0," in r.output
    r = invoke(*base, "--steps", 4)
    assert r.exit_code == 0 and "(ddim4-eta0-trailing, guidance 0," in r.output, r.output
    r = invoke(*base, "--guidance", 1)
    assert r.exit_code == 0 and "(ddim2-eta0-trailing, guidance 1," in r.output, r.output
    plain = tmp_path / "plain"
    plain.mkdir()
    tiny_checkpoint(plain)                                                  # records no plan: the defaults
    assert ddpm.load(plain).plan().name == ddpm.load(plain).plan(sampler="unipc").name


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "plan.steps must be an integer in 1..100000"),
    ({"steps": 10**15}, "plan.steps must be an integer in 1..100000"),
    ({"steps": TINY.timesteps + 1}, f"its plan has {TINY.timesteps + 1} steps, more than the model's T"),
    ({"guidance": 0.45, "guidance_interval": [0.28, 1e300]}, "plan.guidance_interval[1] must be a finite number"),
    ({"guidance": 0.45, "guidance_interval": [2.0, 1.0]}, "is not (lo, hi) with lo < hi"),
    # entries each within bounds that no sampling runs together, and one the plan does not know (it was ignored)
    ({"sampler": "ddpm"}, "its plan cannot be sampled (the DDPM sampler runs all"),
    ({"sampler": "unipc", "eta": 0.5}, "its plan cannot be sampled (eta is DDIM's noise level"),
    ({"guidance_rescale": 0.7}, "plan has an entry it does not know: 'guidance_rescale'"),
])
def test_a_bad_recorded_plan_is_one_clear_error(tmp_path, change, message):
    """A model file's recorded plan is the file's, not an option: one that no sampling could run (steps beyond
    the model's T, a guidance interval out of bounds or reversed) is refused as the file's fault when it is read,
    exit 1 (not a usage error naming --steps, not model.plan()'s message), by the CLI and ddpm.load alike."""
    path = tmp_path / "bad.safetensors"
    save_model(path, TINY, randomised_unet(TINY).state_dict(), step=1,
               plan={"sampler": "ddim", "steps": 2, "spacing": "trailing", "eta": 0.0, "guidance": 0.0,
                     "guidance_interval": None, **change})
    r = invoke("gen", "--ckpt", path, "-n", 1, "--out", tmp_path / "d.png")
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("\n") == 1, r.output
    assert message in r.output and f"{path}: " in r.output and "--steps" not in r.output, r.output
    with pytest.raises(ddpm.DdpmError, match=re.escape(message)):
        ddpm.load(path)


def _stop_at(monkeypatch, call: int):
    """Raise KeyboardInterrupt (as Ctrl-C does) in the `call`-th loss of the run (1-based): a kill by hook."""
    real, calls = D.distill_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(D, "distill_loss", loss)


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


@pytest.mark.slow
def test_resume_is_bit_identical(fake_mnist, teacher, tmp_path, monkeypatch):
    """Stopped in stage 1 and again in the first round (each time after a stage's checkpoint), then resumed: the
    weights, EMA, teacher, log and student files are those of the run that never stopped."""
    kw = dict(steps_from=4, steps_to=1, fold_iters=2, iters=3)     # stages: fold 0-1, 4->2 2-4, 2->1 5-7
    full = D.distill(_cfg(fake_mnist, teacher, tmp_path / "full", **kw), **_quiet())
    assert full["steps"] == 8
    run = tmp_path / "run"
    _stop_at(monkeypatch, 4)                                        # step 3: the checkpoint of step 2 is on disk
    with pytest.raises(Interrupted, match="last checkpoint at step 2"):
        D.distill(_cfg(fake_mnist, teacher, run, **kw), **_quiet())
    _stop_at(monkeypatch, 5)                                        # resumed at 2, stopped at step 6
    with pytest.raises(Interrupted, match="last checkpoint at step 5"):
        D.distill(_cfg(fake_mnist, teacher, run, **kw), resume=True, **_quiet())
    monkeypatch.undo()
    resumed = D.distill(D.DistillConfig(out=str(run), device="cpu"), resume=True, **_quiet())
    assert resumed["steps"] == 3 and full["losses"][-3:] == resumed["losses"]
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt")
    assert b["step"] == 8
    for part in ("model", "ema", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert (run / "log.jsonl").read_text() == (tmp_path / "full" / "log.jsonl").read_text()
    for name in ("student4.safetensors", "student2.safetensors", "student1.safetensors", "model.safetensors"):
        assert _tensors(run / name) == _tensors(tmp_path / "full" / name), name
    assert read_model_info(run)[2]["plan"]["steps"] == 1


def test_bad_options_are_one_line(fake_mnist, teacher, tmp_path):
    base = ["distill", "--teacher", teacher, "--data", fake_mnist, "--device", "cpu"]
    # options that contradict each other or the teacher (its T, as `gen --steps` the model's): a usage error, exit 2
    for args, msg, code in ((["--steps-from", 12, "--steps-to", 4], "times a power of two", 2),
                            (["--steps-from", 256, "--steps-to", 4], "--steps-from: 256 exceeds the teacher's T=100",
                             2)):
        r = invoke(*base, "--out", tmp_path / "x", *args)
        assert r.exit_code == code and "Traceback" not in r.output and msg in r.output, r.output
        assert not (tmp_path / "x" / "ckpt.pt").exists()
    r = invoke("distill", "--out", tmp_path / "none", "--resume")
    assert r.exit_code == 1 and "no ckpt.pt" in r.output
    assert not (tmp_path / "none").exists()   # a resume of nothing makes no folder


@pytest.mark.slow   # the inner loop resumes runs in test_train and refuses bad distill options above
def test_a_run_is_resumed_only_by_the_command_that_wrote_it(fake_mnist, teacher, tmp_path):
    """`train --resume` on a distill run and `distill --resume` on a train run: one line naming what the folder holds
    and the command that continues it, before anything is written (options.json and log.jsonl keep their bytes);
    distill's messages name distill's options (--teacher, not --init or --steps)."""
    dst, trn = tmp_path / "dst", tmp_path / "trn"
    D.distill(_cfg(fake_mnist, teacher, dst), **_quiet())
    r = invoke("train", "--data", fake_mnist, "--preset", "tiny", "--timesteps", 20, "--steps", 2, "--batch", 4,
               "--device", "cpu", "--out", trn)
    assert r.exit_code == 0, r.output
    for folder, args, wrote in ((dst, ("train", "--steps", 40), "distill"), (trn, ("distill",), "train")):
        before = {name: (folder / name).read_bytes() for name in ("options.json", "log.jsonl", "ckpt.pt")}
        r = invoke(*args, "--out", folder, "--resume", "--ckpt-every", 4)
        assert r.exit_code == 1, r.output
        assert r.output.strip().splitlines() == [f"Error: --resume: {folder} holds a `ddpm {wrote}` run, not a "
                                                 f"`ddpm {args[0]}` one; continue it with `ddpm {wrote} --out "
                                                 f"{folder} --resume`"], r.output
        assert {name: (folder / name).read_bytes() for name in before} == before
    r = invoke("distill", "--out", dst, "--resume")                 # complete
    assert r.exit_code == 1 and "--teacher" in r.output and "--steps" not in r.output, r.output
    with pytest.raises(D.TrainingError, match=r"--iters 3, not --iters 5; .* start a new run with another --out$"):
        D.distill(_cfg(fake_mnist, teacher, dst, iters=5), resume=True, **_quiet())
    with pytest.raises(D.TrainingError, match="leave out --teacher"):   # another teacher: not honoured
        D.distill(_cfg(fake_mnist, tmp_path / "trn", dst), resume=True, **_quiet())
    r = invoke("distill", "--out", dst, "--resume", "--teacher", teacher)
    assert r.exit_code == 2 and "--teacher cannot be given with --resume" in r.output, r.output


@pytest.mark.parametrize("steps_from, steps_to", [(3, 1), (4, 8), (4, 4), (12, 4)])
def test_steps_that_contradict_each_other_are_a_usage_error(teacher, tmp_path, steps_from, steps_to):
    """--steps-from and --steps-to that are not a power of two apart contradict each other, which the options alone
    show: a usage error naming --steps-from (exit status 2, as other contradicting options), before anything is
    written; the API's DistillConfig gets the same check as an OptionError."""
    out = tmp_path / "run"
    r = invoke("distill", "--teacher", teacher, "--out", out, "--steps-from", steps_from, "--steps-to", steps_to,
               "--device", "cpu")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: Invalid value for --steps-from: ") and "--steps-to" in r.output, r.output
    assert not out.exists()
    with pytest.raises(ddpm.errors.OptionError) as e:
        D.check(D.DistillConfig(steps_from=steps_from, steps_to=steps_to))
    assert e.value.option == "steps_from"
