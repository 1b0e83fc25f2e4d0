"""Abuse cases: tensors that declare more than they store, imports stopped by a memory limit, torch's writer under
the file-size limit, API calls that run out of memory, run-folder members of the wrong kind, an npm registry that
never answers; a training run stopped by a limit (its own options and its last checkpoint), onnxruntime's output
under a descriptor limit, bad command-line input, and files to read that are folders, pipes or dead links."""

import builtins
import errno
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
from ddpm.export import web
from ddpm.model.diffusers import DIFFUSERS_HINT, DiffusersMissing, require_diffusers
from ddpm.model.io import TORCH_HINT, CheckpointError, TorchMissing, load_checkpoint, require_onnx, require_torch
from helpers import invoke, tiny_checkpoint


@pytest.mark.slow
def test_a_tensor_declaring_more_than_its_storage_is_refused_before_use(fake_mnist, tmp_path):
    """An expanded view (stride 0) of one number saved by torch.save declares 10^10 numbers in an 800 KB file:
    refused from its storage size, before any value is read (reading it allocated by the declared shape)."""
    run = tmp_path / "run"
    r = invoke("train", "--data", fake_mnist, "--out", run, "--preset", "tiny", "--timesteps", 20, "--steps", 2,
               "--batch", 8, "--ckpt-every", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    ckpt["ema"]["conv_in.weight"] = torch.zeros(1).expand(100000, 100000)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"declares shape \(100000, 100000\) but its storage holds 1 numbers"):
        load_checkpoint(tmp_path / "ckpt.pt")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000   # KiB: nothing of 40 GB was made


def test_an_import_stopped_by_a_memory_limit_names_the_limit(monkeypatch):
    """PyTorch installed but unable to load under `ulimit -v` ("cannot allocate memory for thread-local data") is
    a limit, not a missing package."""
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "torch":
            raise ImportError("libtorch_cpu.so: cannot allocate memory for thread-local data")
        return real(name, *a, **k)

    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ddpm.DdpmError, match="out of memory"):
        require_torch("training")
    from ddpm.runtime.engines import have_torch
    with pytest.raises(ddpm.DdpmError, match="out of memory"):
        have_torch()


UNMAPPED = "libdl.so.2: failed to map segment from shared object"   # an import under ulimit -v


def _unmappable(monkeypatch, *names):
    """Imports of `names` (top-level packages) fail as under a memory limit: their shared library cannot be mapped."""
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] in names:
            raise ImportError(UNMAPPED)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_every_api_call_names_a_memory_limit_that_stops_a_native_import(ckpt, monkeypatch):
    """A native library that cannot be mapped under `ulimit -v` (safetensors' reader, reached by ddpm.load with no
    check of its own; numpy, while ddpm's first public name loads; TensorRT) raises ddpm.LimitReached naming the
    limit, a DdpmError: never the ImportError, never "not installed"."""
    from ddpm.errors import LimitReached
    from ddpm.runtime.trt import import_trt

    _unmappable(monkeypatch, "safetensors", "tensorrt")
    with pytest.raises(LimitReached, match=r"^ddpm\.load\(\): out of memory"):
        ddpm.load(ckpt)
    with pytest.raises(LimitReached, match="^out of memory"):
        import_trt()
    monkeypatch.undo()
    monkeypatch.delitem(ddpm.__dict__, "load", raising=False)   # ddpm.load not imported yet: `import ddpm` only
    monkeypatch.delitem(sys.modules, "ddpm.api")
    _unmappable(monkeypatch, "numpy")
    with pytest.raises(LimitReached, match=r"^ddpm\.load: out of memory"):
        ddpm.load


@pytest.mark.parametrize("module, require, message, missing", [
    ("torch", require_torch, "training needs PyTorch: " + TORCH_HINT, TorchMissing),
    ("onnx", require_onnx, "training needs the onnx package: " + TORCH_HINT, TorchMissing),
    ("diffusers", require_diffusers, "training needs the diffusers package: " + DIFFUSERS_HINT, DiffusersMissing)])
