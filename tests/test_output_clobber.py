"""No command overwrites its own input or another of its outputs (cli_options.refuse_same_path), and `ddpm export`
never removes what it did not write in an export folder it replaces (export.onnx_export)."""

import os
import re
from pathlib import Path

import click
import pytest

from ddpm.cli_options import refuse_same_path
from ddpm.export.onnx_export import export
from ddpm.files import OutputError
from ddpm.model.io import load_model
from helpers import invoke


def _refused(r, first: str, second: str) -> None:
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert first in lines[0] and second in lines[0] and "same" in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


# ----------------------------------------------------------------------------------- an output over an input
def test_refuse_same_path_compares_files_not_spellings(tmp_path):
    a = tmp_path / "a.npz"
    a.write_bytes(b"samples")
    os.link(a, tmp_path / "hard.json")
    (tmp_path / "soft.json").symlink_to(a)
    for same in (a, tmp_path / "hard.json", tmp_path / "soft.json", tmp_path / "sub" / ".." / "a.npz"):
        with pytest.raises(click.UsageError, match="--json and --samples name the same file"):
            refuse_same_path({"--json": same}, {"--samples": [tmp_path / "b.npz", a]})
    with pytest.raises(click.UsageError, match="--trajectory and --out name the same"):   # neither exists yet
        refuse_same_path({"--out": tmp_path / "x.png", "--trajectory": tmp_path / "." / "x.png"})
    refuse_same_path({"--out": tmp_path / "x.png", "--trajectory": tmp_path / "y.png"},
                     {"--samples": [a], "--ckpt": None})   # distinct paths pass


def test_every_command_refuses_an_output_over_its_input(tmp_path, ckpt):
    """One line, exit 2, naming both options, before any work: the input is left as it was."""
    s = tmp_path / "s.npz"
    s.write_bytes(b"the samples")
    d = tmp_path / "d.png"
    d.write_bytes(b"the picture")
    m = tmp_path / "m.png"
    m.write_bytes(b"the mask")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(s)
    cases = [
        (("gen", "-n", 2, "--out", tmp_path / "a.png", "--trajectory", tmp_path / "a.png"), "--trajectory", "--out"),
        (("eval", "--samples", s, "--json", s), "--json", "--samples"),
        (("eval", "--samples", s, "--json", link), "--json", "--samples"),
        (("inpaint", "--image", d, "--out", d), "--out", "--image"),
        (("inpaint", "--image", d, "--mask", m, "--out", m), "--out", "--mask"),
        (("edit", "--image", d, "--out", d), "--out", "--image"),
        (("upscale", "--image", d, "--factor", 2, "--out", d), "--out", "--image"),
        (("restore", "--image", d, "--sigma", 0.5, "--out", d), "--out", "--image"),
        (("export", "--out", run, "--web", run), "--web", "--out"),
        (("export", "--ckpt", ckpt, "--out", ckpt), "--out", "--ckpt"),
        (("train", "--init", run, "--out", run), "--out", "--init"),
        (("train", "--data", run, "--out", run), "--out", "--data"),
        (("distill", "--teacher", run, "--out", run), "--out", "--teacher"),
        (("bench", "--ckpt", run, "--out", run), "--out", "--ckpt"),
    ]
    for args, first, second in cases:
        _refused(invoke(*args), first, second)
    assert s.read_bytes() == b"the samples" and d.read_bytes() == b"the picture" and m.read_bytes() == b"the mask"
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a.png").exists()


def test_two_folder_outputs_on_one_path_are_called_folders(tmp_path):
    """`export --web X --out X` names two folders, even where X does not exist yet."""
    for where in (tmp_path / "new", tmp_path):
        r = invoke("export", "--out", where, "--web", where)
        assert r.exit_code == 2 and "name the same folder" in r.output, r.output


def test_a_file_output_inside_an_input_folder_is_refused(tmp_path, ckpt):
    """`eval --data mn --json mn/t10k-labels-idx1-ubyte` replaced the MNIST file it had just read (exit 0): a file
    output inside a folder the command reads is refused in one line, exit 2, and the file is left as it was."""
    from conftest import make_fake_mnist

    data = make_fake_mnist(tmp_path / "mn", n=16)
    labels = data / "t10k-labels-idx1-ubyte"
    before = labels.read_bytes()
    for args, first, second in [(("eval", "-n", 2, "--data", data, "--json", labels), "--json", "--data")]:
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and first in lines[0] and second in lines[0], r.output
    assert labels.read_bytes() == before
    with pytest.raises(click.UsageError, match="--json .* lies inside the --data folder"):
        refuse_same_path({"--json": data / "new.json"}, {"--data": data})
    refuse_same_path({"--json": tmp_path / "q.json"}, {"--data": data})   # beside the folder: allowed
    refuse_same_path({"--out": ckpt / "samples.npz"}, {"--ckpt": ckpt})   # a run folder holds the user's outputs too


