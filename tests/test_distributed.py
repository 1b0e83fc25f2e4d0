"""torchrun on CPU with gloo and 2 processes: same loss curve as one process, same digits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import slow_except, tiny_checkpoint


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
    args = ["gen", "--ckpt", str(tmp_path), "-n", "7", "--sampler", "ddim", "--steps", "4", "--eta", "0.5",
            "--batch", "3", "-q", "--seed", "9", "--device", "cpu"]
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


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "$WORLD_SIZE is 'abc', not a whole number >= 1"),
    ({"WORLD_SIZE": "0"}, "$WORLD_SIZE is '0', not a whole number >= 1"),
    ({"WORLD_SIZE": "2"}, "$WORLD_SIZE is 2 but $RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "$RANK is 'x', not a whole number in 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "$RANK is '2', not a whole number in 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "$LOCAL_RANK is '-1', not a whole number in 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "$WORLD_SIZE is 2 but $MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
     "$MASTER_PORT is '99999', not a whole number in 1..65535"),
])
@pytest.mark.parametrize("command", ["gen", "train", "distill"])
def test_torchrun_variables_that_do_not_fit_are_one_line(ckpt, fake_mnist, tmp_path, monkeypatch, env, message,
                                                         command):
    """WORLD_SIZE=abc gave a ValueError traceback, WORLD_SIZE=2 without RANK a KeyError, and without MASTER_ADDR
    torch.distributed's own error, from gen (which needs no PyTorch) too: the torchrun variables are read and checked
    in one place (ddpm.launch) before any work, one line naming the variable."""
    from helpers import invoke

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = {"gen": ["gen", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--out", tmp_path / "g.png"],
            "train": ["train", "--preset", "tiny", "--steps", 1, "--data", fake_mnist, "--out", tmp_path / "r"],
            "distill": ["distill", "--teacher", ckpt, "--steps-from", 4, "--steps-to", 2, "--data", fake_mnist,
                        "--out", tmp_path / "d"]}[command]
    r = invoke(*args)
    lines = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert message in lines[0], lines[0]
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_rank_without_a_world_is_one_process(ckpt, fake_mnist, tmp_path, monkeypatch):
    """RANK set by something else while WORLD_SIZE is unset or 1 is one process: rank 0, which writes its run (a
    RANK=3 left in the environment made train skip its writes)."""
    from helpers import invoke

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    r = invoke("train", "--preset", "tiny", "--steps", 1, "--batch", 8, "--data", fake_mnist, "--out", tmp_path / "r")
    assert r.exit_code == 0 and (tmp_path / "r" / "model.safetensors").is_file(), r.output


@pytest.mark.parametrize("command", slow_except(["gen", "train"], "gen"))
def test_a_signal_while_waiting_for_peers_ends_the_command(ckpt, fake_mnist, tmp_path, command):
    """A torchrun rank whose peers never answer waits in c10d's rendezvous (a native call, up to 30 minutes): SIGTERM
    and Ctrl-C did nothing there (Python runs its handlers in the main thread only, between bytecodes), so
    `timeout` and supervisors had to SIGKILL it. Rank 1 here connects to a server that accepts and never answers;
    once it has connected, SIGTERM gives the one line "terminated" and exit 143, with nothing written."""
    import signal
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(120)
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(server.getsockname()[1]), OMP_NUM_THREADS="1")
    args = {"gen": ["gen", "--ckpt", ckpt, "-n", 2, "--engine", "torch", "--out", tmp_path / "x.png"],
            "train": ["train", "--data", fake_mnist, "--preset", "tiny", "--steps", 2, "--batch", 8, "--device",
                      "cpu", "--out", tmp_path / "run"]}[command]
    p = subprocess.Popen([sys.executable, "-m", "ddpm.cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        peer, _ = server.accept()   # the rank is in the rendezvous now
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        server.close()
    assert p.returncode == 143 and err.strip().splitlines()[-1].startswith("terminated"), (p.returncode, err[-2000:])
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists(), err[-2000:]
    peer.close()


@pytest.mark.slow
def test_a_rank_whose_peer_dies_says_so_in_one_line(fake_mnist, tmp_path):
    """Two torchrun ranks train; rank 1 is killed (-9) after the first checkpoint: rank 0's next gradient
    all-reduce fails in gloo ("Connection closed by peer"), which was a RuntimeError traceback. One line: a process
    of the job stopped, the last checkpoint and --resume; exit 1."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = [sys.executable, "-m", "ddpm.cli", "train", "--data", str(fake_mnist), "--preset", "tiny", "--timesteps",
            "20", "--steps", "100000", "--batch", "8", "--ckpt-every", "2", "--device", "cpu", "--out", str(run)]
    ranks = [subprocess.Popen(args, env=dict(os.environ, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not (run / "ckpt.pt").exists() and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        _, err = ranks[0].communicate(timeout=300)
    finally:
        for p in ranks:
            p.kill()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln and "%|" not in ln]
    assert ranks[0].returncode == 1 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("Error: another process of this torchrun job stopped or lost its connection"), lines
    assert "continue with --resume" in lines[-1] and len([ln for ln in lines if ln.startswith("Error")]) == 1, lines
