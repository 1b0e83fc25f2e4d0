"""The repository itself: what the commands write by default is ignored by git."""

import shutil
import subprocess
from pathlib import Path

import pytest

from ddpm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _default_outputs():
    """(command, path) for every option of every command that writes to a path by default."""
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.name in ("out", "json_out", "trajectory") and isinstance(p.default, str):
                yield name, p.default


def test_default_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = list(_default_outputs())
    assert {"gen", "train", "bench"} <= {c for c, _ in outputs}
    # a file inside a default folder, the file itself otherwise (a folder pattern "x/" matches only what is in it)
    paths = [f"{p}/bench.json" if c in ("train", "bench") else p for c, p in outputs]
    r = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths) + "\n",
                       capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    missed = sorted(set(paths) - set(r.stdout.split()))
    assert not missed, f"not in .gitignore: {missed}"


def test_every_module_imports_and_every_script_answers_help():
    """Every module of the package imports (the inner loop, `pytest -m "not slow"`, then touches each one), and every
    measurement script with a command line (bench/*.py main(argv)) parses it: --help exits 0 and names the script."""
    import contextlib
    import importlib
    import inspect
    import io
    import pkgutil

    import ddpm

    names = sorted(m.name for m in pkgutil.walk_packages(ddpm.__path__, "ddpm."))
    assert {"ddpm.cli", "ddpm.files", "ddpm.runtime.runner", "ddpm.train.loop"} <= set(names)
    helped = []
    for name in names:
        module = importlib.import_module(name)
        main_fn = getattr(module, "main", None)
        if name.startswith("ddpm.bench.") and main_fn is not None and "argv" in inspect.signature(main_fn).parameters:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
                main_fn(["--help"])
            assert e.value.code == 0 and "usage:" in out.getvalue(), name
            helped.append(name)
    assert len(helped) >= 5, helped


def test_every_shipped_data_file_belongs_to_a_listed_package():
    """setuptools ships a folder's data files through the package that is that folder (a folder of data is a
    namespace package to Python): a pattern reaching into a sub-folder of another package makes `pip install .`
    warn "Package would be ignored" for it. Each package-data pattern names files of its own package's folder, every
    such package is listed, and the files the installed package reads (the shipped model, its export, the web page)
    are matched."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"ddpm": "."}
    folder = lambda package: ROOT.joinpath(*package.split(".")[1:])   # noqa: E731
    shipped = set()
    for package, patterns in setup["package-data"].items():
        assert package in setup["packages"] and folder(package).is_dir(), package
        for pattern in patterns:
            assert "/" not in pattern, f"{package}: {pattern} reaches into a sub-folder: list that folder as a package"
            shipped |= {p.relative_to(ROOT).as_posix() for p in folder(package).glob(pattern) if p.is_file()}
    for package in setup["packages"]:
        assert folder(package).is_dir(), package
    assert {"assets/default.safetensors", "assets/classifier.onnx", "assets/default_export/export.json",
            "assets/default_export/model.onnx", "export/page/index.html", "export/page/app.mjs"} <= shipped
