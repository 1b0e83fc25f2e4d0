"""An output never replaces what its command reads without an option naming it (cli_options.refuse_same_path): the
package's assets (the shipped model, its export, the classifier), the export cache's folders (the export of --ckpt,
made on first use) and the MNIST folder --data defaults to."""

import hashlib
import shutil

import click
import pytest

import ddpm
from ddpm.cli_options import refuse_same_path
from ddpm.export.cache import cache_folder, shipped_dir
from ddpm.model.io import default_model_path
from helpers import invoke

SAMPLING = {"--ckpt": None, "--export": None}   # what a sampling command passes without --ckpt / --export


@pytest.mark.parametrize("target", ["default_export/export.json", "default_export/model.onnx", "default.safetensors",
                                    "classifier.safetensors", "default_export/new.json"])
def test_no_output_lies_in_the_package_assets(target):
    path = default_model_path().parent / target
    with pytest.raises(click.UsageError, match="lies in the package's assets folder"):
        refuse_same_path({"--json": path}, {"--samples": [], "--data": None, "--classifier": None, **SAMPLING})
    with pytest.raises(click.UsageError, match="lies in the package's assets folder"):
        refuse_same_path({"--out": shipped_dir()}, {"--ckpt": None}, folders=("--out",))


def test_eval_json_and_gen_out_never_replace_the_shipped_export(tmp_path):
    meta = shipped_dir() / "export.json"
    before = hashlib.sha256(meta.read_bytes()).hexdigest()
    (tmp_path / "digits.png").symlink_to(meta)
    for args in (("eval", "-n", 2, "--json", meta), ("gen", "-n", 2, "--out", tmp_path / "digits.png")):
        r = invoke(*args)
        assert r.exit_code == 2 and "assets folder" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert hashlib.sha256(meta.read_bytes()).hexdigest() == before


def test_eval_json_and_gen_out_never_replace_a_cache_export(ckpt, fake_mnist, tmp_path):
    folder = ddpm.load(ckpt).bundle().root           # the first-use export of --ckpt, in the cache
    assert folder == cache_folder(ddpm.load(ckpt).hash)
    before = (folder / "export.json").read_bytes()
    (tmp_path / "digits.png").symlink_to(folder / "export.json")
    for args in (("eval", "--ckpt", ckpt, "--data", fake_mnist, "-n", 2, "--json", folder / "export.json"),
                 ("gen", "--ckpt", ckpt, "-n", 2, "--out", tmp_path / "digits.png")):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert f"would replace export.json of the export folder {folder}" in r.output, r.output
    assert (folder / "export.json").read_bytes() == before
    unmade = folder.parent / "0123456789abcdef" / "model.onnx"      # a folder a first use would make
    with pytest.raises(click.UsageError, match="would replace model.onnx of the export folder"):
        refuse_same_path({"--json": unmade}, {"--ckpt": ckpt, "--export": None})
    refuse_same_path({"--json": folder / "scores.json"}, {"--ckpt": ckpt, "--export": None})   # the user's: allowed


def test_no_output_lies_in_the_default_data_folder(fake_mnist, tmp_path, monkeypatch):
    data = tmp_path / "mnist"
    shutil.copytree(fake_mnist, data)
    monkeypatch.setenv("DDPM_DATA", str(data))
    with pytest.raises(click.UsageError, match="inside the --data folder"):
        refuse_same_path({"--json": data / "scores.json"}, {"--data": None, **SAMPLING})
    refuse_same_path({"--json": tmp_path / "scores.json"}, {"--data": None, **SAMPLING})
