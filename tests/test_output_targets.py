"""What an output may replace: a file output only a regular file (or what a symbolic link to one points at), a
folder output only a folder. A device, a pipe, a socket, a dangling link at the output path is refused in one line
and left as it was, with nothing created beside it."""

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ddpm.files import OutputError, atomic_write, check_writable, publish_dir, temp_dir
from helpers import invoke


def _plant(path: Path, kind: str) -> None:
    """Put something that is not a regular file at `path`."""
    if kind == "link-to-device":
        path.symlink_to("/dev/null")
    elif kind == "link-to-stdout":
        path.symlink_to("/proc/self/fd/1")
    elif kind == "pipe":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere" / "x")
    elif kind == "link-loop":
        path.symlink_to(path.name)


def _state(folder: Path) -> dict:
    """Every entry of folder: its kind and, for links, where they point."""
    out = {}
    for p in folder.iterdir():
        out[p.name] = ("link", os.readlink(p)) if p.is_symlink() else ("mode", os.lstat(p).st_mode >> 12)
    return out


KINDS = ["link-to-device", "link-to-stdout", "pipe", "socket", "dangling-link", "link-loop"]


@pytest.mark.parametrize("kind", KINDS)
def test_writers_refuse_what_is_not_a_regular_file(tmp_path, kind):
    target = tmp_path / "out.json"
    _plant(target, kind)
    before = _state(tmp_path)
    with pytest.raises(OutputError, match="out.json"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    with pytest.raises(OutputError, match="out.json"):
        check_writable(target)
    with pytest.raises(OutputError, match="out.json"):
        temp_dir(target)   # a folder output there
    assert _state(tmp_path) == before   # left as it was, nothing beside it


def test_a_link_to_a_regular_file_is_written_through(tmp_path):
    """The link stays a link; its target is replaced atomically; no temporary is left in either folder."""
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "q.json"
    real.write_text("old")
    link = tmp_path / "q.json"
    link.symlink_to(Path("real") / "q.json")
    check_writable(link)
    atomic_write(link, lambda tmp: Path(tmp).write_text("new"))
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "q.json")
    assert real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "real"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["q.json"]


def test_a_link_to_a_folder_is_published_through(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "exp").mkdir()
    (tmp_path / "real" / "exp" / "export.json").write_text("old")
    link = tmp_path / "exp"
    link.symlink_to(Path("real") / "exp")
    check_writable(link, folder=True)
    new = temp_dir(link)
    (new / "export.json").write_text("new")
    assert publish_dir(new, link)
    assert link.is_symlink() and (link / "export.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["exp"]


@pytest.mark.parametrize("kind", ["link-to-device", "pipe", "socket", "dangling-link"])
def test_publish_dir_refuses_what_is_not_a_folder(tmp_path, kind):
    out = tmp_path / "exp"
    _plant(out, kind)
    (tmp_path / "tmp").mkdir()
    before = _state(tmp_path)
    with pytest.raises(OutputError, match="not a folder|does not exist"):
        publish_dir(tmp_path / "tmp", out)
    assert _state(tmp_path) == before


def _samples(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    return tmp_path / "s.npz"


@pytest.mark.parametrize("kind", ["link-to-device", "pipe", "dangling-link"])
@pytest.mark.parametrize("cmd", [
    ["gen", "-n", 2, "--steps", 2, "-q", "--out", "OUT.png"],
    ["gen", "-n", 2, "--steps", 2, "-q", "--out", "OUT.npz"],
    ["gen", "-n", 2, "--steps", 2, "-q", "--out", "g.png", "--trajectory", "OUT.gif"],
    ["eval", "--samples", "SAMPLES", "--json", "OUT.json"],
    ["export", "--out", "OUT"],
    ["bench", "--quick", "--engines", "torch", "--out", "OUT"],
    ["train", "--preset", "tiny", "--steps", 1, "--out", "OUT"],
])
def test_cli_outputs_refuse_what_is_not_theirs(ckpt, tmp_path, monkeypatch, cmd, kind):
    monkeypatch.chdir(tmp_path)
    name = next(a for a in cmd if str(a).startswith("OUT"))
    _plant(tmp_path / name, kind)
    args = [{"SAMPLES": str(_samples(tmp_path))}.get(a, a) for a in cmd]
    if cmd[0] not in ("eval", "train"):
        args += ["--ckpt", ckpt]
    before = _state(tmp_path)
    r = invoke(*args)
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    assert [ln for ln in r.output.splitlines() if ln.startswith("Error")][0].count(name) >= 1, r.output
    assert _state(tmp_path) == before


@pytest.mark.slow
def test_files_inside_a_run_folder_are_not_replaced_when_not_regular(ckpt, tmp_path):
    """Refused wherever the output name comes from (here: bench.json inside bench's --out folder), before any work."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "bench.json").symlink_to("/dev/null")
    r = invoke("bench", "--quick", "--engines", "torch", "--ckpt", ckpt, "--out", out, "--no-baseline")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "bench.json" in r.output and "character device" in r.output
    assert (out / "bench.json").is_symlink() and sorted(p.name for p in out.iterdir()) == ["bench.json"]


def test_the_issue_example_in_a_real_process(tmp_path):
    """`eval --json out.json` with out.json a link to /proc/self/fd/1 (here a pipe): refused, the link kept."""
    link = tmp_path / "out.json"
    link.symlink_to("/proc/self/fd/1")
    r = subprocess.run(["ddpm", "eval", "--samples", str(_samples(tmp_path)), "--json", str(link)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "out.json" in r.stderr and "pipe" in r.stderr and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "s.npz"]


@pytest.mark.parametrize("kind", ["link-to-device", "dangling-link"])
def test_the_training_log_is_appended_only_to_a_regular_file(tmp_path, kind):
    """log.jsonl is appended to, not replaced: the same rule (a link to /dev/null swallowed every line)."""
    from ddpm.train.loop import append_log

    log = tmp_path / "log.jsonl"
    _plant(log, kind)
    before = _state(tmp_path)
    with pytest.raises(OutputError, match="log.jsonl"):
        append_log(log, [{"step": 1, "loss": 0.5}])
    assert _state(tmp_path) == before
    os.unlink(log)
    (tmp_path / "real.jsonl").write_text("")
    log.symlink_to("real.jsonl")
    append_log(log, [{"step": 1, "loss": 0.5}])
    assert (tmp_path / "real.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n' and log.is_symlink()
