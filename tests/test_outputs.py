"""Outputs: every file is published atomically, stale temporaries of killed writes are cleaned, output locations are
checked before any work, a full disk and Ctrl-C give one line and leave every file whole."""

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm import files
from ddpm.files import OutputError, atomic_write, check_writable, clean_stale, publish_dir, temp_dir
from helpers import invoke, slow_except


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -------------------------------------------------------------------------------------------- stale temporaries
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_clean_stale_removes_only_dead_writers(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    names = {
        f".ckpt.pt.{files.HOST}-{dead}.abcd1234.tmp": False,        # its writer is gone: removed
        f".ckpt.pt.{files.HOST}-{live}.abcd1234.tmp": True,         # a running writer: kept, however old
        f".ckpt.pt.0badc0-{dead}.abcd1234.tmp": True,               # another host, young: kept
        ".ckpt.pt.k2j4_x9a.tmp": True,                              # untagged (older versions), young: kept
        ".ckpt.pt.zz9_aaaa.tmp": False,                             # untagged and old: removed
        f".samples.png.{files.HOST}-{dead}.ab12cd34.tmp": True,     # another target: not this call's
        "ckpt.pt": True, ".hidden": True,                          # not ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - 2 * files.STALE_AFTER
    os.utime(tmp_path / ".ckpt.pt.zz9_aaaa.tmp", (old, old))
    os.utime(tmp_path / f".ckpt.pt.{files.HOST}-{live}.abcd1234.tmp", (old, old))
    clean_stale(tmp_path, "ckpt.pt")
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
    clean_stale(tmp_path)   # every tagged one in the folder
    assert f".samples.png.{files.HOST}-{dead}.ab12cd34.tmp" not in {p.name for p in tmp_path.iterdir()}


def test_a_write_into_a_folder_cleans_every_dead_writers_temporaries(tmp_path):
    """The module docstring's promise: the next write into the folder removes the temporaries whose writer is gone,
    of any target (a killed `gen --out a.npz` leaves one that `gen --out b.npz` removes), and keeps a live writer's;
    a file write and a folder write alike."""
    dead, live = _dead_pid(), os.getppid()
    gone = [tmp_path / f".a.npz.{files.HOST}-{dead}.q1w2e3r4.tmp", tmp_path / f".site.{files.HOST}-{dead}.z9y8x7w6.tmp"]
    running = tmp_path / f".c.npz.{files.HOST}-{live}.a1s2d3f4.tmp"
    for p in (gone[0], running):
        p.write_bytes(b"half")
    gone[1].mkdir()
    atomic_write(tmp_path / "b.npz", lambda t: Path(t).write_bytes(b"b"))
    assert not any(p.exists() for p in gone) and running.exists()
    gone[0].write_bytes(b"half")
    shutil.rmtree(temp_dir(tmp_path / "other"))
    assert not gone[0].exists() and running.exists()


def test_atomic_write_cleans_stale_temporaries_of_its_target(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".x.npz.{files.HOST}-{dead}.q1w2e3r4.tmp"
    stale.write_bytes(b"half")
    atomic_write(tmp_path / "x.npz", lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


def test_export_folder_replaced_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "export.json").write_text("old")
    new = temp_dir(out)
    (new / "export.json").write_text("new")
    # killed between the two renames: the old folder is aside, `out` is missing; the next writer restores it
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(new, out)
    monkeypatch.setattr(files.os, "rename", real)
    assert (out / "export.json").read_text() == "old"       # put back by publish_dir itself
    # the same kill with no chance to put it back: simulate by renaming aside as a dead writer would have left it
    aside = tmp_path / f".exp.{files.HOST}-{_dead_pid()}.deadbeef.old"
    real(out, aside)
    clean_stale(tmp_path, "exp")
    assert (out / "export.json").read_text() == "old" and not aside.exists()
    assert publish_dir(new, out) and (out / "export.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.slow
def test_reader_restores_an_export_left_aside_by_a_killed_export(ckpt, tmp_path):
    """`ddpm export --out D` killed between its two renames leaves D absent and the old export aside: a reader
    (gen --export D) puts it back instead of answering 'not an export folder'."""
    out = tmp_path / "D"
    r = invoke("export", "--ckpt", ckpt, "--out", out)
    assert r.exit_code == 0, r.output
    os.rename(out, tmp_path / f".D.{files.HOST}-{_dead_pid()}.deadbeef.old")
    r = invoke("gen", "--ckpt", ckpt, "--export", out, "--engine", "onnx", "-n", 2, "--steps", 2, "-q",
               "--out", tmp_path / "g.npz")
    assert r.exit_code == 0, r.output
    assert (out / "export.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["D", "g.npz"]


# ------------------------------------------------------------------------------------------------ atomic writes
def _faulted(fault: str, script: str) -> subprocess.CompletedProcess:
    """Run python `script` (after `from ddpm.files import *`) with DDPM_FAULT=fault."""
    import sys

    return subprocess.run([sys.executable, "-c", "from ddpm.files import *\n" + script], capture_output=True,
                          text=True, env=dict(os.environ, DDPM_FAULT=fault), timeout=120)


@pytest.mark.parametrize("point", ["write", "publish"])
def test_kill_inside_a_file_write_keeps_the_previous_file(tmp_path, point):
    """DDPM_FAULT kills the process inside its 2nd atomic write (its temporary cut to half) or at its 2nd publish:
    the target is still the complete previous file, the temporary is left, and the next write cleans it up."""
    target = tmp_path / "x.bin"
    target.write_bytes(b"previous")
    script = (f"atomic_write({str(tmp_path / 'other')!r}, lambda tmp: open(tmp, 'wb').write(b'first'))\n"
              f"atomic_write({str(target)!r}, lambda tmp: open(tmp, 'wb').write(b'N' * 1000))\n"
              f"print('not killed')")
    r = _faulted(f"{point}:2", script)
    assert r.returncode == -signal.SIGKILL and "not killed" not in r.stdout, r.stderr
    assert target.read_bytes() == b"previous" and (tmp_path / "other").read_bytes() == b"first"
    [tmp] = _temporaries(tmp_path)
    assert (tmp_path / tmp).read_bytes() == (b"N" * 500 if point == "write" else b"N" * 1000)
    atomic_write(target, lambda t: Path(t).write_bytes(b"new"))
    assert target.read_bytes() == b"new" and _temporaries(tmp_path) == []


def test_kill_when_a_folder_is_published_leaves_the_old_one_recoverable(tmp_path):
    """Killed at a folder's publish, after the old folder was moved aside and before the new one is renamed in: the
    target is missing, and the next writer (clean_stale) puts the complete old folder back."""
    out = tmp_path / "exp"
    out.mkdir()
    (out / "a").write_text("old")
    r = _faulted("publish:1", f"new = temp_dir({str(out)!r})\n(new / 'a').write_text('new')\n"
                              f"publish_dir(new, {str(out)!r})")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and any(t.endswith(".old") for t in _temporaries(tmp_path))
    clean_stale(tmp_path)
    assert (out / "a").read_text() == "old" and _temporaries(tmp_path) == []
    # cut inside the write of a folder: the target is untouched, the partial folder is never published
    r = _faulted("write:1", f"new = temp_dir({str(out)!r})\n(new / 'a').write_text('new')\n"
                            f"(new / 'b').write_text('new')\npublish_dir(new, {str(out)!r})")
    assert r.returncode == -signal.SIGKILL, r.stderr
    [tmp] = _temporaries(tmp_path)
    assert sorted(p.name for p in (tmp_path / tmp).iterdir()) == ["a"] and sorted(out.iterdir()) == [out / "a"]
    clean_stale(tmp_path)
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("spec", ["publish", "1", "yes", "write:0", "write:1\nx"])
def test_fault_hook_ignores_a_malformed_spec(tmp_path, spec):
    """A stray DDPM_FAULT in a user's environment warns in one stderr line and injects nothing: every write is done."""
    target = tmp_path / "x.bin"
    r = _faulted(spec, f"atomic_write({str(target)!r}, lambda tmp: open(tmp, 'wb').write(b'whole'))\n"
                       f"atomic_write({str(target)!r}, lambda tmp: open(tmp, 'wb').write(b'again'))")
    assert r.returncode == 0 and target.read_bytes() == b"again", r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"ddpm: warning: ignoring DDPM_FAULT={spec!r} (a test "
                                                             f"hook"), r.stderr
    assert "expected write:N or publish:N" in r.stderr


def test_interrupted_grid_keeps_the_previous_file(ckpt, tmp_path, monkeypatch):
    keep = tmp_path / "keep.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(keep)
    before = keep.read_bytes()
    real = Image.Image.save

    def killed_while_saving(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_while_saving)
    r = invoke("gen", "--ckpt", ckpt, "-n", 4, "--steps", 2, "--out", keep, "-q")
    monkeypatch.setattr(Image.Image, "save", real)
    assert r.exit_code == 130 and "interrupted" in r.output and "Traceback" not in r.output
    assert keep.read_bytes() == before and _temporaries(tmp_path) == []


def test_interrupted_npz_keeps_the_previous_file(ckpt, tmp_path, monkeypatch):
    from ddpm.runtime import runner

    out = tmp_path / "s.npz"
    out.write_bytes(b"previous")
    real, calls = runner.RuntimeEngine.run, []

    def run(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:   # Ctrl-C in the second batch, after the first was written into the file
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(runner.RuntimeEngine, "run", run)
    r = invoke("gen", "--ckpt", ckpt, "-n", 6, "--batch", 3, "--steps", 2, "--out", out, "-q")
    assert r.exit_code == 130, r.output
    assert r.output.strip().splitlines()[-1] == "interrupted" and "Traceback" not in r.output
    assert out.read_bytes() == b"previous" and _temporaries(tmp_path) == []


def _train(data, out, *more):
    return invoke("train", "--data", data, "--out", out, "--preset", "tiny", "--timesteps", 20, "--batch", 8,
                  "--device", "cpu", "--warmup", 1, *more)


@pytest.mark.slow
def test_run_files_are_replaced_atomically(fake_mnist, tmp_path, monkeypatch):
    """Killed at the moment it publishes options.json, then samples.png: every earlier file is untouched (a direct
    write would have changed or emptied them already)."""
    run = tmp_path / "run"
    assert _train(fake_mnist, run, "--steps", 2, "--ckpt-every", 2).exit_code == 0
    before = _snapshot(run)
    real = os.replace
    for target in ("options.json", "samples.png"):
        def replace(src, dst, target=target):
            if Path(dst).name == target:
                raise KeyboardInterrupt
            real(src, dst)

        monkeypatch.setattr(files.os, "replace", replace)
        r = _train(fake_mnist, run, "--steps", 4, "--ckpt-every", 2, "--resume")
        monkeypatch.setattr(files.os, "replace", real)
        assert r.exit_code == 130 and "Traceback" not in r.output, r.output
        after = _snapshot(run)
        assert after[target] == before[target], target
        assert after["ckpt.pt"] == before["ckpt.pt"]        # written last: still the step-2 checkpoint
        assert _temporaries(run) == []


@pytest.mark.slow
def test_disk_full_during_checkpoint_is_one_line(fake_mnist, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(fake_mnist, run, "--steps", 2, "--ckpt-every", 2).exit_code == 0
    before = (run / "ckpt.pt").read_bytes()
    from ddpm.model import io as model_io

    real = model_io._write_bytes

    def full(path, data):   # the disk fills up inside the checkpoint's write (the model file before it fits)
        if not Path(path).name.startswith(".ckpt.pt."):
            return real(path, data)
        Path(path).write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io, "_write_bytes", full)
    r = _train(fake_mnist, run, "--steps", 4, "--ckpt-every", 2, "--resume")
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(lines) == 1, r.output
    assert "no space left" in lines[0] and "ckpt.pt" in lines[0] and "--resume" in lines[0]
    assert "last checkpoint at step 2" in lines[0]
    assert (run / "ckpt.pt").read_bytes() == before and _temporaries(run) == []
    # a writer that loses errno (a RuntimeError, as C++ writers raise): a device with no space left is named all
    # the same
    monkeypatch.setattr(model_io, "_write_bytes", lambda path, data: real(path, data) if not Path(path).name.startswith(
        ".ckpt.pt.") else (_ for _ in ()).throw(RuntimeError("file write failed")))
    monkeypatch.setattr(files.os, "statvfs", lambda p: type("st", (), {"f_bavail": 0, "f_frsize": 4096})())
    r = _train(fake_mnist, run, "--steps", 4, "--ckpt-every", 2, "--resume")
    assert r.exit_code == 1 and "no space left" in r.output and "Traceback" not in r.output
    # the first checkpoint of a new run fails: the advice is to run again, not --resume (which has nothing to resume)
    r = _train(fake_mnist, tmp_path / "new", "--steps", 2, "--ckpt-every", 2)
    assert r.exit_code == 1 and "without --resume" in r.output and "no checkpoint written yet" in r.output, r.output
    monkeypatch.setattr(model_io, "_write_bytes", real)
    r = _train(fake_mnist, tmp_path / "new", "--steps", 2, "--ckpt-every", 2, "--resume")
    assert r.exit_code == 1 and "run the same command without --resume" in r.output, r.output
    assert _train(fake_mnist, tmp_path / "new", "--steps", 2, "--ckpt-every", 2).exit_code == 0


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EFBIG])
def test_a_failed_log_append_stops_the_run_in_one_line_naming_the_log_and_the_checkpoint(fake_mnist, tmp_path,
                                                                                        monkeypatch, errno_,
                                                                                        small_sample_grids):
    """log.jsonl is appended to, not written through atomic_write: a full disk (or the file-size limit) there
    stops the run with the line a checkpoint's full disk gives, naming the file and where to resume from."""
    from ddpm.train import loop

    run = tmp_path / "run"
    real = loop.os.write
    calls = []

    def full(fd, data):   # the second window's append (step 4): after the checkpoint at step 2
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno_, os.strerror(errno_))
        return real(fd, data)

    monkeypatch.setattr(loop.os, "write", full)
    r = _train(fake_mnist, run, "--steps", 4, "--ckpt-every", 2)
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(lines) == 1, r.output
    said = "no space left" if errno_ == errno.ENOSPC else "file-size limit"
    assert said in lines[0] and "log.jsonl" in lines[0] and "log at step 4" in lines[0], lines[0]
    assert "last checkpoint at step 2" in lines[0] and "--resume" in lines[0], lines[0]


# --------------------------------------------------------------------------------------------- writability first
def _never(*a, **k):
    raise AssertionError("the work started before the output was checked")


@pytest.mark.parametrize("cmd, bad", [
    (["gen", "-n", 2, "--out"], "afile/x.png"),
    (["gen", "-n", 2, "--out"], "/proc/x.png"),            # a folder nobody can create files in (even root)
    (["gen", "-n", 2, "--out"], "adir"),
    (["inpaint", "--image", "IMG", "-n", 1, "--out"], "x.txt"),
    (["inpaint", "--image", "IMG", "-n", 1, "--out"], "afile/x.png"),
    (["edit", "--image", "IMG", "-n", 1, "--out"], "/proc/x.npz"),
    (["upscale", "--image", "IMG", "--factor", 2, "-n", 1, "--out"], "adir"),
    (["restore", "--image", "IMG", "--sigma", 0.3, "-n", 1, "--out"], "afile/x.png"),
    (["gen", "-n", 2, "--out", "g.png", "--trajectory"], "afile/t.gif"),
    (["eval", "--samples", "SAMPLES", "--json"], "/proc/q.json"),
    (["bench", "--quick", "--out"], "afile"),
    (["export", "--out"], "/proc/e"),
])
def test_output_checked_before_any_work(ckpt, tmp_path, monkeypatch, cmd, bad):
    from ddpm.runtime import eager, generate

    (tmp_path / "afile").write_text("a file")
    (tmp_path / "adir").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "img.png")
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    for mod, name in ((generate, "iter_generate"), (generate, "generate"), (eager, "sample")):
        monkeypatch.setattr(mod, name, _never)
    monkeypatch.chdir(tmp_path)
    args = [{"IMG": "img.png", "SAMPLES": "s.npz"}.get(a, a) for a in cmd]
    if cmd[0] != "eval":
        args += [bad, "--ckpt", ckpt]
    else:
        args += [bad]
    r = invoke(*args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "Invalid value for" in r.output and any(o in r.output for o in ("--out", "--json", "--trajectory"))


def test_check_writable_cases(tmp_path):
    (tmp_path / "afile").write_text("x")
    check_writable(tmp_path / "new" / "deeper" / "x.png")       # missing folders: created when written
    check_writable(tmp_path / "new", folder=True)
    for path, folder, message in ((tmp_path / "afile" / "x.png", False, "is a file, not a folder"),
                                  (tmp_path / "afile", True, "it is a file"),
                                  (tmp_path, False, "it is a folder"),
                                  (Path("/proc/nope/x.png"), False, "cannot create files in /proc")):
        with pytest.raises(OutputError, match=message):
            check_writable(path, folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # the probe leaves nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--out", ro / "x.png")
        assert r.exit_code == 2 and "cannot create files in" in r.output
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_in_training_names_the_last_checkpoint(fake_mnist, tmp_path, monkeypatch):
    from ddpm.train import loop

    real, calls = loop.diffusion_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "diffusion_loss", loss)
    r = _train(fake_mnist, tmp_path / "run", "--steps", 8, "--ckpt-every", 2)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"interrupted; last checkpoint at step 4 in {tmp_path / 'run'}, " \
                                                f"continue with --resume"
    calls.clear()
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = _train(fake_mnist, tmp_path / "other", "--steps", 8, "--ckpt-every", 2)
    assert r.exit_code == 130 and r.output.strip().splitlines()[-1] == "interrupted; no checkpoint written yet"


def _signalled(fault: str, *args, hangup=signal.SIG_DFL) -> subprocess.CompletedProcess:
    """`ddpm ARGS` in a new process that DDPM_FAULT=fault signals at an atomic write (files.py's test hook), with
    SIGHUP handled as `hangup` says (SIG_IGN: as under nohup)."""
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", DDPM_FAULT=fault)

    def child():
        # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
        # (as CI may be) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, hangup)

    return subprocess.run([sys.executable, "-m", "ddpm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=child)


@pytest.mark.parametrize("sig, code, word", slow_except([("INT", 130, "interrupted"), ("TERM", 143, "terminated")],
                                                      ("TERM", 143, "terminated")))
def test_sigint_in_a_real_process_is_one_line(tiny_export, tmp_path, sig, code, word):
    """A real SIGINT (Ctrl-C) or SIGTERM (kill, timeout) while `ddpm gen` writes its .npz (the file's only write):
    one line, exit 130 / 143, no output file and no temporary left (the signal unwinds the write)."""
    out = tmp_path / "x.npz"
    r = _signalled(f"write:1:{sig}", "gen", "--export", tiny_export, "-n", 4, "--steps", 2, "--out", out)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].strip() == word
    assert not out.exists() and _temporaries(tmp_path) == []


def test_a_stray_fault_hook_value_does_not_stop_a_command(tiny_export, tmp_path):
    """`ddpm gen` with a malformed DDPM_FAULT in its environment: the digits are written, exit 0, and stderr holds
    the one warning line (files._parse_fault)."""
    out = tmp_path / "x.npz"
    r = _signalled("1", "gen", "--export", tiny_export, "-n", 2, "--steps", 2, "-q", "--out", out)
    assert r.returncode == 0 and out.exists(), r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "ignoring DDPM_FAULT='1'" in r.stderr, r.stderr


def test_a_closed_terminal_unwinds_a_command_unless_sighup_is_ignored(tiny_export, tmp_path):
    """SIGHUP (the terminal or ssh session closed) while `ddpm gen` writes its .npz killed the process by the
    default action: no line, a half-written temporary left beside the output. It unwinds as SIGTERM does: the line
    "hangup", exit 129, nothing left. An ignored SIGHUP (`nohup ddpm gen ...`) stays ignored: the command ends."""
    out = tmp_path / "x.npz"
    r = _signalled("write:1:HUP", "gen", "--export", tiny_export, "-n", 4, "--steps", 2, "--out", out)
    assert r.returncode == 129, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].strip() == "hangup"
    assert not out.exists() and _temporaries(tmp_path) == []
    r = _signalled("write:1:HUP", "gen", "--export", tiny_export, "-n", 4, "--steps", 2, "-q", "--out", out,
                   hangup=signal.SIG_IGN)
    assert r.returncode == 0 and out.exists() and _temporaries(tmp_path) == [], r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [("INT", 130, "interrupted"), ("TERM", 143, "terminated"),
                                             ("HUP", 129, "hangup")])
def test_a_signal_in_real_training_keeps_its_exit_code(fake_mnist, tmp_path, sig, code, word):
    """A real SIGTERM during `ddpm train` exits 143 with "terminated; <last checkpoint>", Ctrl-C 130 with
    "interrupted; ...": the training loop adds the last checkpoint to the message without turning one signal into
    the other (supervisors such as systemd, Kubernetes and `timeout` read the code)."""
    run = tmp_path / "run"
    assert _train(fake_mnist, run, "--steps", 2, "--ckpt-every", 2).exit_code == 0
    # resumed, it writes options.json (1), log.jsonl (2), then the step-4 model, grid and ckpt.pt (3-5): the signal
    # arrives as ckpt.pt is renamed into place
    r = _signalled(f"publish:5:{sig}", "train", "--data", fake_mnist, "--out", run, "--preset", "tiny", "--timesteps",
                   20, "--steps", 6, "--ckpt-every", 2, "--batch", 8, "--warmup", 1, "--device", "cpu", "--threads", 1,
                   "--resume")
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].strip() == f"{word}; last checkpoint at step 2 in {run}, continue with --resume"


