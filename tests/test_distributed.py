"""torchrun on CPU with gloo and 2 processes: same loss curve as one process, same digits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import tiny_checkpoint


def _run(args, nproc=None, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "ddpm.cli", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ddpm.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_training_matches_single_process(fake_mnist, tmp_path):
    args = ["train", "--data", str(fake_mnist), "--preset", "tiny", "--steps", "6", "--batch", "16", "--timesteps", "50",
            "--ckpt-every", "3", "--warmup", "2", "--lr", "1e-3", "--device", "cpu"]
    _run([*args, "--out", str(tmp_path / "one")])
    _run([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert json.loads((tmp_path / "two" / "options.json").read_text())["world_size"] == 2
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)
    # only rank 0 wrote, and the DDP run resumes like any other
    assert (tmp_path / "two" / "ckpt.pt").is_file() and (tmp_path / "two" / "samples.png").is_file()
    _run([*args[:6], "8", *args[7:], "--out", str(tmp_path / "two"), "--resume"], nproc=2)
    assert len(_losses(tmp_path / "two")) == 8


@pytest.mark.slow
def test_ddp_generation_equals_single_process(tmp_path):
    tiny_checkpoint(tmp_path)
    args = ["gen", "--ckpt", str(tmp_path), "-n", "7", "--steps", "4", "--eta", "0.5", "--batch", "3", "-q", "--seed", "9",
            "--device", "cpu"]
    _run([*args, "--out", str(tmp_path / "one.npz")])
    r = _run([*args, "--out", str(tmp_path / "two.npz")], nproc=2)
    assert "2 processes" in r.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])


@pytest.mark.slow
def test_ddp_inpainting_equals_single_process(tmp_path):
    """An editing command under torchrun: each rank its share of the completions, the same as one process."""
    from PIL import Image

    tiny_checkpoint(tmp_path)
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "d.png")
    args = ["inpaint", "--ckpt", str(tmp_path), "--image", str(tmp_path / "d.png"), "-n", "5", "--steps", "4",
            "--resample", "2", "--batch", "2", "-q", "--seed", "9", "--device", "cpu", "--engine", "torch"]
    _run([*args, "--out", str(tmp_path / "one.npz")])
    r = _run([*args, "--out", str(tmp_path / "two.npz")], nproc=2)
    assert "2 processes" in r.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["images"], two["images"]) and one["images"].std() > 10