def test_a_missing_package_is_one_line_naming_what_needs_it_and_the_install(monkeypatch, module, require, message,
                                                                            missing):
    monkeypatch.setitem(sys.modules, module, None)   # import of <module> halted: as if not installed
    with pytest.raises(missing) as e:
        require("training")
    assert str(e.value) == message and type(e.value) is missing
    monkeypatch.undo()
    assert require("training") is sys.modules[module]


@pytest.mark.slow
def test_a_checkpoint_over_the_file_size_limit_is_an_efbig(tmp_path):
    """torch.save's own writer reported the file-size limit as 'unexpected pos' without an errno; the checkpoint
    is written by Python, so the limit is EFBIG, which the writer names in one line, and nothing is left."""
    code = ("import signal, torch; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "from ddpm.model.io import save_checkpoint\n"
            "try:\n    save_checkpoint('c.pt', {'w': torch.zeros(200000)})\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (300 << 10, 300 << 10)))
    assert r.stdout.startswith("OutputError c.pt was not written: it would be larger than the file-size limit of "
                               "307200 bytes (ulimit -f 300)"), r.stdout + r.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_api_calls_that_would_exhaust_memory_raise_ddpm_errors(tmp_path):
    model = ddpm.load(tiny_checkpoint(tmp_path).path)
    with pytest.raises(ddpm.DdpmError):
        model.generate(10 ** 12, steps=1, engine="torch")
    with pytest.raises(ddpm.DdpmError):
        model.labels(10 ** 12)
    with pytest.raises(ddpm.DdpmError, match="size"):
        model.picture(np.zeros((28, 28), np.uint8), size=(10 ** 5, 10 ** 5))


@pytest.mark.parametrize("member", ["samples.png", "log.jsonl", "options.json"])
def test_train_refuses_run_folder_members_of_another_kind_before_any_work(fake_mnist, tmp_path, member):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / member)
    r = invoke("train", "--data", fake_mnist, "--out", out, "--preset", "tiny", "--timesteps", 20, "--steps", 2,
               "--batch", 8, "--ckpt-every", 2, "--device", "cpu")
    assert r.exit_code == 1 and "pipe" in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == [member]


def test_an_npm_registry_that_never_answers_is_one_line_in_bounded_time(fake_npm, monkeypatch):
    fake_npm("sleep 30")
    monkeypatch.setattr(web, "NPM_FIRST_TRY_S", 2)
    t = time.monotonic()
    with pytest.raises(web.WebExportError, match="got no answer in 2 s") as e:
        web.ort_web_tarball(log=lambda *_: None)
    assert time.monotonic() - t < 20 and "--ort-web" in str(e.value)


def test_export_web_says_at_once_that_npm_cannot_fetch_onnxruntime_web(ckpt, tmp_path, fake_npm):
    """`ddpm export --web` with npm failing: one line before any export work (docs/export.md: "fails at once"), so
    no export folder is written for a page that cannot be made."""
    fake_npm("echo 'npm error code ECONNREFUSED' >&2\nexit 1")
    out = tmp_path / "exp"
    r = invoke("export", "--ckpt", ckpt, "--out", out, "--web", tmp_path / "site")
    line = _error_line(r)
    assert "--ort-web" in line and not out.exists() and not (tmp_path / "site").exists(), r.output[-2000:]


def _error_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and "Traceback" not in r.output and lines[-1].startswith("Error: "), r.output[-3000:]
    return lines[-1]


