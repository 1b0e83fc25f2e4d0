import contextlib
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

# pytest keeps its assertion-rewritten test modules, and Python the project's compiled modules, in __pycache__ (git
# ignores it) only where bytecode may be written. Under PYTHONDONTWRITEBYTECODE every worker of every run rewrote
# and compiled all of them again (about 3 CPU-s per worker, measured on `pytest --collect-only`): the suite writes
# its caches whatever the environment says. Set before the project is imported, for the workers and the `ddpm`
# subprocesses the tests start.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import pytest

import ddpm  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before PyTorch loads, as for every user)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

# PyTorch and numpy are imported where they are used (the test modules, the fixtures), not here: the pytest-xdist
# controller loads this file too and runs no test (importing PyTorch is about 2 CPU-s).




def _pin_xdist_worker() -> None:
    """A pytest-xdist worker runs on its share of the CPUs this run may use (worker i of n: the i-th of n equal
    slices; one CPU each when there are more workers than CPUs), as `taskset` would pin it: PyTorch, onnxruntime
    (runtime.nets.cpu_count follows the affinity mask) and the subprocesses the tests start size their thread
    pools to it. Two workers on 2 cores, each with two intra-op threads, kept 4 busy threads on 2 cores: the
    inner loop took about 9 CPU-s more of some 92 (measured on a busy machine)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus, i, n = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    share = max(1, len(cpus) // n)
    os.sched_setaffinity(0, cpus[i * share % len(cpus):][:share])


_pin_xdist_worker()


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """PyTorch's intra-op threads: at most 2 (one per core of the development machine), at most the CPUs this
    process may use."""
    import torch

    from ddpm.runtime.nets import cpu_count

    torch.set_num_threads(min(2, cpu_count()))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Exports made on first use (engine auto/onnx) go to a throwaway cache, never into the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


def _trace_key(model, precision: str, opset: int) -> str:
    """What onnx_export.to_onnx's file is a function of: the module's class and config, every weight and buffer
    (name, dtype, shape, bytes), the precision and the opset (torch and the tracing code are fixed in a session)."""
    import torch

    h = hashlib.sha256(repr((type(model).__module__, type(model).__qualname__, getattr(model, "cfg", None), precision,
                             opset)).encode())
    for name, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{name} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def traced_once(tmp_path_factory):
    """Each network is traced to ONNX once per run: onnx_export.to_onnx's file (some 200 KB for a tiny model; the
    trace is some 60% of an export's time under cProfile) is kept by _trace_key and written again for a later export
    of the same weights; the rest of the chain (check, verify against PyTorch, metadata, publish) runs every time.
    The pytest-xdist workers of a run share the files through a folder of the run's temporary folder (each trace
    is about 0.4 CPU-s). A test that patches to_onnx replaces this too. DDPM_TEST_TRACE_CHECK=1 traces every time
    and asserts the file is byte for byte the one kept."""
    from ddpm.export import onnx_export

    real, made, check = onnx_export.to_onnx, {}, os.environ.get("DDPM_TEST_TRACE_CHECK") == "1"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent / "traced" if worker else None   # the run's, not the next run's
    if shared:
        shared.mkdir(exist_ok=True)

    def kept(key: str) -> bytes | None:
        if key not in made and shared and (shared / key).is_file():
            made[key] = (shared / key).read_bytes()
        return made.get(key)

    @functools.wraps(real)
    def to_onnx(model, path, precision, opset=17):
        key = _trace_key(model, precision, opset)
        if kept(key) is not None and not check:
            Path(path).write_bytes(made[key])
            return
        real(model, path, precision, opset)
        data = Path(path).read_bytes()
        assert (kept(key) or data) == data, f"{path}: tracing the same network twice gave other bytes"
        made[key] = data
        if shared and not (shared / key).exists():   # published whole: a worker reads a file or none
            (shared / f"{key}.{worker}").write_bytes(data)
            os.replace(shared / f"{key}.{worker}", shared / key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "to_onnx", to_onnx)
        yield


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files (../shared/data/mnist in this workplace, or $DDPM_DATA)."""
    for cand in (os.environ.get("DDPM_DATA"), SHARED_MNIST):
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").exists():
            return Path(cand)
    pytest.skip("real MNIST files not found (set DDPM_DATA)")


