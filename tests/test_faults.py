"""Fault injection: `kill -9` at random moments (a seeded loop of short random delays, and kills the instant a
temporary file appears, i.e. inside checkpoint and export writes), then the same command again. The processes run
with every rename of a finished temporary delayed by 0.15 s (LAUNCH), which widens the window between writing a
file and publishing it, so that kills land inside writes often; it changes no result.

* `ddpm train`, killed and resumed over and over: it always resumes, never loses more than one checkpoint interval,
  leaves no temporary behind, and its final weights, log and sample grid equal an uninterrupted run's.
* `ddpm export` (over an existing export) and the first-use export inside `ddpm gen`: after any kill the folder is
  absent, the old complete one or the new complete one, never a part that a later `gen` would trust.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.model.io import load_checkpoint
from ddpm.runtime.bundle import Bundle, ExportError
from helpers import tiny_checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
STEPS, EVERY = 12, 3
LAUNCH = """
import os, sys, time
real = os.replace
def replace(src, dst, **kw):
    if str(src).endswith(".tmp"):
        time.sleep(0.15)
    return real(src, dst, **kw)
os.replace = replace
from ddpm.cli import main
sys.argv[0] = "ddpm"
main()
"""


def _cli(*args, env=None) -> subprocess.Popen:
    """`ddpm ARGS` in a new process, its stderr into a file (a pipe nobody reads could fill up and block it)."""
    err = tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-c", LAUNCH, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err,
                         env=env or ENV, text=True)
    p.err = err
    return p


def _finish(p: subprocess.Popen, timeout: float = 600) -> None:
    p.wait(timeout=timeout)
    p.err.seek(0)
    assert p.returncode == 0, p.err.read()


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _kill_at_random(p: subprocess.Popen, rng: random.Random, watch: Path, max_delay: float, in_write: int = 0,
                    prefixes: tuple[str, ...] = (".",), linger: float = 0.0) -> str:
    """kill -9 `p`: after a random delay up to max_delay, or (in_write = k > 0) inside the k-th write that starts,
    i.e. while the k-th new temporary whose name starts with one of `prefixes` exists in `watch` (after a random
    further 0..linger s while it still does). Returns "finished" (before the kill), "killed" or "killed in a write"."""
    before = set(_temporaries(watch))          # a killed run's leftovers, which the next run removes
    new = lambda: {t.name for t in _temporaries(watch) if t.name.startswith(prefixes)} - {t.name for t in before}
    seen: set = set()
    deadline = time.monotonic() + (max_delay if in_write else rng.uniform(0.2, max_delay))
    while p.poll() is None and time.monotonic() < deadline:
        current = new()
        seen |= current
        if in_write and len(seen) >= in_write and current:
            end = time.monotonic() + rng.uniform(0, linger)
            while p.poll() is None and time.monotonic() < end and new():
                time.sleep(0.002)
            break
        time.sleep(0.002)
    if p.poll() is not None:
        return "finished"
    now = bool(new())
    p.kill()
    p.wait()
    return "killed in a write" if now else "killed"


def _train(data, out, resume=False):
    return _cli("train", "--data", data, "--out", out, "--preset", "tiny", "--timesteps", 10, "--steps", STEPS,
                "--ckpt-every", EVERY, "--batch", 16, "--warmup", 2, "--device", "cpu", "--threads", 1,
                *(["--resume"] if resume else []))


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _model_file(run: Path):
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


def test_train_killed_at_random_always_resumes_to_the_same_run(fake_mnist, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    t0 = time.monotonic()
    p = _train(fake_mnist, ref)
    while p.poll() is None and not (ref / "options.json").exists():
        time.sleep(0.01)
    startup = time.monotonic() - t0           # imports and data, before the first step
    _finish(p)
    per_step = (time.monotonic() - t0 - startup) / STEPS
    rng = random.Random(18)
    ends, best, kept = [], 0, []
    for attempt in range(5):
        left, resume = STEPS - best, (run / "ckpt.pt").is_file()
        p = _train(fake_mnist, run, resume)
        if attempt % 2 == 0:   # inside the k-th checkpoint write (model, grid, ckpt.pt: 3 per checkpoint) to come;
            # the first time after a whole checkpoint, so that every later attempt resumes
            k = rng.randint(4, 9) if attempt == 0 else rng.randint(1, 3 * (left // EVERY))
            end = _kill_at_random(p, rng, run, max_delay=4 * (startup + per_step * left), in_write=k,
                                  prefixes=(".ckpt.pt.", ".model.safetensors.", ".samples.png."))
        else:                  # at a random moment before the run would end
            end = _kill_at_random(p, rng, run, max_delay=startup + 0.8 * per_step * left)
        ends.append(("resumed " if resume else "") + end)
        if (run / "ckpt.pt").is_file():
            step = load_checkpoint(run / "ckpt.pt")["step"]          # always whole and loadable
            assert step % EVERY == 0 and step >= best                 # never goes back: at most one interval lost
            best = step
        kept.append(best)
        if best == STEPS:
            break
    # then to the end: resume (or, if it finished, nothing left to do)
    if best < STEPS:
        _finish(_train(fake_mnist, run, resume=(run / "ckpt.pt").is_file()))
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
    # the first kill was inside a checkpoint write, and resumed runs were killed too
    assert ends[0] == "killed in a write" and any(e.startswith("resumed killed") for e in ends), (ends, kept)


def test_export_killed_at_random_never_leaves_a_trusted_partial_folder(tmp_path):
    loaded = tiny_checkpoint(tmp_path)
    out = tmp_path / "exp"
    t0 = time.monotonic()
    _finish(_cli("export", "--ckpt", tmp_path, "--out", out))        # an old, complete export to replace
    whole = 1.5 * (time.monotonic() - t0)                            # fp16 too: a little longer
    first = Bundle.load(out, expected_hash=loaded.hash).meta["files"]["fp32"]["sha256"]
    rng = random.Random(14)
    ends = []
    # even attempts kill inside the write (a random 0..0.2 s after the new folder appears; a longer linger let a fast
    # machine finish the export first), odd ones at a random moment; until two kills landed inside the write
    for attempt in range(10):
        if attempt >= 4 and ends.count("killed in a write") >= 2:
            break
        p = _cli("export", "--ckpt", tmp_path, "--out", out, "--fp16")
        ends.append(_kill_at_random(p, rng, tmp_path, max_delay=whole, in_write=attempt % 2 == 0, prefixes=(".exp.",),
                                    linger=min(0.2, whole / 4)))
        if out.is_dir():   # whatever is there is complete: it loads, and its ONNX files match their sha256
            b = Bundle.load(out, expected_hash=loaded.hash)
            for precision in b.meta["files"]:
                b.onnx_path(precision)
        else:              # killed between the two renames: the old one waits aside, restored by the next run
            assert any(t.name.endswith(".old") for t in _temporaries(tmp_path))
    assert ends.count("killed in a write") >= 2, ends
    _finish(_cli("export", "--ckpt", tmp_path, "--out", out, "--fp16"))
    b = Bundle.load(out, expected_hash=loaded.hash)
    assert set(b.meta["files"]) == {"fp32", "fp16"} and b.meta["files"]["fp32"]["sha256"] == first
    assert _temporaries(tmp_path) == []
    _finish(_cli("gen", "--export", out, "-n", 2, "--steps", 2, "--out", tmp_path / "x.png", "-q"))


def test_first_use_export_in_gen_killed_at_random(tmp_path):
    import ddpm

    tiny_checkpoint(tmp_path)
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "cache"))
    exports = tmp_path / "cache" / "ddpm" / "exports"
    model = ddpm.load(tmp_path)
    folder = exports / model.hash[:16]
    args = ("gen", "--ckpt", tmp_path, "-n", 6, "--steps", 3, "--seed", 5, "--out", tmp_path / "x.npz", "-q")
    rng = random.Random(15)
    ends = []
    # attempt 1 kills at a random moment; the others inside the export's write, a random 0..0.2 s after its temporary
    # appears. When a kill misses the write (the export finished first: how long it takes depends on the machine's
    # load), the complete export is checked and removed, so that the next gen exports again
    for attempt in range(8):
        in_write = attempt != 1
        ends.append(_kill_at_random(_cli(*args, env=env), rng, exports, max_delay=60.0 if in_write else 10.0,
                                    in_write=in_write, linger=0.2))
        if folder.is_dir():
            try:
                Bundle.load(folder, expected_hash=model.hash).onnx_path("fp32")
            except ExportError as e:
                pytest.fail(f"a killed first-use export left a folder: {e}")
        if attempt >= 1 and "killed in a write" in ends:
            break
        if ends[-1] != "killed in a write":
            shutil.rmtree(folder, ignore_errors=True)
    assert "killed in a write" in ends, ends
    _finish(_cli(*args, env=env))
    with np.load(tmp_path / "x.npz") as z:
        want = model.generate(6, steps=3, seed=5, engine="torch")
        assert np.abs(z["images"].astype(int) - want).max() <= 1     # the engines agree within one grey level
    assert _temporaries(exports) == [] and _temporaries(tmp_path) == []
