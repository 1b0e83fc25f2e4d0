"""A Model runs the weights ddpm.load() hashed, or refuses in one line: it binds its files by absolute path, and
every later read of them (the torch engines, the first-use export into the cache) is checked against `model.hash`."""

import shutil

import numpy as np
import pytest
from helpers import tiny_checkpoint

import ddpm
from ddpm.errors import DdpmError
from ddpm.export.cache import cache_folder


def _two_models(root, seeds=(0, 1)):
    """Folders root/a/m and root/b/m holding two different tiny models (of these seeds)."""
    for sub, seed in zip("ab", seeds):
        (root / sub / "m").mkdir(parents=True)
        tiny_checkpoint(root / sub / "m", seed=seed)
    return root / "a" / "m", root / "b" / "m"


def test_a_relative_path_stays_bound_after_a_chdir(tmp_path, monkeypatch):
    a, b = _two_models(tmp_path)
    want = ddpm.load(a).generate(2, steps=2, sampler="ddim", engine="torch")
    monkeypatch.chdir(tmp_path / "a")
    model = ddpm.load("m")
    monkeypatch.chdir(tmp_path / "b")                   # "m" now names b's model
    np.testing.assert_array_equal(model.generate(2, steps=2, sampler="ddim", engine="torch"), want)
    np.testing.assert_array_equal(model.generate(2, steps=2, sampler="ddim", engine="onnx"), want)
    assert model.path.is_absolute()


def test_an_export_folder_loaded_by_a_relative_path_stays_bound(tiny_exported, tmp_path, monkeypatch):
    exp = tiny_exported(0) / "exp"
    monkeypatch.chdir(exp.parent)
    model = ddpm.load(export="exp")
    want = model.hash
    other = tmp_path / "exp"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_exported(1) / "exp", other)  # "exp" now names another model's export
    assert model.bundle().meta["checkpoint_hash"] == want
    assert model.bundle().root.resolve() == exp.resolve()


def test_a_rewritten_checkpoint_is_refused_and_never_filed_under_the_old_hash(tmp_path):
    a, b = _two_models(tmp_path, seeds=(5, 6))   # seeds no other test exports: the cache has no export of them
    model = ddpm.load(a)
    shutil.copyfile(b / "model.safetensors", a / "model.safetensors")   # `ddpm train` writing the run meanwhile
    for engine in ("torch", "onnx"):                                      # onnx: the first-use export
        with pytest.raises(DdpmError, match="changed since ddpm.load\\(\\) read it; load it again"):
            model.generate(2, steps=2, sampler="ddim", engine=engine)
    assert not (cache_folder(model.hash) / "export.json").exists()
    fresh = ddpm.load(a)                                                   # loading again gives the new weights
    assert fresh.hash == ddpm.load(b).hash
    fresh.generate(2, steps=2, sampler="ddim", engine="torch")


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_the_command_line_says_to_run_the_command_again(tmp_path, monkeypatch, engine):
    """Weights rewritten while a command runs (`train --resume` checkpointing the run it reads): one line in the
    command line's words (run the command again, or give a copy), not the API's "load it again"."""
    from helpers import invoke

    import ddpm.api

    a, b = _two_models(tmp_path, seeds=(7, 8))   # seeds no other test exports: onnx makes its first-use export
    read = ddpm.api.read_model_info

    def read_then_rewritten(path):
        got = read(path)
        shutil.copyfile(b / "model.safetensors", a / "model.safetensors")   # the run's next checkpoint
        return got

    monkeypatch.setattr(ddpm.api, "read_model_info", read_then_rewritten)
    r = invoke("gen", "--ckpt", a, "-n", 2, "--steps", 2, "--sampler", "ddim", "--engine", engine,
               "--out", tmp_path / "x.png", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    line = r.output.strip()
    assert r.exit_code == 1 and "\n" not in line and "load it again" not in line, r.output
    assert line.startswith(f"Error: {a / 'model.safetensors'} changed while this command read it") and \
        "run the command again, or copy the file and give the copy" in line, line
    assert not (tmp_path / "x.png").exists()
