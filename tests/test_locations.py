"""Where files go: one rule (locations.py, the XDG spec) for every location the package picks itself, and every path
the OS can name works, UTF-8 or not; `export --web` says why npm could not fetch onnxruntime-web, at once."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm import api
from ddpm.errors import DdpmError
from ddpm.export import web
from ddpm.locations import user_dir
from ddpm.train.data import default_data_dir
from conftest import make_fake_mnist
from helpers import invoke, tiny_checkpoint


def _locations():
    from ddpm.locations import user_dir

    return {"exports": api.cache_dir(), "mnist": default_data_dir(), "npm": web.cache_dir(),
            "config": user_dir("config")}


@pytest.mark.parametrize("value", ["", "relative/cache", "."])
def test_an_empty_or_relative_xdg_variable_is_ignored_everywhere(tmp_path, monkeypatch, value):
    """$XDG_CACHE_HOME="" (or relative) put MNIST and the npm cache under ./ddpm/ of the working folder while exports
    went to ~/.cache: now every location falls back to ~/.cache (~/.config), as the spec says."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    monkeypatch.setenv("XDG_CONFIG_HOME", value)
    got = _locations()
    assert got == {"exports": home / ".cache" / "ddpm", "mnist": home / ".cache" / "ddpm" / "mnist",
                   "npm": home / ".cache" / "ddpm" / "npm", "config": home / ".config" / "ddpm"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # an absolute one is used, by every location
    got = _locations()
    assert got["exports"] == tmp_path / "xdg" / "ddpm" and got["mnist"].parent == got["npm"].parent == got["exports"]


def test_an_empty_or_relative_home_is_refused_and_an_unset_one_is_the_systems(tmp_path, monkeypatch):
    """HOME set but empty or relative, with no XDG variable to use instead: the files went to the password
    database's home, where whoever set HOME (`HOME= cmd`, `HOME=. cmd`) meant them not to go; now one line names
    what to set. Never the working folder. An unset HOME is the password database's, as the shell's and Python's."""
    import pwd

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for value, what in (("", "empty"), ("relative", "not an absolute path ('relative')")):
        monkeypatch.setenv("HOME", value)
        with pytest.raises(DdpmError, match=re.escape(f"$HOME is {what}, and ddpm's folders are under it while "
                                                      f"$XDG_CACHE_HOME is unset: set $XDG_CACHE_HOME or $HOME")):
            api.cache_dir()
        with pytest.raises(DdpmError, match=re.escape("while $XDG_CONFIG_HOME is unset: set $XDG_CONFIG_HOME")):
            user_dir("config")
        for xdg, state in (("", "empty"), ("rel/cache", "not an absolute path ('rel/cache')")):
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)   # ignored, and the line says what it is, not "unset"
            with pytest.raises(DdpmError, match=re.escape(f"while $XDG_CACHE_HOME is {state}: set $XDG_CACHE_HOME")):
                api.cache_dir()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # not needed then
        assert api.cache_dir() == tmp_path / "xdg" / "ddpm"
        monkeypatch.delenv("XDG_CACHE_HOME")
    out = tmp_path.parent / f"{tmp_path.name}-x.png"
    result = invoke("gen", "-n", 1, "--sampler", "ddim", "--steps", 3, "--engine", "onnx-generator", "--out", out)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "$HOME is not an absolute" in result.output
    assert list(tmp_path.iterdir()) == [] and not out.exists()
    monkeypatch.delenv("HOME")
    assert api.cache_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "ddpm"


@pytest.mark.slow
def test_exports_follow_the_rule_through_the_cli(tmp_path, monkeypatch):
    """The first onnx use of a checkpoint exports it into the cache: under ~/.cache with a relative
    $XDG_CACHE_HOME, never under the working folder."""
    ck = tmp_path / "ck"
    ck.mkdir()
    tiny_checkpoint(ck)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    r = invoke("gen", "--ckpt", ck, "--engine", "onnx", "-n", 2, "--steps", 2, "-q", "--out", tmp_path / "g.png",
               env={"XDG_CACHE_HOME": "cache", "HOME": str(home)})
    assert r.exit_code == 0, r.output
    assert list(work.iterdir()) == [] and (home / ".cache" / "ddpm" / "exports").is_dir()


