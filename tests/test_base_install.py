"""The base install (numpy + onnxruntime, no PyTorch) generates the same digits as the full install."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_runtime_imports_no_torch():
    """Generating on a CPU never imports PyTorch: the modules it needs, and the CLI's, stay torch-free."""
    code = ("import sys, ddpm, ddpm.api, ddpm.cli, ddpm.runtime.runner, ddpm.runtime.generate, ddpm.runtime.engines, "
            "ddpm.runtime.edits, ddpm.runtime.images, ddpm.bench.speed, ddpm.evaluation; m = ddpm.load(); d = m.generate(2, steps=2); "
            "m.inpaint(d[0], n=1, steps=2); m.edit(d[0], label=3, n=1, steps=2); "
            "m.upscale(d[0][::2, ::2].copy(), 2, n=1, steps=2); m.restore(d[0], 0.3, n=1, steps=2); "
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow   # a second no-torch process: test_runtime_imports_no_torch is the inner loop's
def test_default_plan_generator_needs_neither_onnx_nor_torch(tmp_path):
    """The shipped export holds the default plan's generator: `--engine onnx-generator` runs without the onnx package
    (which building one needs) and without PyTorch, and gives the onnx engine's digits within 1 grey level."""
    code = ("import sys; sys.modules['onnx'] = None; import numpy as np, ddpm; m = ddpm.load(); "
            "a = m.generate(6, seed=4, batch=4, engine='onnx-generator'); b = m.generate(6, seed=4, batch=4, "
            "engine='onnx'); assert a.std() > 20 and np.abs(a.astype(int) - b).max() <= 1; "
            "assert 'torch' not in sys.modules; import os; "
            "assert not os.path.exists(os.path.join(os.environ['XDG_CACHE_HOME'], 'ddpm'))")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    """A venv with `pip install <repo>` and no extras (skipped when no package index is reachable)."""
    root = tmp_path_factory.mktemp("base") / "venv"
    venv.create(root, with_pip=True)
    py = root / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(REPO)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"could not install the base package into a venv (no package index?): {r.stderr[-500:]}")
    return root


@pytest.mark.slow
def test_base_install_generates_the_same_digits(base_venv, tmp_path):
    py, ddpm = base_venv / "bin" / "python", base_venv / "bin" / "ddpm"
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0, "the base install must not bring PyTorch"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = ["gen", "-n", "8", "-q", "--steps", "10", "--seed", "5"]
    r = subprocess.run([str(ddpm), *args, "--out", str(tmp_path / "base.npz")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # the full install (this process's environment), eager PyTorch: the reference
    r = subprocess.run([sys.executable, "-m", "ddpm.cli", *args, "--engine", "torch", "--out", str(tmp_path / "full.npz")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    base, full = (np.load(tmp_path / f)["images"].astype(int) for f in ("base.npz", "full.npz"))
    assert base.std() > 20 and np.abs(base - full).max() <= 1
    # an editing command too (RePaint), on its default engine, against eager PyTorch
    from PIL import Image

    Image.fromarray(np.load(tmp_path / "full.npz")["images"][0].astype(np.uint8)).save(tmp_path / "d.png")
    args = ["inpaint", "--image", str(tmp_path / "d.png"), "-n", "3", "-q", "--steps", "10", "--seed", "5"]
    r = subprocess.run([str(ddpm), *args, "--out", str(tmp_path / "ibase.npz")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "onnx" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "ddpm.cli", *args, "--engine", "torch", "--out",
                        str(tmp_path / "ifull.npz")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    base, full = (np.load(tmp_path / f)["images"].astype(int) for f in ("ibase.npz", "ifull.npz"))
    assert np.abs(base - full).max() <= 1
    # commands that need PyTorch say so in one line
    for cmd in (["train", "--steps", "1"], ["export"], ["eval", "-n", "2"], ["gen", "-n", "1", "--engine", "torch"]):
        r = subprocess.run([str(ddpm), *cmd], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1 and 'pip install ".[torch]"' in r.stderr and "Traceback" not in r.stderr, cmd
