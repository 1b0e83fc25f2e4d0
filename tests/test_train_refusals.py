"""A refused `ddpm train` / `ddpm distill` writes nothing where the refusal is known before the run starts (no
options.json, no folder it made), and a run that fails after starting names its last checkpoint only when one
exists."""

import pytest

from helpers import invoke, slow_except, tiny_checkpoint

TRAIN = ("train", "--preset", "tiny", "--timesteps", 20, "--device", "cpu")


def test_a_batch_larger_than_the_data_writes_nothing(fake_mnist, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", user):
        r = invoke(*TRAIN, "--data", fake_mnist, "--steps", 2, "--batch", 100000000, "--out", out)
        assert r.exit_code == 1 and "exceeds the dataset size 256" in r.output, r.output
    assert not (tmp_path / "new").exists()
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


# the train case in the loop; a distillation runs in the loop in test_distill_ckpt.py (its `run` fixture)
@pytest.mark.parametrize("command", slow_except(["train", "distill"], "train"))
def test_a_diverged_run_without_a_checkpoint_says_there_is_none(fake_mnist, tmp_path, command):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    tiny_checkpoint(teacher)
    runs = {"train": (*TRAIN, "--steps", 20, "--batch", 4),
            "distill": ("distill", "--teacher", teacher, "--steps-from", 4, "--steps-to", 2, "--iters", 20,
                        "--fold-iters", 0, "--batch", 4, "--device", "cpu")}
    for args in (runs[command],):
        out = tmp_path / args[0]
        r = invoke(*args, "--data", fake_mnist, "--lr", 1e30, "--out", out)
        assert r.exit_code == 1, r.output
        line = r.output.strip().splitlines()[-1]
        assert "became non-finite" in line and "no checkpoint was written yet" in line, r.output
        assert "last good checkpoint" not in line and not (out / "ckpt.pt").exists()
