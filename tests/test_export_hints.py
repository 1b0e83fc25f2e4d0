"""The commands that hints about an export folder give, run as written, keep the folder's weights: they name the
checkpoint (--ckpt) and the folder (--out); and an export over a folder of other weights says it replaces them."""

import shlex

from ddpm.export.onnx_export import export
from ddpm.model.io import load_model
from ddpm.runtime.bundle import Bundle, ExportError
from helpers import invoke


def test_missing_generator_hint_names_the_checkpoint_and_the_folder(tiny_exported, tmp_path):
    root = tiny_exported(0)
    exp = root / "exp"
    weights = load_model(root)
    plan = ["--engine", "onnx-generator", "--sampler", "ddim", "--steps", 3, "-n", 1]
    r = invoke("gen", "--export", exp, *plan, "--out", tmp_path / "a.npz")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    line = r.output.strip().splitlines()[-1]
    assert f"`ddpm export --ckpt CKPT --out {shlex.quote(str(exp))} --generator`" in line, line
    assert f"(model.safetensors, checkpoint_hash {weights.hash[:12]})" in line, line
    # the checkpoint known (--ckpt beside --export): its path, ready to run
    r = invoke("gen", "--ckpt", root, "--export", exp, *plan, "--out", tmp_path / "b.npz")
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert f"`ddpm export --ckpt {shlex.quote(str(weights.path))} --out {shlex.quote(str(exp))} --generator`" in line
    assert "CKPT" not in line, line
    # the runtime's reader of the folder gives the same command
    try:
        Bundle.load(exp).generator_path()
    except ExportError as e:
        assert f"`ddpm export --ckpt CKPT --out {shlex.quote(str(exp))} --generator`" in str(e), e
        assert f"checkpoint_hash {weights.hash[:12]}" in str(e), e
    else:
        raise AssertionError("a folder without a generator gave a generator path")


def test_export_over_other_weights_says_it_replaces_them(tiny_exported):
    exp = tiny_exported(0) / "exp"
    mine = load_model(exp.parent).hash
    other = tiny_exported(1)
    theirs = load_model(other)
    lines = []
    export(theirs, exp, log=lines.append)
    said = [s for s in lines if "other weights" in s]
    assert said == [f"{exp} holds an export of other weights (model.safetensors, checkpoint_hash {mine[:12]}): "
                    f"replacing it with an export of model.safetensors (checkpoint_hash {theirs.hash[:12]})"], lines
    assert lines.index(said[0]) == 0                       # before any work
    assert Bundle.load(exp, expected_hash=theirs.hash)
    lines = []
    export(theirs, exp, fp16=True, log=lines.append)       # the same weights: nothing replaced, nothing said
    assert not [s for s in lines if "other weights" in s], lines
