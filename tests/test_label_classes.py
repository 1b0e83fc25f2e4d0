"""A label is checked against the model's classes (pipeline.labels), once, for the CLI and the API alike."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

import ddpm
from ddpm.errors import DdpmError
from helpers import TINY, invoke, tiny_checkpoint

CHEAP = ("--steps", 2, "--engine", "torch", "--device", "cpu", "-q")


@pytest.fixture(scope="module", params=[12, 5], ids=["12 classes", "5 classes"])
def classes(request, tmp_path_factory):
    """(number of classes, folder) of a tiny model of that many classes."""
    root = tmp_path_factory.mktemp(f"classes{request.param}")
    tiny_checkpoint(root, cfg=dataclasses.replace(TINY, num_classes=request.param))
    return request.param, root


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("digit") / "d.png"
    Image.fromarray(np.pad(np.full((12, 12), 255, np.uint8), 8)).save(path)
    return path


def test_the_cli_takes_every_class_of_the_model_and_refuses_the_next(classes, digit, tmp_path):
    k, ckpt = classes
    for command in (("gen", "-n", 2), ("edit", "--image", digit, "-n", 2)):
        r = invoke(*command, "--ckpt", ckpt, "--label", k - 1, "--out", tmp_path / "x.npz", *CHEAP)
        assert r.exit_code == 0, r.output
        assert np.load(tmp_path / "x.npz")["labels"].tolist() == [k - 1] * 2
        r = invoke(*command, "--ckpt", ckpt, "--label", k, "--out", tmp_path / "y.npz", *CHEAP)
        line = r.output.strip()
        assert r.exit_code == 2 and "\n" not in line and "--label" in line and f"0..{k - 1}, got {k}" in line, line
        assert not (tmp_path / "y.npz").exists()


def test_the_api_takes_every_class_of_the_model_and_refuses_the_next(classes):
    k, ckpt = classes
    model = ddpm.load(ckpt)
    cheap = dict(steps=2, engine="torch", device="cpu", progress=False)
    assert model.generate(2, label=k - 1, **cheap).shape == (2, 28, 28)
    with pytest.raises(DdpmError, match=rf"^label must be one of this model's classes, .* 0\.\.{k - 1}, got {k}$"):
        model.generate(2, label=k, **cheap)


@pytest.mark.parametrize("command", [("gen",), ("upscale", "--factor", 2, "--image", "in.png")])
def test_the_cli_refuses_label_with_uncond_before_the_model_is_read(command, tmp_path, monkeypatch):
    """options.check_conditioning, from Sampling.of: one line naming both options, before --ckpt or --image is
    read (a file that is no model or no picture would be an error of its own)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-model.safetensors").write_bytes(b"not a model")
    (tmp_path / "in.png").write_bytes(b"not a picture")
    r = invoke(*command, "--ckpt", "no-model.safetensors", "--label", 3, "--uncond")
    line = r.output.strip()
    assert r.exit_code == 2 and "\n" not in line and "--label and --uncond exclude each other" in line, line


def test_the_api_refuses_label_with_uncond_before_the_guidance_it_then_lacks(classes):
    """A label with uncond=True is that contradiction, not "guidance without a label" (which the label would
    answer): one message, the same from generate, upscale and Model.labels."""
    model = ddpm.load(classes[1])
    message = r"^label and uncond=True exclude each other$"
    with pytest.raises(DdpmError, match=message):
        model.generate(2, label=3, uncond=True, guidance=2.0)
    with pytest.raises(DdpmError, match=message):
        model.upscale(np.zeros((14, 14), np.uint8), label=3, uncond=True, guidance=2.0)
    with pytest.raises(DdpmError, match=message):
        model.labels(2, 3, uncond=True)
