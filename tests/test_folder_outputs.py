"""Folder outputs (an export folder, the page of `ddpm export --web`, the export cache) follow one rule
(files.claim_dir): nothing in them that ddpm did not write is lost, and a folder that is not theirs is refused in one
line before any work; no folder output may contain an input of its command (cli_options.refuse_same_path)."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import click
import pytest

from ddpm.cli_options import refuse_same_path
from ddpm.export import web
from ddpm.export.cache import EXPORT_FOLDER, shipped_dir
from ddpm.model.io import load_model
from ddpm.export.web import WebExportError, write_page
from ddpm.files import FolderKind, OutputError, claim_dir, publish_owned, temp_dir
from ddpm.runtime.bundle import Bundle
from helpers import TINY, invoke, tiny_checkpoint

KIND = FolderKind("a test folder", "mark.json", "a test folder of another source", "--out",
                  re.compile(r"^(a\.bin|sub/)$"))


def _users_things(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("mine")
    (folder / "mydir").mkdir()
    (folder / "mydir" / "f").write_text("x")
    (folder / ".keep").write_text("")
    (folder / "pointer").symlink_to("notes.txt")
    return [".keep", "mydir", "notes.txt", "pointer"]


def _kept(folder: Path) -> bool:
    return ((folder / "notes.txt").read_text() == "mine" and (folder / "mydir" / "f").read_text() == "x"
            and (folder / ".keep").is_file() and os.readlink(folder / "pointer") == "notes.txt")


# ------------------------------------------------------------------------------------------------ the rule itself
def test_claim_dir_keeps_or_refuses_what_the_command_did_not_write(tmp_path):
    def same(source):
        return lambda folder: None if not (folder / "mark.json").is_file() else \
            (folder / "mark.json").read_text() == source

    out = tmp_path / "out"
    assert claim_dir(out, KIND, same("A")) is False                   # missing
    out.mkdir()
    (out / f".out.{'0' * 6}-1.abcd.tmp").mkdir()                        # a temporary of a write is not content
    assert claim_dir(out, KIND, same("A")) is False                   # empty
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=re.escape(f"{out} is a folder but not a test folder (no mark.json), and "
                                                    f"writing --out replaces what is there: give another --out")):
        claim_dir(out, KIND, same("A"))
    (out / "mark.json").mkdir()
    with pytest.raises(OutputError, match="its mark.json was not written by ddpm"):
        claim_dir(out, KIND, same("A"))
    (out / "mark.json").rmdir()
    (out / "mark.json").write_text("A")
    (out / "a.bin").write_text("old")
    (out / "sub").mkdir()
    assert claim_dir(out, KIND, same("A")) is True                    # same source: its other files carried over
    with pytest.raises(OutputError, match=re.escape(f"{out} holds a test folder of another source and files ddpm "
                                                    f"did not write (thesis.tex); choose another --out or empty it")):
        claim_dir(out, KIND, same("B"))
    (out / "thesis.tex").unlink()
    assert claim_dir(out, KIND, same("B")) is False                   # only the command's own files: replaced

    (out / "thesis.tex").write_text("years of work")
    new = temp_dir(out)
    (new / "mark.json").write_text("A")
    (new / "a.bin").write_text("new")
    assert publish_owned(new, out, KIND, same("A"))
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "mark.json", "sub", "thesis.tex"]
    assert (out / "a.bin").read_text() == "new" and (out / "thesis.tex").read_text() == "years of work"


def test_publish_owned_keeps_the_mode_of_every_file_it_replaces(tmp_path):
    """Every file of the new folder, in subfolders too, gets the permission bits of the file it replaces (a private
    600 file stays private); a file new to the folder gets the umask's."""
    same = lambda folder: True if (folder / "mark.json").is_file() else None
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name, mode in (("mark.json", 0o600), ("a.bin", 0o640), ("sub/b.bin", 0o604)):
        (out / name).write_text("old")
        (out / name).chmod(mode)
    new = temp_dir(out)
    (new / "sub").mkdir()
    for name in ("mark.json", "a.bin", "sub/b.bin", "sub/c.bin"):
        (new / name).write_text("new")
        (new / name).chmod(0o644)
    assert publish_owned(new, out, KIND, same)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in ("mark.json", "a.bin", "sub/b.bin", "sub/c.bin")}
    assert modes == {"mark.json": 0o600, "a.bin": 0o640, "sub/b.bin": 0o604, "sub/c.bin": 0o644}
    assert (out / "a.bin").read_text() == "new"