def make_fake_mnist(folder: Path, n: int = 256, seed: int = 0) -> Path:
    """Tiny MNIST-shaped data: class k is a bright bar at row 2k+4 (learnable, distinguishable)."""
    import numpy as np

    from ddpm.train.data import write_idx

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 30).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4: 2 * k + 6, 4:24] = 255
    folder.mkdir(parents=True, exist_ok=True)
    for split, m in (("train", n), ("t10k", n // 4)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:m])
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels[:m])
    return folder


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory) -> Path:
    """A folder of fake MNIST files (make_fake_mnist), shared by the session: read it, do not write into it."""
    return make_fake_mnist(tmp_path_factory.mktemp("fake_mnist"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A folder holding a tiny randomised model (helpers.tiny_checkpoint, seed 0), one per test module."""
    from helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("ck")
    tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """built_once(name, build) -> a folder that build(folder) filled, made once per run: the pytest-xdist workers of
    a run share it (the first to ask builds it while the others wait on a lock), a run without workers keeps it
    for its session. Read the folder, never write into it: copy it."""
    import fcntl

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent / "built" if worker else None   # the run's, not the next run's
    made: dict[str, Path] = {}

    def get(name: str, build) -> Path:
        if name in made:
            return made[name]
        if shared is None:
            root = tmp_path_factory.mktemp(name)
            build(root)
        else:
            shared.mkdir(exist_ok=True)
            root = shared / name
            with open(shared / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (shared / f"{name}.done").exists():   # a worker that failed half-way left no .done
                    shutil.rmtree(root, ignore_errors=True)
                    root.mkdir()
                    build(root)
                    (shared / f"{name}.done").touch()
        made[name] = root
        return root

    return get


@pytest.fixture(scope="session")
def fresh_copy(tmp_path_factory, built_once):
    """fresh_copy(name, build, label) -> a new folder (tmp/LABEL-N/m) holding a copy of built_once(name, build): what
    is made once per run, handed to each caller as its own."""
    def copy(name: str, build, label: str) -> Path:
        dst = tmp_path_factory.mktemp(label) / "m"
        shutil.copytree(built_once(name, build), dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def tiny_exported(fresh_copy):
    """tiny_exported(seed=0, fp16=False) -> a new folder holding a tiny model (helpers.tiny_checkpoint(folder, seed))
    as model.safetensors and its ONNX export in exp/ (with the fp16 model when asked). Each export is made once per
    session (an export and its verification cost seconds) and copied for every call: the folder is the caller's."""
    from ddpm.export.onnx_export import export
    from helpers import tiny_checkpoint

    def build(root: Path, seed: int, fp16: bool) -> None:
        export(tiny_checkpoint(root, seed=seed), root / "exp", fp16=fp16, log=lambda *_: None)

    def copy(seed: int = 0, fp16: bool = False) -> Path:
        return fresh_copy(f"tiny-{seed}{'-fp16' if fp16 else ''}", lambda root: build(root, seed, fp16),
                          f"tiny-{seed}-copy")

    return copy


@pytest.fixture(scope="session")
def tiny_generator_exported(fresh_copy):
    """tiny_generator_exported(seed, *options) -> (a new folder holding a tiny model (helpers.tiny_checkpoint(folder,
    seed)) as model.safetensors, and its export in exp/ by `ddpm export --generator OPTIONS`). Each is made once
    per session (an export with a generator and their verifications cost seconds) and copied for every call."""
    from helpers import invoke, tiny_checkpoint

    def build(root: Path, seed: int, options) -> None:
        r = invoke("export", "--ckpt", tiny_checkpoint(root, seed=seed).path, "--out", root / "exp", "--generator",
                   *options)
        assert r.exit_code == 0, r.output

    def copy(seed: int, *options) -> Path:
        name = "-".join(["tiny", str(seed), "generator", *(str(o).strip("-") for o in options)])
        return fresh_copy(name, lambda root: build(root, seed, options), f"tiny-{seed}-generator-copy")

    return copy


@pytest.fixture(scope="session")
def int8_exported(tmp_path_factory, fake_mnist):
    """int8_exported(*options) -> a new folder holding the export of the seed-0 tiny model (the model of `ckpt`) by
    `ddpm export --int8 --data FAKE_MNIST OPTIONS` (fp32 and model_int8.onnx, calibrated on the fake MNIST digits),
    made once per session per options and copied for every call. Its eps error with every Conv int8 was 5.6%
    (measured): the bound (export.int8.MAX_EPS_ERROR) is raised to 8% so that the slow per-Conv pass is left to
    test_int8.test_sensitivity_keeps_the_costliest_convs, and the digits are 16 for calibration and 8 for each check
    instead of the command's 64 and 32 (sized for a real model's ranges): the same steps at a quarter of the cost
    (`int8_calibration_patched`)."""
    from helpers import invoke, tiny_checkpoint

    made = {}

    def copy(*options) -> Path:
        key = tuple(map(str, options))
        if key not in made:
            root = tmp_path_factory.mktemp("int8")
            ck = tiny_checkpoint(root, seed=0)
            with int8_calibration_patched():
                r = invoke("export", "--ckpt", ck.path, "--out", root / "exp", "--int8", "--data", fake_mnist,
                           *options)
            assert r.exit_code == 0, r.output
            made[key] = root / "exp"
        dst = tmp_path_factory.mktemp("int8-copy") / "exp"
        shutil.copytree(made[key], dst)
        return dst

    return copy


@contextlib.contextmanager
def int8_calibration_patched():
    """A context in which `ddpm export --int8` calibrates as int8_exported's exports do (its bound and digits)."""
    from ddpm.export import int8

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8, "MAX_EPS_ERROR", 0.08)
        mp.setattr(int8, "make_int8", functools.partial(int8.make_int8, digits=(16, 8)))
        yield


@pytest.fixture(scope="module")
def tiny_export(tiny_exported) -> Path:
    """The ONNX export folder (fp32) of the seed-0 tiny model (the model of `ckpt`), one per test module."""
    return tiny_exported(0) / "exp"


@pytest.fixture
def small_sample_grids(monkeypatch):
    """Training runs write their samples.png as one row of 0..9 in 2 DDIM steps instead of 4 rows in 25: the same
    code (train/loop.py::write_samples) at a fiftieth of the cost, for tests about the run rather than its grid."""
    from ddpm.train import loop

    monkeypatch.setattr(loop, "write_samples", functools.partial(loop.write_samples, n=10, steps=2))


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """fake_npm(script) -> the folder of a fake `npm` first on the PATH: a shell script of that body, which first
    counts its call as a line in folder/calls. The npm cache of export/web.py is empty (XDG_CACHE_HOME is
    tmp_path/cache), so that a web export asks this npm."""
    def install(script: str) -> Path:
        folder = tmp_path / "bin"
        folder.mkdir()
        (folder / "npm").write_text(f"#!/bin/sh\necho x >> '{folder}/calls'\n{script}\n")
        (folder / "npm").chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        return folder

    return install
