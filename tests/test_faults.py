"""Fault injection: commands ended at a chosen atomic write by DDPM_FAULT (files.py's test hook: the signal arrives
inside the N-th write, its temporary cut to half, or at the N-th publish, just before the rename), then the same
command again. After every fault the files a reader would trust are checked to be whole.

* `ddpm train`, killed and resumed: ckpt.pt is always a whole checkpoint of a step it reached (never a later one than
  its model and grid, never going back), SIGTERM and SIGINT name the last checkpoint, and the resumed run ends with
  the weights, log and grid of an uninterrupted run.
* `ddpm export` over an existing export, and the first-use export inside `ddpm gen`: after any kill the folder is
  absent (the old one recoverable), the old complete one or the new complete one, never a part that `gen` trusts.

The write numbers below follow the order in which the commands write (comments list it); the data checks that the
first run writes into the cache are written by the reference run first, so that they are not counted later.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.model.io import load_checkpoint, load_model
from ddpm.runtime.bundle import Bundle, ExportError
from helpers import tiny_checkpoint

STEPS, EVERY = 12, 3
KILLED = -signal.SIGKILL


def _cli(*args, env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    """`ddpm ARGS` in a new process, ended by DDPM_FAULT=fault (None: run to the end)."""
    env = dict(env, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("DDPM_FAULT", None)
    if fault:
        env["DDPM_FAULT"] = fault
    # SIGINT back to its default in the child: a test run in the background of a non-interactive shell (as CI may
    # be) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
    return subprocess.run([sys.executable, "-m", "ddpm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr


def _temporaries(folder: Path) -> list[str]:
    """The hidden entries a write leaves in `folder`; a cache folder's lock file (export/cache.py `locked`: kept on
    purpose, an flock needs a file that outlives the folder's renames) is not a temporary."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")
                  and not (p.name.endswith(".lock") and p.is_file() and p.stat().st_size == 0)) \
        if folder.is_dir() else []


def _train(data, out, env, fault=None, resume=False):
    return _cli("train", "--data", data, "--out", out, "--preset", "tiny", "--timesteps", 10, "--steps", STEPS,
                "--ckpt-every", EVERY, "--batch", 16, "--warmup", 2, "--device", "cpu", "--threads", 1,
                *(["--resume"] if resume else []), env=env, fault=fault)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _model_file(run: Path):
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


def _whole_run(run: Path) -> int:
    """Check that ckpt.pt, model.safetensors and samples.png load, the last two of a step not before ckpt.pt's;
    returns the checkpoint's step."""
    step = load_checkpoint(run / "ckpt.pt")["step"]
    assert load_model(run).info["step"] >= step
    with Image.open(run / "samples.png") as im:
        assert int(im.text["ddpm-step"]) >= step
    return step