def test_a_training_run_stopped_by_a_limit_names_its_own_options_and_its_last_checkpoint(fake_mnist, tmp_path,
                                                                                        monkeypatch):
    """`ddpm train` past the file-size limit or out of memory, in its loop or before it (PyTorch's import, the data of
    --resume): one line with what `train` can change (--batch: -n is gen's) and the last checkpoint on disk, with
    --resume to continue. The message comes from the command that runs: the Python API names no option."""
    import ddpm.train.loop as loop
    from ddpm.errors import limit_message

    monkeypatch.setattr(loop, "write_samples", lambda *a, **k: None)   # the grid of a checkpoint: not needed here
    run = tmp_path / "run"
    real_loss, calls = loop.diffusion_loss, [0]

    def loss_then(raised):
        def loss(*a, **k):
            calls[0] += 1
            if calls[0] == 3:   # the third step, after the checkpoint of step 2
                raise raised
            return real_loss(*a, **k)
        return loss

    monkeypatch.setattr(loop, "diffusion_loss", loss_then(OSError(errno.EFBIG, "File too large")))
    line = _error_line(invoke("train", "--data", fake_mnist, "--out", run, "--preset", "tiny", "--timesteps", 20,
                              "--batch", 8, "--steps", 4, "--ckpt-every", 2, "--device", "cpu"))
    assert "file-size limit" in line and "last checkpoint at step 2 in" in line and "--resume" in line, line
    assert "run again" not in line, line   # a run that holds a checkpoint goes on with --resume

    def no_memory(*a, **k):
        raise MemoryError()

    resume = ["train", "--data", fake_mnist, "--out", run, "--steps", 4, "--resume", "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(loop, "load_mnist", no_memory)   # before the loop: reading the data of --resume
        line = _error_line(invoke(*resume))
    assert "out of memory" in line and "(a smaller --batch)" in line and "-n " not in line, line
    assert "last checkpoint at step 2 in" in line and "--resume" in line, line

    calls[0] = 1   # the next step raises: step 3, the first after the resumed checkpoint
    monkeypatch.setattr(loop, "diffusion_loss", loss_then(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")))
    line = _error_line(invoke(*resume))
    assert "out of memory" in line and "(a smaller --batch)" in line and "-n " not in line, line
    assert "last checkpoint at step 2 in" in line, line

    assert "(a smaller" not in limit_message(MemoryError()), limit_message(MemoryError())


def test_an_out_of_memory_in_gen_names_gens_options(ckpt, monkeypatch):
    import ddpm.pipeline as pipeline

    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(pipeline, "run", no_memory)
    line = _error_line(invoke("gen", "--ckpt", ckpt, "--engine", "torch", "-n", 2, "--steps", 2, "-q"))
    assert "out of memory" in line and "(a smaller -n or --batch)" in line, line


def test_onednn_failing_under_a_memory_limit_is_out_of_memory(monkeypatch):
    """`ddpm train --resume` under `ulimit -v 850000` ended in a traceback, "RuntimeError: could not create a
    primitive" (oneDNN, inside loss.backward()): with a memory limit set, that is the limit."""
    import ddpm.errors as errors

    primitive = RuntimeError("could not create a primitive")
    monkeypatch.setattr(errors, "_limit", lambda name: {"AS": 850000 << 10}.get(name))
    assert "out of memory" in errors.limit_message(primitive) and "ulimit -v 850000" in errors.limit_message(primitive)
    monkeypatch.setattr(errors, "_limit", lambda name: None)
    assert errors.limit_message(primitive) is None   # without a limit it may be anything: passed on as it is


@pytest.mark.slow
def test_onnxruntime_under_a_descriptor_limit_says_one_line_or_nothing(tmp_path):
    """`ulimit -n 6; ddpm gen --engine onnx`: onnxruntime's import printed its warnings (cpuinfo, telemetry, device
    discovery: 9 lines) before the error. Whatever the limit, a run now prints nothing or one line naming it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outcomes = []
    for n in range(5, 11):
        r = subprocess.run(["ddpm", "gen", "-n", "2", "--steps", "2", "--engine", "onnx", "-q", "--out", f"d{n}.png"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
        lines = r.stderr.splitlines()
        if r.returncode == 0:
            assert lines == [], (n, r.stderr[-3000:])
        else:
            assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: too many open files") \
                and f"ulimit -n {n}" in lines[0], (n, r.stderr[-3000:])
        outcomes.append(r.returncode)
    assert 0 in outcomes, outcomes   # the limits tried include ones that the command runs under


@pytest.mark.parametrize("args, option", [
    (["gen", "-n", "abc"], "'-n'"),
    (["gen", "--sampler", "nope"], "'--sampler'"),
    (["gen", "--foo"], "'--foo'"),
    (["gen", "--label", "3", "--uncond"], "--label and --uncond"),
    (["gen", "--steps", "0"], "'--steps'"),
    (["train", "--batch", "0"], "'--batch'"),
    (["nope"], "'nope'"),
    (["--foo"], "'--foo'"),
])
def test_bad_command_line_input_is_one_line_with_exit_status_2(args, option):
    """A bad or unknown option (or command) printed click's usage block and a hint on 4 lines; it is one line that
    names the option and where help is, exit status 2 (a usage error, as before)."""
    r = invoke(*args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("Error: ") and option in lines[0] and lines[0].endswith(" --help)"), lines[0]
    assert "Usage:" not in r.output


def test_help_is_still_shown_for_no_arguments_and_help():
    for args, status in (([], 2), (["--help"], 0), (["gen", "--help"], 0), (["train", "-h"], 0)):
        r = invoke(*args)
        assert r.exit_code == status and r.output.startswith("Usage: ") and "Options:" in r.output, (args, r.output)


def _put(path, kind):
    """Put `kind` at `path` in place of a file: a folder, a pipe, a dangling link."""
    if os.path.lexists(path):
        os.remove(path)
    {"folder": os.mkdir, "pipe": os.mkfifo, "dangling link": lambda p: os.symlink("/nonexistent/x", p)}[kind](path)


def _finishes(fn, seconds=60):
    """fn() run in a thread: what it raised (None if nothing), or a failure when it is still blocked after
    `seconds` (reading a pipe that no one writes)."""
    out = []

    def target():
        try:
            fn()
            out.append(None)
        except BaseException as e:   # noqa: BLE001 (handed to the test)
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still blocked after {seconds} s"
    return out[0]


SAID = {"folder": "is a folder, not a file", "pipe": "is a pipe, not a file",
        "dangling link": "is a symbolic link to /nonexistent/x, which does not exist"}


@pytest.mark.parametrize("kind", list(SAID))
@pytest.mark.parametrize("member", ["export.json", "model.onnx"])
def test_an_export_folder_member_of_another_kind_is_named(tiny_export, tmp_path, member, kind):
    """export.json (or a file it names) that is a folder, a pipe or a dangling link: the message says exactly that
    (it said "no export.json" or "is missing"), and nothing waits on a pipe."""
    import shutil

    from ddpm.runtime.bundle import Bundle, ExportError

    exp = tmp_path / "exp"
    shutil.copytree(tiny_export, exp)
    _put(exp / member, kind)
    e = _finishes(lambda: Bundle.load(exp).onnx_path())
    redo = "ddpm export" if member == "export.json" else f"ddpm export --ckpt CKPT --out {exp}"
    assert isinstance(e, ExportError) and str(e) == f"{exp / member} {SAID[kind]}; re-run `{redo}`", e
    if member == "export.json":   # ddpm.load of the folder takes it for an export folder, not a model folder
        e = _finishes(lambda: ddpm.load(exp))
        assert f"{exp / member} {SAID[kind]}" in str(e), e


@pytest.mark.parametrize("kind", list(SAID))
def test_every_file_read_refuses_another_kind_in_one_line(ckpt, fake_mnist, tmp_path, kind):
    """The same check (files.input_path) for every file read: a run folder's model.safetensors and ckpt.pt, a
    checkpoint named directly, a samples file, a picture, the classifier's weights, the --ort-web tarball."""
    import shutil

    from ddpm.evaluation import reference
    from ddpm.export.web import ort_web_tarball
    from ddpm.model.io import load_checkpoint, load_model
    from ddpm.runtime.images import read_image
    from ddpm.samples import read_samples

    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    _put(run / "model.safetensors", kind)   # was passed over for ckpt.pt (or said "not a regular file")
    _put(tmp_path / "x", kind)
    for call, name in ((lambda: load_model(run), run / "model.safetensors"),
                       (lambda: load_checkpoint(tmp_path / "x"), tmp_path / "x"),
                       (lambda: read_samples(tmp_path / "x"), tmp_path / "x"),
                       (lambda: read_image(tmp_path / "x"), tmp_path / "x"),
                       (lambda: reference(fake_mnist, tmp_path / "x", download=False, log=None), tmp_path / "x"),
                       (lambda: ort_web_tarball(tmp_path / "x"), tmp_path / "x")):
        e = _finishes(call)
        assert e is not None and f"{name} {SAID[kind]}" in str(e) and "\n" not in str(e), (name, e)


def test_an_unreadable_export_json_says_so(tiny_export, tmp_path, monkeypatch):
    """A file that cannot be opened (as root, chmod 000 still can: the refusal is simulated)."""
    import shutil

    from ddpm import files
    from ddpm.runtime.bundle import Bundle, ExportError

    exp = tmp_path / "exp"
    shutil.copytree(tiny_export, exp)
    real = os.open

    def refuse(path, *a, **k):
        if os.fspath(path) == os.fspath(exp / "export.json"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(files.os, "open", refuse)
    with pytest.raises(ExportError, match=r"export.json cannot be read \(Permission denied\); re-run `ddpm export`"):
        Bundle.load(exp)


def test_a_checkpoint_past_the_file_size_limit_says_once_how_to_go_on(fake_mnist, tmp_path, monkeypatch):
    """A checkpoint write that fails on the file-size limit or a full disk: the line names the fault and then how a
    training run goes on (run the command again, or --resume), once; the write's own "and run again" is left out."""
    import ddpm.train.loop as loop
    from ddpm.files import no_space, too_large

    for fault in (too_large, no_space):
        def save(path, *a, **k):
            raise fault(Path(path))

        monkeypatch.setattr(loop, "save_model", save)
        line = _error_line(invoke("train", "--data", fake_mnist, "--out", tmp_path / fault.__name__, "--preset",
                                  "tiny", "--timesteps", 20, "--batch", 8, "--steps", 2, "--ckpt-every", 2,
                                  "--device", "cpu"))
        assert "checkpoint at step 2" in line and line.count("again") == 1, line


@pytest.mark.parametrize("kind", ["pipe", "other file"])
def test_a_bad_ort_web_tarball_is_refused_before_the_export(ckpt, tmp_path, kind):
    """`ddpm export --web SITE --ort-web X` with X a pipe or not the pinned tarball: one line before any export work,
    so no export folder is written for a page that cannot be made."""
    given = tmp_path / "ort.tgz"
    if kind == "pipe":
        os.mkfifo(given)
    else:
        given.write_bytes(b"not onnxruntime-web")
    out = tmp_path / "exp"
    r = invoke("export", "--ckpt", ckpt, "--out", out, "--web", tmp_path / "site", "--ort-web", given)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: "), r.output[-2000:]
    assert "--ort-web" in r.output and not out.exists(), r.output[-2000:]


@pytest.mark.filterwarnings("ignore::UserWarning")   # sparse CSR is beta, quantized tensors deprecated
@pytest.mark.parametrize("kind, make", [
    ("sparse_coo", lambda: torch.eye(3).to_sparse()),
    ("sparse_csr", lambda: torch.eye(3).to_sparse_csr()),
    ("quantized", lambda: torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.quint8)),
])
def test_a_tensor_that_is_not_dense_is_one_line(tmp_path, kind, make):
    """torch.load(weights_only=True) lets sparse and quantized tensors through; measuring a sparse one's storage
    raised NotImplementedError (a traceback from gen, train --init/--resume, a bare exception from ddpm.load).
    Every tensor of a checkpoint is dense or the file is refused, naming the tensor."""
    from ddpm.model.io import CKPT_FORMAT

    torch.save({"format": CKPT_FORMAT, "step": 1, "ema": {"conv_in.weight": make()}}, tmp_path / "ckpt.pt")
    word = "quantized" if kind == "quantized" else kind
    with pytest.raises(CheckpointError, match=rf"ema\.conv_in\.weight is an? {word} tensor, not a dense one"):
        load_checkpoint(tmp_path / "ckpt.pt")