# ------------------------------------------------------------------- the own files of a folder a command reads
RUN_OWN = ["options.json", "log.jsonl", "ckpt.pt", "model.safetensors", "samples.png", "student4.safetensors"]
EXPORT_OWN = ["export.json", "model.onnx", "model_fp16.onnx", "model_int8.onnx", "generator-unipc8-0123abcd-loop.onnx",
              "model_b1-256.plan"]


def _file_commands(d: Path, m: Path):
    """Every command that writes a file, as (arguments before the output, the output's option)."""
    return [(("gen", "-n", 2), "--out"), (("gen", "-n", 2, "--out", d.parent / "g.png"), "--trajectory"),
            (("eval", "-n", 2), "--json"), (("edit", "--image", d), "--out"), (("inpaint", "--image", d, "--mask", m),
            "--out"), (("upscale", "--image", d, "--factor", 2), "--out"), (("restore", "--image", d, "--sigma", 0.5),
            "--out")]


def test_no_file_output_replaces_an_own_file_of_a_run_or_export_folder_the_command_reads(tmp_path):
    """gen/eval/the editing commands with their output on the weights, checkpoint, record, log, grid or student of
    the run folder --ckpt reads (named as the folder or as a file in it), or on export.json or an ONNX model or engine
    of the --export folder, however the output is spelled: one line, exit 2, nothing replaced. The user's own files
    beside them may be written (refuse_same_path lets them through)."""
    d, m = tmp_path / "d.png", tmp_path / "m.png"
    d.write_bytes(b"picture")
    m.write_bytes(b"mask")
    run, exp = tmp_path / "run", tmp_path / "exp"
    run.mkdir()
    exp.mkdir()
    for folder, names in ((run, RUN_OWN), (exp, EXPORT_OWN)):
        for name in names:
            (folder / name).write_bytes(name.encode())
    (tmp_path / "link").symlink_to(run / "model.safetensors")
    before = {p: p.read_bytes() for p in (*run.iterdir(), *exp.iterdir())}
    outputs = [(("--ckpt", run), run / name) for name in RUN_OWN]
    outputs += [(("--ckpt", run / "ckpt.pt"), run / "model.safetensors"), (("--ckpt", run), tmp_path / "link"),
                (("--ckpt", run), tmp_path / "x" / ".." / "run" / "options.json")]
    outputs += [(("--export", exp), exp / name) for name in EXPORT_OWN]
    for args, option in _file_commands(d, m):
        for (source, folder), out in outputs:
            r = invoke(*args, source, folder, option, out)
            assert r.exit_code == 2, (args, out, r.output)
            lines = r.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"Error: {option} ") and source in lines[0], r.output
            assert "would replace" in lines[0], r.output
    assert {p: p.read_bytes() for p in (*run.iterdir(), *exp.iterdir())} == before
    for source, folder in (("--ckpt", run), ("--ckpt", run / "model.safetensors"), ("--export", exp)):
        for name in ("one.npz", "notes/run.json", "model.onnx.json"):
            refuse_same_path({"--out": folder / name if folder.is_dir() else run / name}, {source: folder})
    hub = tmp_path / "hub"                                    # a diffusers pipeline folder
    (hub / "unet").mkdir(parents=True)
    (hub / "model_index.json").write_text("{}")
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        with pytest.raises(click.UsageError, match=f"would replace {name} of the diffusers pipeline folder"):
            refuse_same_path({"--json": hub / name}, {"--ckpt": hub})
    refuse_same_path({"--json": hub / "scores.json"}, {"--ckpt": hub})


def test_the_run_folder_files_refused_are_the_ones_train_and_distill_write():
    """cli_options.MODEL_FOLDERS names a run folder's files without importing PyTorch: they are train.loop.RUN_FILES
    and distill's students."""
    from ddpm.cli_options import MODEL_FOLDERS
    from ddpm.train.distill import student_file
    from ddpm.train.loop import RUN_FILES

    [owns] = [owns for what, _, owns in MODEL_FOLDERS if what == "run folder"]
    assert all(owns(name) for name in (*RUN_FILES, student_file(4), student_file(16)))


