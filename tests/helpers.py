"""Shared test helpers: a tiny randomised model saved as a checkpoint."""

import dataclasses
import tracemalloc

import pytest
import torch
from click.testing import CliRunner

from ddpm.cli import main
from ddpm.model import PRESETS, UNet
from ddpm.model.io import load_model, save_model

TINY = dataclasses.replace(PRESETS["tiny"], timesteps=100)
MNIST = TINY.image_shape   # (C, H, W) = (1, 28, 28): the tiny models', the shipped model's, MNIST's


def randomised_unet(cfg=TINY, seed=0, scale=0.05) -> UNet:
    """A UNet whose zero-initialised output layers are perturbed, so that t and y visibly matter."""
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m


def tiny_checkpoint(folder, seed=0, cfg=TINY):
    m = randomised_unet(cfg, seed)
    save_model(folder / "model.safetensors", cfg, m.state_dict(), step=1)
    return load_model(folder)


def invoke(*args, env=None):
    """Run `ddpm ARGS` in this process (click's CliRunner), arguments turned into strings."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def invoke_to_full_stdout(capsys, *args) -> tuple[int, str]:
    """Run `ddpm ARGS` in this process with standard output on /dev/full (a full disk: every write fails with
    ENOSPC), as `ddpm ARGS > /dev/full` would: (exit status, what it wrote to standard error). Python's flush at
    the exit of a process is not part of it: a subprocess test checks that."""
    import sys

    before = sys.stdout
    with open("/dev/full", "w") as full:
        sys.stdout = full
        try:
            main.main(args=[str(a) for a in args], prog_name="ddpm")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.stdout = before
    return code, capsys.readouterr().err


def traced_peak(fn) -> int:
    """Peak bytes Python and numpy allocated while fn runs, above what was in use before (tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def slow_except(values, *keep) -> list:
    """Values for pytest.mark.parametrize with only those in `keep` in the inner loop (`pytest -m "not slow"`): every
    other one is marked slow. A tuple stands for the arguments of one case."""
    return [v if v in keep else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for v in values]


class LazyModule:
    """A module imported on the first attribute read: diffusers takes 2-4 CPU-s to import, which every pytest-xdist
    worker would pay at collection although only a few tests use it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):   # pytest's collection probes module attributes (`_mock_name`...): no import
            raise AttributeError(attr)
        import importlib

        return getattr(importlib.import_module(self._name), attr)
