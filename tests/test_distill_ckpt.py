"""A distillation's ckpt.pt is its latest student with the plan it was distilled for: `--ckpt run/ckpt.pt` samples as
`--ckpt run` does (same hash, same plan), and distilling it further knows its guidance is folded in already."""

import pytest
import torch

import ddpm
from ddpm.errors import DdpmError, OptionError
from ddpm.model.io import read_model_info
from ddpm.train import distill as D
from helpers import invoke, tiny_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_mnist):
    """A finished tiny distillation 4 -> 2 steps with guidance 0.45 folded in."""
    root = tmp_path_factory.mktemp("dst")
    (root / "teacher").mkdir()
    tiny_checkpoint(root / "teacher")
    cfg = D.DistillConfig(data=str(fake_mnist), out=str(root / "run"), init=str(root / "teacher"), steps_from=4,
                          steps_to=2, iters=2, fold_iters=0, batch_size=4, warmup=1, log_every=1, ckpt_every=100,
                          device="cpu")
    D.distill(cfg, progress=False, log=lambda *_: None)
    return root / "run"


def test_a_distillations_ckpt_pt_gives_the_students_plan(run):
    folder, ckpt = ddpm.load(run), ddpm.load(run / "ckpt.pt")
    assert ckpt.hash == folder.hash and folder.recorded is not None
    assert ckpt.recorded == folder.recorded
    assert ckpt.plan().name == folder.plan().name == "ddim2-eta0-trailing"
    out = [invoke("gen", "-n", 2, "--ckpt", path, "--out", run.parent / f"{name}.png").output
           for name, path in (("folder", run), ("ckpt", run / "ckpt.pt"))]
    assert all("ddim2-eta0-trailing, guidance 0," in line for line in out), out


def test_distilling_a_ckpt_pt_further_knows_its_folded_guidance(run, fake_mnist, tmp_path):
    cfg = D.DistillConfig(data=str(fake_mnist), out=str(tmp_path / "more"), init=str(run / "ckpt.pt"), steps_from=2,
                          steps_to=1, iters=1, fold_iters=0, batch_size=4, device="cpu")
    with pytest.raises(OptionError, match="has guidance 0.45 folded in already") as e:
        D.distill(cfg, progress=False, log=lambda *_: None)
    assert e.value.option == "guidance"   # options that do not fit the teacher: a usage error (docs/distill.md)
    r = invoke("distill", "--teacher", run, "--steps-from", 2, "--steps-to", 1, "--data", fake_mnist, "--out",
               tmp_path / "cli")
    assert r.exit_code == 2 and "Invalid value for --guidance" in r.output, r.output


def test_ordinary_training_from_a_student_is_refused(run, fake_mnist, tmp_path):
    """train --init of a student dropped its plan without a word, and the result sampled with guidance on top of the
    guidance folded into its weights: refused, naming what to do instead."""
    for init in (run, run / "ckpt.pt", run / "model.safetensors"):
        r = invoke("train", "--init", init, "--steps", 1, "--batch", 8, "--data", fake_mnist, "--out", tmp_path / "t")
        assert r.exit_code == 1 and "is a distilled student (guidance 0.45 folded in, for ddim-2)" in r.output, r.output
        assert not (tmp_path / "t").exists()


def test_a_distillations_ckpt_pt_without_its_plan_is_refused(run, tmp_path):
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    del ckpt["plan"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(DdpmError, match="does not record its student's plan; load model.safetensors"):
        read_model_info(tmp_path / "ckpt.pt")


def test_a_teacher_rewritten_between_its_two_reads_is_refused(fake_mnist, tmp_path, monkeypatch):
    """The teacher's hash (recorded in the students) and its weights (trained from) are read apart: a teacher file
    rewritten in between is refused, never recorded under the other weights' hash."""
    for name, seed in (("teacher", 0), ("other", 1)):
        (tmp_path / name).mkdir()
        tiny_checkpoint(tmp_path / name, seed=seed)
    first = D.read_model_info

    def then_rewritten(path):
        info = first(path)
        (tmp_path / "other" / "model.safetensors").replace(tmp_path / "teacher" / "model.safetensors")
        return info

    monkeypatch.setattr(D, "read_model_info", then_rewritten)
    cfg = D.DistillConfig(data=str(fake_mnist), out=str(tmp_path / "run"), init=str(tmp_path / "teacher"),
                          steps_from=4, steps_to=2, iters=1, fold_iters=0, batch_size=4, device="cpu")
    with pytest.raises(D.TrainingError, match="changed while it was read; run the command again"):
        D.distill(cfg, progress=False, log=lambda *_: None)
    assert not (tmp_path / "run" / "options.json").exists()


def _with_plan(src, dst, change):
    """The student file `src` copied to `dst` with its metadata's plan changed by change(plan)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    plan = json.loads(meta["plan"])
    change(plan)
    save_file(tensors, str(dst), metadata={**meta, "plan": json.dumps(plan)})
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(distilled=[1]), "plan.distilled must be a distillation record"),
    (lambda p: p["distilled"].update(guidance=1e308), "plan.distilled.guidance must be a finite number >= 0 and <= 100"),
    (lambda p: p["distilled"].update(teacher="x"), "plan.distilled.teacher must be a sha256"),
    (lambda p: p["distilled"].update(guidance_interval=[0.1]), "plan.distilled.guidance_interval"),
])
def test_a_students_distillation_record_is_checked(run, tmp_path, fake_mnist, change, message):
    """The record of how a student was distilled is read by `ddpm distill` (the guidance folded in already): checked
    as every other entry of the plan. `"distilled": [1]` was taken, and a further distillation then folded guidance
    in a second time; a guidance of 1e308 was named as folded in."""
    bad = _with_plan(run / "model.safetensors", tmp_path / "model.safetensors", change)
    with pytest.raises(DdpmError, match=message):
        ddpm.load(bad)
    cfg = D.DistillConfig(data=str(fake_mnist), out=str(tmp_path / "more"), init=str(bad), steps_from=2, steps_to=1,
                          iters=1, fold_iters=0, batch_size=4, device="cpu")
    with pytest.raises(DdpmError, match=message):
        D.distill(cfg, progress=False, log=lambda *_: None)


def test_a_student_guided_at_every_level_loads(fake_mnist, tmp_path):
    """A student distilled with guidance over every noise level records the interval (0, inf): its record holds."""
    tiny_checkpoint(tmp_path / "teacher")
    cfg = D.DistillConfig(data=str(fake_mnist), out=str(tmp_path / "run"), init=str(tmp_path / "teacher"),
                          steps_from=4, steps_to=2, iters=1, fold_iters=0, batch_size=4, device="cpu",
                          guidance_lo=0.0, guidance_hi=float("inf"))
    D.distill(cfg, progress=False, log=lambda *_: None)
    assert ddpm.load(tmp_path / "run").recorded["distilled"]["guidance_interval"] == [0.0, float("inf")]


def test_a_teacher_that_is_no_model_is_named_by_the_option_given(tmp_path, fake_mnist):
    """distill's refusal of its teacher named --init, an option distill does not have: it names --teacher."""
    (tmp_path / "empty").mkdir()
    r = invoke("distill", "--teacher", tmp_path / "empty", "--steps-from", 4, "--steps-to", 2, "--data", fake_mnist,
               "--out", tmp_path / "d")
    assert r.exit_code == 1 and r.output.startswith("Error: --teacher: "), r.output
    assert "--init" not in r.output