def test_the_diffusers_folder_files_refused_are_the_ones_export_writes_and_loading_reads(tmp_path):
    """A diffusers pipeline folder's own files (cli_options.MODEL_FOLDERS) are what `ddpm export --diffusers` writes
    (export.diffusers.FILES, its ddpm.json included) and what loading one reads (model.diffusers.DECLARATION)."""
    from ddpm.cli_options import MODEL_FOLDERS
    from ddpm.export.diffusers import FILES
    from ddpm.model.diffusers import DECLARATION

    [owns] = [owns for what, _, owns in MODEL_FOLDERS if what == "diffusers pipeline folder"]
    assert all(owns(name) for name in (*FILES, DECLARATION))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "model_index.json").write_text("{}")
    with pytest.raises(click.UsageError, match=f"would replace {DECLARATION} of the diffusers pipeline folder"):
        refuse_same_path({"--json": hub / DECLARATION}, {"--ckpt": hub})


def test_an_export_folders_own_files_are_one_rule(tmp_path):
    """What an output may not replace in an --export folder (cli_options.MODEL_FOLDERS) is what `ddpm export` counts
    as its own when it replaces the folder (files.not_written): export.cache.EXPORT_FOLDER.owns, marker included."""
    from ddpm.cli_options import MODEL_FOLDERS
    from ddpm.export.cache import EXPORT_FOLDER
    from ddpm.files import not_written

    [(markers, owns)] = [(markers, owns) for what, markers, owns in MODEL_FOLDERS if what == "export folder"]
    assert markers == (EXPORT_FOLDER.marker,)
    own = ["export.json", "model.onnx", "model_fp16.onnx", "model_int8.onnx", "generator-unipc8-abc.onnx",
           "trt-x.plan", "trt-x.plan.json", "timing.cache"]
    users = ["notes.txt", "model.onnx.json", "model_int4.onnx", "mine.onnx", "samples.npz", "export.json.bak"]
    for name in own + users:
        (tmp_path / name).write_text("x")
    assert sorted(not_written(tmp_path, EXPORT_FOLDER)) == sorted(users)
    assert [name for name in own + users if owns(name)] == own
    assert [name for name in own + users if EXPORT_FOLDER.owns(name)] == own
    exp = tmp_path
    for name in own:
        with pytest.raises(click.UsageError, match=f"would replace {re.escape(name)} of the export folder"):
            refuse_same_path({"--out": exp / name}, {"--export": exp})
    for name in users:
        refuse_same_path({"--out": exp / name}, {"--export": exp})


# -------------------------------------------------------------------------------------- an export folder's content
def _add_users_things(folder: Path) -> None:
    (folder / "notes.txt").write_text("mine")
    (folder / "mydir").mkdir()
    (folder / "mydir" / "f").write_text("x")
    (folder / ".keep").write_text("")
    (folder / "pointer").symlink_to("notes.txt")


def test_export_of_the_same_weights_keeps_what_it_did_not_write(tiny_exported):
    root = tiny_exported(0)
    exp = root / "exp"
    _add_users_things(exp)
    export(load_model(root), exp, fp16=True, log=lambda *_: None)   # gains model_fp16.onnx: the folder is replaced
    assert (exp / "model_fp16.onnx").is_file()
    assert (exp / "notes.txt").read_text() == "mine" and (exp / "mydir" / "f").read_text() == "x"
    assert (exp / ".keep").is_file() and os.readlink(exp / "pointer") == "notes.txt"


def test_export_of_other_weights_refuses_a_folder_with_a_users_files(tiny_exported):
    exp = tiny_exported(0) / "exp"
    other = tiny_exported(1)
    _add_users_things(exp)
    before = sorted(p.name for p in exp.iterdir())
    r = invoke("export", "--ckpt", other, "--out", exp)
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [f"Error: {exp} holds files of other weights and files ddpm did not "
                                             f"write (.keep, mydir, notes.txt, pointer); choose another --out or "
                                             f"empty it"]
    assert sorted(p.name for p in exp.iterdir()) == before and (exp / "mydir" / "f").read_text() == "x"
    with pytest.raises(OutputError, match="files ddpm did not write"):
        export(load_model(other), exp, log=lambda *_: None)
    # only ddpm's own files of other weights: replaced, as an export of these weights
    for name in (".keep", "notes.txt", "pointer"):
        (exp / name).unlink()
    (exp / "mydir" / "f").unlink()
    (exp / "mydir").rmdir()
    export(load_model(other), exp, log=lambda *_: None)
    assert load_model(other).hash in (exp / "export.json").read_text()