# ---------------------------------------------------------------------------------------------- non-UTF-8 paths
@pytest.mark.slow
def test_paths_that_are_not_utf8_work_through_the_cli(tmp_path):
    """A folder named in bytes that are not UTF-8 (Latin-1 "dé", here): --data, --out, --ckpt, --export, --json
    and $XDG_CACHE_HOME; PyTorch, safetensors and onnxruntime pass names to C++/Rust as UTF-8, and failed."""
    base = os.fsencode(tmp_path) + b"/d\xe9"
    os.mkdir(base)
    make_fake_mnist(Path(os.fsdecode(base + b"/data")), n=64)
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env.update({b"OMP_NUM_THREADS": b"1", b"XDG_CACHE_HOME": base + b"/cache"})
    steps = [
        [b"train", b"--data", base + b"/data", b"--out", base + b"/run", b"--preset", b"tiny", b"--timesteps", b"20",
         b"--batch", b"8", b"--steps", b"2", b"--ckpt-every", b"2", b"--device", b"cpu", b"--warmup", b"1"],
        [b"gen", b"--ckpt", base + b"/run", b"--engine", b"torch", b"-n", b"2", b"--steps", b"2", b"-q", b"--out",
         base + b"/g.png"],
        [b"export", b"--ckpt", base + b"/run", b"--out", base + b"/exp", b"--generator", b"--steps", b"2"],
        [b"gen", b"--ckpt", base + b"/run", b"--export", base + b"/exp", b"--engine", b"onnx", b"-n", b"4",
         b"--steps", b"2", b"-q", b"--out", base + b"/g.npz"],
        [b"gen", b"--ckpt", base + b"/run", b"--engine", b"onnx", b"-n", b"2", b"--steps", b"2", b"-q", b"--out",
         base + b"/cached.npz"],   # exported into $XDG_CACHE_HOME on first use
        [b"eval", b"--samples", base + b"/g.npz", b"--data", base + b"/data", b"--json", base + b"/q.json"],
    ]
    for args in steps:
        r = subprocess.run([os.fsencode(Path(sys.executable).with_name("ddpm")), *args], capture_output=True,
                           env=env, timeout=600)
        assert r.returncode == 0, (args[0], r.stderr.decode(errors="replace")[-2000:])
    names = set(os.listdir(base))
    assert {b"run", b"g.png", b"exp", b"g.npz", b"cached.npz", b"q.json", b"cache"} <= names
    assert b"options.json" in os.listdir(base + b"/run")
    assert [f for f in os.listdir(base + b"/exp") if f.startswith(b"generator-") and f.endswith(b".onnx")]
    assert os.listdir(base + b"/cache/ddpm/exports")


# ---------------------------------------------------------------------------------------------------- npm
OFFLINE = """npm error code ENOTFOUND
npm error syscall getaddrinfo
npm error errno ENOTFOUND
npm error network request to https://registry.npmjs.org/onnxruntime-web failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org
npm error network This is a problem related to network connectivity."""


@pytest.mark.parametrize("stderr, says, calls", [
    (OFFLINE, "cannot be resolved (offline", 1),                  # no retry: it would fail the same way
    (OFFLINE.replace("ENOTFOUND", "ECONNRESET"), "was reset", 2),  # a reset may not happen again: one retry
    ("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/onnxruntime-web", "no such package",
     1),
    ("", "npm exited with status 1 and said nothing", 1),
    ("something odd happened", "something odd happened", 1),
])
def test_npm_failure_says_why_in_one_line(tmp_path, fake_npm, stderr, says, calls):
    bin_dir = fake_npm(f"cat >&2 <<'EOF'\n{stderr}\nEOF\nexit 1")
    with pytest.raises(web.WebExportError) as e:
        web.ort_web_tarball(log=lambda *_: None)
    message = str(e.value)
    assert says in message and "--ort-web" in message and "\n" not in message, message
    assert len((bin_dir / "calls").read_text().split()) == calls
    assert list((tmp_path / "cache" / "ddpm" / "npm").iterdir()) == []   # nothing left in the cache