@pytest.mark.slow
def test_train_killed_in_its_writes_always_resumes_to_the_same_run(fake_mnist, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    _ok(_train(fake_mnist, ref, env))
    # a new run writes options.json (1), then at steps 3, 6, 9, 12 model.safetensors, samples.png and ckpt.pt
    # (2-4, 5-7, ...): killed inside the write of the step-6 ckpt.pt, which is left as a cut temporary
    r = _train(fake_mnist, run, env, "write:7")
    assert r.returncode == KILLED, r.stderr
    assert _whole_run(run) == 3 and load_model(run).info["step"] == 6
    assert [t.startswith(".ckpt.pt.") for t in _temporaries(run)] == [True]
    # a resumed run writes options.json (1) and the cut log.jsonl (2), then 3 files per checkpoint from the next:
    # killed just before the step-6 ckpt.pt is renamed into place
    r = _train(fake_mnist, run, env, "publish:5", resume=True)
    assert r.returncode == KILLED, r.stderr
    assert _whole_run(run) == 3
    # SIGTERM inside the write of the step-9 model: exit status 143 and the last checkpoint (step 6) named
    r = _train(fake_mnist, run, env, "write:6:TERM", resume=True)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"terminated; last checkpoint at step 6 in {run}, continue with --resume"
    assert _whole_run(run) == 6 and load_model(run).info["step"] == 6
    # SIGINT as the step-12 ckpt.pt is published: exit status 130, step 9 named; model and grid already at step 12
    r = _train(fake_mnist, run, env, "publish:8:INT", resume=True)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"interrupted; last checkpoint at step 9 in {run}, continue with --resume"
    assert _whole_run(run) == 9 and load_model(run).info["step"] == 12
    assert _temporaries(run) == []   # a signal (unlike a kill) removes the temporary of the write it interrupts
    _ok(_train(fake_mnist, run, env, resume=True))
    a, b = load_checkpoint(ref / "ckpt.pt"), load_checkpoint(run / "ckpt.pt")
    assert b["step"] == STEPS
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    # log, model and grid consistent with the checkpoint: every step logged once, with the same losses
    assert [r["step"] for r in _log(run)] == list(range(1, STEPS + 1))
    assert _log(run) == _log(ref)
    assert _model_file(run) == _model_file(ref)
    with Image.open(run / "samples.png") as im, Image.open(ref / "samples.png") as want:
        assert im.text["ddpm-step"] == str(STEPS) and np.array_equal(np.asarray(im), np.asarray(want))
    assert _temporaries(run) == []


def _check_export(out: Path, expected_hash: str) -> Bundle:
    """The export folder loads and each of its ONNX files matches its sha256."""
    b = Bundle.load(out, expected_hash=expected_hash)
    for precision in b.meta["files"]:
        b.onnx_path(precision)
    return b


@pytest.mark.slow
def test_export_killed_in_its_write_never_leaves_a_trusted_partial_folder(tmp_path):
    loaded = tiny_checkpoint(tmp_path)
    out = tmp_path / "exp"
    env = dict(os.environ)
    _ok(_cli("export", "--ckpt", tmp_path, "--out", out, env=env))          # an old, complete export to replace
    first = _check_export(out, loaded.hash).meta["files"]["fp32"]["sha256"]
    # killed while the new folder (fp32 and fp16) is being written: the old export is untouched
    r = _cli("export", "--ckpt", tmp_path, "--out", out, "--fp16", env=env, fault="write:1")
    assert r.returncode == KILLED, r.stderr
    assert set(_check_export(out, loaded.hash).meta["files"]) == {"fp32"}
    assert [t.startswith(".exp.") and t.endswith(".tmp") for t in _temporaries(tmp_path)] == [True]
    # killed between the two renames: the folder is absent and the old one waits aside; a reader puts it back
    r = _cli("export", "--ckpt", tmp_path, "--out", out, "--fp16", env=env, fault="publish:1")
    assert r.returncode == KILLED, r.stderr
    assert not out.exists() and any(t.endswith(".old") for t in _temporaries(tmp_path))
    _ok(_cli("gen", "--export", out, "-n", 2, "--steps", 2, "--out", tmp_path / "x.png", "-q", env=env))
    assert set(_check_export(out, loaded.hash).meta["files"]) == {"fp32"}
    _ok(_cli("export", "--ckpt", tmp_path, "--out", out, "--fp16", env=env))
    b = _check_export(out, loaded.hash)
    assert set(b.meta["files"]) == {"fp32", "fp16"} and b.meta["files"]["fp32"]["sha256"] == first
    assert _temporaries(tmp_path) == []


@pytest.mark.slow
def test_first_use_export_in_gen_killed_in_its_write(tmp_path):
    import ddpm

    tiny_checkpoint(tmp_path)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    exports = tmp_path / "cache" / "ddpm" / "exports"
    model = ddpm.load(tmp_path)
    folder = exports / model.hash[:16]
    args = ("gen", "--ckpt", tmp_path, "-n", 6, "--steps", 3, "--seed", 5, "--out", tmp_path / "x.npz", "-q")
    # gen writes the export into the cache (1), then x.npz (2)
    for fault in ("write:1", "publish:1"):
        r = _cli(*args, env=env, fault=fault)
        assert r.returncode == KILLED, (fault, r.stderr)
        assert not folder.exists() and not (tmp_path / "x.npz").exists(), fault
    r = _cli(*args, env=env, fault="write:2")
    assert r.returncode == KILLED, r.stderr
    try:
        _check_export(folder, model.hash)
    except ExportError as e:
        pytest.fail(f"a first-use export killed after it was published is not whole: {e}")
    assert not (tmp_path / "x.npz").exists()
    _ok(_cli(*args, env=env))
    with np.load(tmp_path / "x.npz") as z:
        want = model.generate(6, steps=3, seed=5, engine="torch")
        assert np.abs(z["images"].astype(int) - want).max() <= 1     # the engines agree within one grey level
    assert _temporaries(exports) == [] and _temporaries(tmp_path) == []