def test_the_export_cache_never_replaces_a_users_files(tmp_path):
    """The cache folder of the shipped weights is seeded by one rename (export.cache._seed): what a user put there is
    carried over, or the folder refused, as for `ddpm export --out`."""
    from ddpm.export.cache import _seed

    source = Bundle.load(shipped_dir())
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is a folder but not an export folder"):
        _seed(source, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    _seed(source, folder)
    names = _users_things(folder)
    _seed(source, folder)                                             # an export of the same weights: kept
    assert _kept(folder) and set(names) < {p.name for p in folder.iterdir()}
    assert EXPORT_FOLDER.marker in {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def exported(tiny_generator_exported):
    """A tiny model exported with a 4-step generator (shared with test_web.py), and a stand-in for the
    onnxruntime-web tarball."""
    root = tiny_generator_exported(3, "--steps", 4)
    loaded = load_model(root)
    fake = root / "onnxruntime-web.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        for rel in web.ORT_FILES:
            tar.add(web.PAGE_SRC / "app.mjs", arcname=f"package/{rel}")
    return loaded, root / "exp", fake


@pytest.fixture
def fake_ort(exported, monkeypatch):
    monkeypatch.setattr(web, "ort_web_tarball", lambda *args, **kw: exported[2])


def test_page_keeps_what_it_did_not_write(exported, fake_ort, tmp_path):
    _, exp, _ = exported
    bundle = Bundle.load(exp)
    page = tmp_path / "site"
    write_page(bundle, page, 0.3)
    _users_things(page)
    (page / "CNAME").write_text("digits.example.org")
    write_page(bundle, page, 0.5)                                     # the same weights: replaced, the user's kept
    assert _kept(page) and (page / "CNAME").read_text() == "digits.example.org"
    assert json.loads((page / "model.json").read_text())["guidance"] == 0.5 and (page / "ort").is_dir()


def test_page_of_other_weights_holding_a_users_files_is_refused(exported, fake_ort, tmp_path):
    _, exp, _ = exported
    bundle = Bundle.load(exp)
    page = tmp_path / "site"
    write_page(bundle, page, 0.3)
    record = json.loads((page / "model.json").read_text())
    (page / "model.json").write_text(json.dumps(dict(record, checkpoint_hash="0" * 64)))   # a page of other weights
    (page / "notes.txt").write_text("mine")
    with pytest.raises(WebExportError, match=re.escape(f"{page} holds a page of other weights and files ddpm did "
                                                       f"not write (notes.txt); choose another --web or empty it")):
        write_page(bundle, page, 0.3)
    assert (page / "notes.txt").read_text() == "mine"
    (page / "notes.txt").unlink()
    write_page(bundle, page, 0.3)                                     # nothing of a user's: replaced
    assert json.loads((page / "model.json").read_text())["checkpoint_hash"] == bundle.meta["checkpoint_hash"]


@pytest.fixture(scope="module")
def three_classes(exported, tmp_path_factory):
    """The page of a tiny model with classes 0..2 (null label 3), from `ddpm export --web` with the stand-in
    onnxruntime-web tarball."""
    root = tmp_path_factory.mktemp("three")
    loaded = tiny_checkpoint(root, seed=5, cfg=dataclasses.replace(TINY, num_classes=3))
    with pytest.MonkeyPatch.context() as mp:   # fake_ort for this module-wide fixture
        mp.setattr(web, "ort_web_tarball", lambda *args, **kw: exported[2])
        r = invoke("export", "--ckpt", loaded.path, "--out", root / "exp", "--web", root / "site", "--steps", 2)
    assert r.exit_code == 0, r.output
    return root / "exp", root / "site"


def test_page_of_a_three_class_model_shows_its_classes_and_its_export(three_classes):
    """The page offers the model's classes, not MNIST's 0..9, and its `ddpm gen` command names an export folder
    (without --export, gen would run the shipped model) as DIR, with the weights' hash beside it, not the builder's
    local path."""
    exp, site = three_classes
    meta = json.loads((site / "model.json").read_text())
    assert (meta["num_classes"], meta["null_label"]) == (3, 3)
    assert meta["gen_options"].endswith(" --export DIR") and str(exp.resolve()) not in json.dumps(meta)
    html = (site / "index.html").read_text()
    assert "<option" not in html and 'id="label"' in html          # the choices come from model.json
    assert (site / "labels.mjs").is_file() and './labels.mjs"' in (site / "app.mjs").read_text()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the page's labels.mjs is not run")
def test_page_of_a_three_class_model_sends_only_its_labels(three_classes):
    """labels.mjs (run by node on the page's own model.json): the choices 0-2 in turn, 0, 1, 2, none; the labels
    sent are 0..2 or the null label 3, and a class outside 0..2 is refused with a RangeError, never sent."""
    _, site = three_classes
    code = f"""
      import {{ readFileSync }} from "node:fs";
      const m = await import({json.dumps((site / "labels.mjs").as_uri())});
      const meta = JSON.parse(readFileSync({json.dumps(str(site / "model.json"))}, "utf8"));
      const sent = (choice, n) => {{ try {{ return Array.from(m.labelsOf(meta, choice, n), Number); }}
                                     catch (e) {{ return e.name + ": " + e.message; }} }};
      console.log(JSON.stringify({{ choices: m.classChoices(meta), turn: sent("turn", 5), two: sent("2", 2),
                                   none: sent("none", 2), seven: sent("7", 1), three: sent("3", 1),
                                   junk: sent("1.5", 1) }}));"""
    r = subprocess.run([shutil.which("node"), "--input-type=module", "-e", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["choices"] == [["turn", "0-2 in turn"], ["0", "0"], ["1", "1"], ["2", "2"],
                              ["none", "none (unconditional)"]]
    assert got["turn"] == [0, 1, 2, 0, 1] and got["two"] == [2, 2] and got["none"] == [3, 3]
    for bad in ("seven", "three", "junk"):
        assert got[bad] == "RangeError: class must be an integer in 0..2, or none"


@pytest.mark.parametrize("marker", [None, '{"name": "my model"}', "not json", "[1, 2]"])
def test_web_refuses_a_users_folder_in_one_line_before_any_work(exported, fake_ort, tmp_path, marker):
    """A folder that is not a page (a user's model.json does not make it one) is refused before the export."""
    loaded, _, _ = exported
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    if marker is not None:
        (mine / "model.json").write_text(marker)
    r = invoke("export", "--ckpt", loaded.path, "--out", tmp_path / "e", "--web", mine, "--steps", 2)
    why = "no model.json" if marker is None else "its model.json was not written by ddpm"
    assert r.exit_code == 1 and r.output.splitlines() == [
        f"Error: {mine} is a folder but not a page written by `ddpm export --web` ({why}), and writing --web "
        f"replaces what is there: give another --web, or remove it"], r.output
    assert not (tmp_path / "e").exists()                              # before any work
    assert sorted(p.name for p in mine.iterdir()) == (["model.json"] if marker else []) + ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_refuses_an_out_folder_of_other_weights_before_any_work(exported, tmp_path, monkeypatch):
    from ddpm import cli_tools

    def read_mnist(*args):
        raise AssertionError("--int8 read MNIST before the output folders were checked")

    monkeypatch.setattr(cli_tools, "_int8_data", read_mnist)
    _, exp, _ = exported
    other = tmp_path / "other"
    tiny_checkpoint(other, seed=4)
    (exp / "notes.txt").write_text("mine")
    try:
        before = sorted(p.name for p in exp.iterdir())
        r = invoke("export", "--ckpt", other, "--out", exp, "--generator", "--int8")   # --web --int8: refused as usage
        assert r.exit_code == 1 and r.output.splitlines() == [
            f"Error: {exp} holds files of other weights and files ddpm did not write (notes.txt); choose another "
            f"--out or empty it"], r.output
        assert sorted(p.name for p in exp.iterdir()) == before
    finally:
        (exp / "notes.txt").unlink()


# ---------------------------------------------------------------------------------- an output folder holding an input
def test_refuse_same_path_refuses_a_folder_output_that_contains_an_input(tmp_path):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    model = run / "sub" / "model.safetensors"
    model.write_bytes(b"weights")
    (tmp_path / "alias").symlink_to(run)
    for out in (run, tmp_path / "alias", run / "sub" / ".."):
        with pytest.raises(click.UsageError, match=re.escape(f"the --out folder {out} contains --ckpt {model}: "
                                                             f"writing --out could overwrite what --ckpt reads; give "
                                                             f"--out a folder that does not contain it")):
            refuse_same_path({"--out": out}, {"--ckpt": model}, folders=("--out",))
    with pytest.raises(click.UsageError, match="the --web folder .* contains --out"):   # outputs, either order
        refuse_same_path({"--out": run / "exp", "--web": run}, folders=("--out", "--web"))
    with pytest.raises(click.UsageError, match="the --out folder .* contains --web"):
        refuse_same_path({"--out": run, "--web": run / "page"}, folders=("--out", "--web"))
    refuse_same_path({"--out": run / "sub" / "exp"}, {"--ckpt": run / "sub"}, folders=("--out",))   # inside: fine
    refuse_same_path({"--out": tmp_path / "runner"}, {"--ckpt": model}, folders=("--out",))      # a name's prefix
    refuse_same_path({"--json": run}, {"--ckpt": model})              # a file output is not a folder


def test_every_folder_output_refuses_to_contain_an_input(tmp_path, fake_mnist):
    """One line, exit 2, before any work: the input is left as it was."""
    d = tmp_path / "d"
    loaded = tiny_checkpoint(d)
    weights = loaded.path.read_bytes()
    cases = [
        (("export", "--ckpt", loaded.path, "--web", d), "--web", "--ckpt"),
        (("export", "--ckpt", loaded.path, "--out", tmp_path), "--out", "--ckpt"),
        (("export", "--ckpt", loaded.path, "--out", tmp_path / "w" / "e", "--web", tmp_path / "w"), "--web", "--out"),
        (("train", "--init", loaded.path, "--out", d, "--steps", 1, "--data", fake_mnist), "--out", "--init"),
        (("train", "--data", fake_mnist, "--out", fake_mnist.parent, "--steps", 1), "--out", "--data"),
        (("distill", "--teacher", loaded.path, "--out", d, "--iters", 1, "--data", fake_mnist), "--out",
         "--teacher"),
        (("bench", "--quick", "--ckpt", loaded.path, "--out", d), "--out", "--ckpt"),
    ]
    for args, option, other in cases:
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: the {option} folder ") and \
            f"contains {other} " in lines[0], r.output
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors"] and loaded.path.read_bytes() == weights
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------ python -m, its messages
# 4 subprocesses each: the inner loop runs `python -m ddpm` in test_cli.py::test_a_standard_output_that_cannot_be_written_is_one_line
@pytest.mark.slow
@pytest.mark.parametrize("module", ["ddpm", "ddpm.cli"])
def test_python_m_runs_the_command_and_names_it_as_run(module, tmp_path):
    """`python -m ddpm` is the console script; a usage error's hint names the interpreter as it was typed."""
    for exe in {sys.executable, str(Path(sys.executable).with_name("python3"))}:
        if not os.path.exists(exe):
            continue
        prog = f"{os.path.basename(exe)} -m {module}"
        r = subprocess.run([exe, "-m", module, "gen", "--bad"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(f"(see {prog} gen --help)"), r.stderr
        r = subprocess.run([exe, "-m", module, "--version"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"{prog}, version "), r.stdout + r.stderr


def test_a_full_disk_while_a_folder_is_built_is_one_line_and_leaves_the_old_folder(exported, fake_ort, tmp_path,
                                                                                  monkeypatch):
    """Every folder output is built in files.building_dir: a full disk while the page (or an export, a diffusers
    folder, the cache seed) is built is one OutputError naming the folder, the half-built folder is removed, and
    what the folder held stays as it was."""
    import errno
    import shutil

    _, exp, _ = exported
    bundle = Bundle.load(exp)
    page = tmp_path / "site"
    write_page(bundle, page, 0.3)
    before = sorted(p.relative_to(page) for p in page.rglob("*"))
    real = shutil.copyfile

    def full(src, dst, *a, **k):
        if Path(dst).name == "generator.onnx":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(OutputError, match=f"no space left on the device of {re.escape(str(tmp_path))}: site was not") as e:
        write_page(bundle, page, 0.5)
    assert "\n" not in str(e.value)
    assert sorted(p.relative_to(page) for p in page.rglob("*")) == before
    assert json.loads((page / "model.json").read_text())["guidance"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["site"]   # no half-built folder beside it


def test_the_half_built_folder_goes_whatever_fails_while_the_failure_is_told(tmp_path, monkeypatch):
    """building_dir removes its folder even when telling the failure fails too (an error of its own inside the
    handler, as a stream without fileno() once gave): the error comes out, no `.out.*.tmp` is left."""
    from ddpm import files

    def broken(e, folder):
        raise AttributeError("no fileno")

    monkeypatch.setattr(files, "disk_full", broken)
    with pytest.raises(AttributeError):
        with files.building_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_bytes(b"x" * 10)
            raise OSError(27, "File too large")
    assert list(tmp_path.iterdir()) == []

    def write(tmp):
        Path(tmp).write_bytes(b"x" * 10)
        raise OSError(27, "File too large")

    with pytest.raises(AttributeError):   # atomic_write, the same for one file
        files.atomic_write(tmp_path / "one.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_every_read_only_file_of_a_page_is_refused_before_any_work(exported, fake_ort, tmp_path, monkeypatch):
    """Each file a page holds, those in its subfolder ort/ included, made read-only by its owner: `export --web`
    over the page is refused in one line before any work, and the file stays as it was."""
    import stat

    _, exp, _ = exported
    bundle = Bundle.load(exp)
    page = tmp_path / "site"
    write_page(bundle, page, 0.3)
    files_ = sorted(p for p in page.rglob("*") if p.is_file())
    assert any(p.parent.name == "ort" for p in files_)
    for path in files_:
        before = path.read_bytes()
        os.chmod(path, 0o444)
        monkeypatch.setattr(web, "building_dir", lambda *a: pytest.fail("the work started"))
        with pytest.raises(OutputError, match=f"cannot write {re.escape(str(path))}: it is read-only"):
            write_page(bundle, page, 0.5)
        monkeypatch.undo()
        monkeypatch.setattr(web, "ort_web_tarball", lambda *args, **kw: exported[2])
        assert path.read_bytes() == before and stat.S_IMODE(os.stat(path).st_mode) == 0o444
        os.chmod(path, 0o644)