# ------------------------------------------------------------------------------------- concurrent and careless
@pytest.mark.slow
def test_a_run_folder_is_never_overwritten_or_shared(fake_mnist, tmp_path):
    from ddpm.files import folder_lock

    run = tmp_path / "run"
    assert _train(fake_mnist, run, "--steps", 2, "--ckpt-every", 2).exit_code == 0
    before = _snapshot(run)
    r = _train(fake_mnist, run, "--steps", 4)                      # forgot --resume: the old run is kept
    assert r.exit_code == 1 and "already holds a run" in r.output and "--resume" in r.output
    with folder_lock(run, "ddpm train"):                           # another process trains there
        r = _train(fake_mnist, run, "--steps", 4, "--resume")
    assert r.exit_code == 1 and "in use by another ddpm train" in r.output and "Traceback" not in r.output
    assert _snapshot(run) == before
    assert _train(fake_mnist, run, "--steps", 4, "--ckpt-every", 2, "--resume").exit_code == 0   # released


@pytest.mark.parametrize("command, more", [("train", ("--preset", "tiny", "--timesteps", 20, "--steps", 1)),
                                           ("distill", ("--steps-from", 2, "--steps-to", 1, "--fold-iters", 0,
                                                        "--iters", 1))])
def test_training_never_replaces_a_users_files_in_a_folder_that_is_not_a_run(fake_mnist, ckpt, tmp_path, command,
                                                                             more):
    """`ddpm train --out DIR` with the user's own log.jsonl and samples.png in DIR (no options.json, no ckpt.pt)
    replaced both (exit 0): refused in one line before any work; a folder of other files only is used as it is."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.jsonl").write_text("my own notes")
    (mine / "samples.png").write_bytes(b"my picture")
    before = _snapshot(mine)
    if command == "distill":
        more = ("--teacher", ckpt, *more)
    r = invoke(command, "--data", fake_mnist, "--out", mine, "--batch", 8, "--device", "cpu", *more)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "not a run folder" in lines[0] and "log.jsonl" in lines[0] and "samples.png" in lines[0], r.output
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["log.jsonl", "samples.png"]


def test_export_never_replaces_a_folder_that_is_not_an_export(ckpt, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    r = invoke("export", "--ckpt", ckpt, "--out", tmp_path / "mine")
    assert r.exit_code == 1 and "not an export folder" in r.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


# -------------------------------------------------------------------------------------------- long names
def _longest_name(folder: Path, suffix: str) -> str:
    """A name of exactly NAME_MAX bytes for `folder`'s file system (255 on every usual one), ending in `suffix`."""
    limit = os.pathconf(folder, "PC_NAME_MAX")
    return "é" * ((limit - len(suffix)) // 2) + "a" * ((limit - len(suffix)) % 2) + suffix


def test_every_name_the_file_system_allows_can_be_written_file_and_folder(tmp_path):
    """A temporary is named after its target: the name is shortened (files.temp_stem) so that the temporary of a
    NAME_MAX-byte target fits too, for a file, a folder and an old folder moved aside, and clean_stale still finds a
    dead writer's temporary of such a target and puts an aside folder of it back."""
    name = _longest_name(tmp_path, ".npz")
    assert len(os.fsencode(name)) == os.pathconf(tmp_path, "PC_NAME_MAX")
    atomic_write(tmp_path / name, lambda t: Path(t).write_bytes(b"x"))
    assert (tmp_path / name).read_bytes() == b"x" and _temporaries(tmp_path) == []
    folder = tmp_path / _longest_name(tmp_path, "")
    for content in ("old", "new"):
        new = temp_dir(folder)
        (new / "a").write_text(content)
        publish_dir(new, folder)
    assert (folder / "a").read_text() == "new" and _temporaries(tmp_path) == []
    dead = _dead_pid()
    stale = tmp_path / f".{files.temp_stem(name)}.{files.HOST}-{dead}.q1w2e3r4.tmp"
    stale.write_bytes(b"half")
    aside = tmp_path / f".{files.temp_stem(folder.name)}.{files.HOST}-{dead}.q1w2e3r4.old"
    folder.rename(aside)
    clean_stale(tmp_path)                  # which long name an aside folder stands for is not known here: kept
    assert aside.is_dir() and not stale.exists()
    clean_stale(tmp_path, folder.name)     # a write of that name puts it back
    assert (folder / "a").read_text() == "new" and _temporaries(tmp_path) == []


def test_eval_json_of_the_longest_name_works_and_a_longer_one_is_refused_before_any_work(tmp_path, monkeypatch):
    """`eval --json` with a NAME_MAX-byte name writes it; one byte more is refused up front (exit 2, one line), before
    the classifier or a sample is touched."""
    import ddpm.evaluation as evaluation

    rows = [{"name": "x", "n": 2}]
    monkeypatch.setattr(evaluation, "evaluate_sets", lambda *a, **k: rows)
    monkeypatch.setattr(evaluation, "format_table", lambda r: "table")
    np.savez(tmp_path / "s.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2, np.int64))
    name = tmp_path / _longest_name(tmp_path, ".json")
    r = invoke("eval", "--samples", tmp_path / "s.npz", "--json", name)
    assert r.exit_code == 0, r.output
    assert '"n": 2' in name.read_text() and _temporaries(tmp_path) == []
    monkeypatch.setattr(evaluation, "evaluate_sets", lambda *a, **k: pytest.fail("worked before refusing"))
    r = invoke("eval", "--samples", tmp_path / "s.npz", "--json", tmp_path / ("a" + name.name))
    assert r.exit_code == 2 and "too long" in r.output and "Traceback" not in r.output, r.output