def test_npm_keeps_its_cache_and_logs_out_of_home_and_ignores_the_working_folders_npmrc(tmp_path, fake_npm,
                                                                                        monkeypatch):
    """npm wrote its cache (a second copy of the tarball), logs and update check under ~/.npm and read a .npmrc in
    the user's working folder: it runs in the build's temporary folder with its cache there, so nothing of it
    outlives the export and only the ddpm cache folder holds the tarball."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bin_dir = fake_npm(f"echo \"$PWD $*\" > '{tmp_path}/seen'\nexit 1")
    with pytest.raises(web.WebExportError):
        web.ort_web_tarball(log=lambda *_: None)
    cwd, *args = (tmp_path / "seen").read_text().split()
    npm_dir = tmp_path / "cache" / "ddpm" / "npm"
    assert Path(cwd).parent == npm_dir and cwd != str(work), cwd
    assert f"--cache={cwd}/npm-cache" in args and "--no-update-notifier" in args, args
    assert list(npm_dir.iterdir()) == [] and (bin_dir / "calls").exists()


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_npm_offline_fails_fast_and_says_why(tmp_path, monkeypatch):
    """The real npm, with a registry that refuses connections (as offline): npm's own retries took over a minute
    and --silent hid the reason."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))   # nothing cached can answer
    t = time.monotonic()
    with pytest.raises(web.WebExportError) as e:
        web.ort_web_tarball(log=lambda *_: None)
    assert time.monotonic() - t < 30
    assert "refused the connection" in str(e.value) and "127.0.0.1:9" in str(e.value), str(e.value)


LONG = "x" * 300   # one name over the 255 bytes a file system allows: the OS refuses to look (ENAMETOOLONG)


@pytest.mark.parametrize("where", ["--data", "DDPM_DATA", "XDG_CACHE_HOME"])
def test_a_location_the_os_refuses_to_name_is_one_line(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    tiny_checkpoint(tmp_path / "run")
    long = tmp_path / LONG
    if where == "--data":
        r = invoke("eval", "-n", 2, "--data", LONG)
    elif where == "DDPM_DATA":
        r = invoke("eval", "-n", 2, env={"DDPM_DATA": str(long)})
    else:
        r = invoke("gen", "-n", 1, "--ckpt", tmp_path / "run", "--out", tmp_path / "x.png",
                   env={"XDG_CACHE_HOME": str(long)})
    assert r.exit_code == 1 and not isinstance(r.exception, OSError), r.output
    assert "File name too long" in r.output and LONG in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_the_api_refuses_a_path_the_os_refuses_to_name_with_ddpm_error(tmp_path, monkeypatch):
    import numpy as np

    import ddpm

    monkeypatch.chdir(tmp_path)
    calls = {"load": lambda: ddpm.load(LONG), "load export": lambda: ddpm.load(export=LONG),
             "load deep": lambda: ddpm.load("a/" * 3000),   # longer than a whole path may be (PATH_MAX)
             "evaluate": lambda: ddpm.evaluate(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64), data=LONG)}
    for name, call in calls.items():
        with pytest.raises(DdpmError, match="File name too long"):
            call()


def test_a_deleted_working_folder_is_one_line(tmp_path, monkeypatch, tiny_export):
    """A shell left in a removed folder: every command says so in one line, exit 1, before PyTorch is imported
    (which would print MKL's fatal line and exit 2); the path helpers raise the same line, not FileNotFoundError."""
    from ddpm.cli_options import _real
    from ddpm.files import NoWorkingFolder, real_path

    line = "Error: the working folder no longer exists; cd to a folder that does"
    gone = tmp_path / "gone"
    gone.mkdir()
    r = subprocess.run(["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m ddpm train --preset '
                                    f'tiny --steps 1 --batch 2 --out "{tmp_path / "run"}"'],
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout + r.stderr) == (1, line + "\n"), r.stdout + r.stderr
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    r = invoke("gen", "--export", tiny_export, "-n", 1, "--steps", 1, "--out", "x.png")
    assert (r.exit_code, r.output) == (1, line + "\n"), r.output
    for helper in (_real, real_path, lambda p: real_path(p, links=False)):
        with pytest.raises(NoWorkingFolder, match="^the working folder no longer exists; cd to a folder that does$"):
            helper("x.png")
    assert real_path(tmp_path) == os.path.realpath(tmp_path)


def test_the_api_in_a_deleted_working_folder_raises_ddpm_error(tmp_path, monkeypatch):
    """ddpm.load() of a relative path in a removed working folder: the one line of the CLI, as a DdpmError (it was
    os.getcwd()'s FileNotFoundError)."""
    import ddpm

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    for kwargs in ({"path": "model.safetensors"}, {"export": "exp"}):
        with pytest.raises(ddpm.DdpmError, match="^the working folder no longer exists; cd to a folder that does$"):
            ddpm.load(**kwargs)
