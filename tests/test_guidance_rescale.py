"""The guidance rescale (Lin et al. 2024, eq. 15-16; `--guidance-rescale`, `guidance_rescale=`): the formula, every
engine that samples, the editing methods, the CLI and the API; off by default, where every digit and the shipped
generator's plan stay what they were."""

import json

import numpy as np
import pytest
import torch

import ddpm
from ddpm.api import default_export_dir
from ddpm.errors import DdpmError
from ddpm.options import GUIDANCE_INTERVAL
from ddpm.runtime.eager import guided
from ddpm.runtime.edits import repaint_plan
from ddpm.runtime.runner import plan_key
from helpers import MNIST, invoke, slow_except, tiny_checkpoint

ENGINES = ("runtime-torch", "onnx", "onnx-generator")   # against "torch", the reference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gr")
    tiny_checkpoint(root, seed=1)
    return root / "model.safetensors"


@pytest.fixture(scope="module")
def model(ckpt):
    return ddpm.load(ckpt)


def test_eager_rescale_is_diffusers_rescale_noise_cfg():
    """guided(..., rescale=phi) computes diffusers' rescale_noise_cfg of the guided eps, sample by sample."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg   # diffusers 0.42.1 (the [test] extra)

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 1, 28, 28, generator=g)
    uncond = 1.5 * torch.randn(3, 1, 28, 28, generator=g) + 0.2
    model_fn = lambda x, t, y: torch.cat([cond, uncond]) if len(y) == 6 else cond
    x, labels = torch.zeros(3, 1, 28, 28), torch.tensor([1, 2, 3])
    w = 2.0
    for phi in (0.0, 0.7, 1.0):
        got = guided(model_fn, labels, 10, w, phi)(x, 5)
        want = rescale_noise_cfg(cond + w * (cond - uncond), cond, guidance_rescale=phi)
        assert torch.allclose(got, want, atol=1e-5), phi
    assert torch.equal(guided(model_fn, labels, 10, w, 0.7)(x, 5, False), cond)   # unguided rows: untouched


@pytest.mark.parametrize("sampler, interval", slow_except([("unipc", None), ("unipc", GUIDANCE_INTERVAL), ("ddim", None)],
                                                          ("unipc", GUIDANCE_INTERVAL)))
def test_every_engine_gives_the_rescaled_digits(model, sampler, interval):
    """torch, runtime-torch, onnx and onnx-generator run the rescale and agree; it changes the digits."""
    kw = dict(sampler=sampler, steps=5, guidance=3.0, guidance_interval=interval, seed=5, batch=4)
    ref = model.generate(6, engine="torch", guidance_rescale=0.7, **kw).astype(int)
    off = model.generate(6, engine="torch", **kw).astype(int)
    assert ref.std() > 5 and np.abs(ref - off).max() > 8   # the option changes the digits
    for name in ENGINES:
        assert np.abs(model.generate(6, engine=name, guidance_rescale=0.7, **kw).astype(int) - ref).max() <= 2, name


def test_off_and_unguided_change_nothing(model):
    """phi = 0 is the plan itself (same name, same key: the shipped generator still serves the default plan), and
    without guidance the rescale has nothing to act on: asked for there, it is refused."""
    plan = model.plan()
    off = model.plan(guidance_rescale=0.0)
    assert off.name == plan.name and plan_key(off) == plan_key(plan)
    assert model.plan(guidance_rescale=0.7).name == plan.name + "-gr0.7"
    assert plan_key(model.plan(guidance_rescale=0.7)) != plan_key(plan)
    shipped = ddpm.load()
    meta = json.loads((default_export_dir() / "export.json").read_text())
    assert plan_key(shipped.plan()) in {g["plan_key"] for g in meta["generators"]}
    kw = dict(steps=4, seed=2, engine="onnx")
    for uncond in (False, True):
        with pytest.raises(ddpm.DdpmError, match="so it would change nothing"):
            model.generate(4, uncond=uncond, guidance=0.0, guidance_rescale=1.0, **kw)


def test_editing_methods_carry_the_rescale(model):
    """edit (SDEdit) and inpaint (RePaint's own plan) pass it to the plan; torch and onnx agree."""
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 11:17] = 255                                # a bright bar on black (a tiny model draws noise)
    kw = dict(n=3, label=3, guidance=3.0, steps=6, seed=1)
    ref = model.edit(digit, strength=0.8, guidance_rescale=0.7, engine="torch", **kw).astype(int)
    assert np.abs(ref - model.edit(digit, strength=0.8, engine="torch", **kw).astype(int)).max() > 8
    assert np.abs(model.edit(digit, strength=0.8, guidance_rescale=0.7, engine="onnx", **kw).astype(int)
                  - ref).max() <= 2
    assert repaint_plan(model.plan("ddim", 6, guidance_rescale=0.7), 1, 2).guidance_rescale == 0.7
    filled = model.inpaint(digit, guidance_rescale=0.7, engine="onnx", **kw)
    assert not np.array_equal(filled, model.inpaint(digit, engine="onnx", **kw))


def test_cli_and_api_take_the_option_and_refuse_bad_values(model, ckpt, tmp_path):
    out = tmp_path / "g.npz"
    r = invoke("gen", "--ckpt", ckpt, "-n", 4, "--steps", 4, "--guidance", 3, "--guidance-interval", "all",
               "--guidance-rescale", 0.7, "--seed", 3, "--out", out, "--engine", "onnx", "-q")
    assert r.exit_code == 0, r.output
    assert "-gr0.7" in r.output
    want = model.generate(4, steps=4, guidance=3.0, guidance_interval=None, guidance_rescale=0.7, seed=3,
                          engine="onnx")
    assert np.array_equal(np.load(out)["images"], want)
    r = invoke("edit", "--ckpt", ckpt, "--image", _png(tmp_path, want[0]), "-n", 2, "--label", 3, "--steps", 4,
               "--guidance-rescale", 0.7, "--out", tmp_path / "e.png", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--guidance-rescale", 1.5, "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and "--guidance-rescale" in r.output
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(DdpmError, match="guidance_rescale"):
            model.generate(2, guidance_rescale=bad)


def _png(folder, image):
    from PIL import Image

    path = folder / "in.png"
    Image.fromarray(image).save(path)
    return path


def test_numpy_runner_rescales_without_allocating(tiny_exported):
    """The numpy runner's rescale (ops.std_rows_, mul_rows_) makes no image-sized temporary, as the rest of its loop
    (tests/test_runtime.py::test_onnx_loop_allocates_nothing)."""
    from ddpm.runtime.bundle import Bundle
    from ddpm.runtime.nets import OnnxNet
    from ddpm.runtime.noise import make_noise
    from ddpm.runtime.runner import Runner
    from ddpm.runtime.samplers import unipc_plan
    from helpers import traced_peak

    bundle = Bundle.load(tiny_exported(seed=1) / "exp")
    plan = unipc_plan(bundle.schedule, 4).with_guidance_rescale(0.7)
    r = Runner(OnnxNet(bundle.onnx_path("fp32"), "cpu"), 3, plan, True, 10, MNIST)
    x_T, _ = make_noise(0, 0, 3, 0, MNIST)
    labels = np.array([1, 2, 3])
    r.load(x_T, None, labels, 2.0)
    r.loop()   # warm-up (onnxruntime's arena)
    r.load(x_T, None, labels, 2.0)
    assert traced_peak(r.loop) < 784 * 4


def test_the_unrolled_generator_carries_it_too(tiny_exported):
    """Both generator forms write the rescale (the loop form is the engine's, above); add_generator verifies the
    unrolled one against the runtime and raises GeneratorFailed if it disagrees."""
    from ddpm.export.generator import add_generator
    from ddpm.runtime.bundle import Bundle
    from ddpm.runtime.samplers import unipc_plan

    exp = tiny_exported(seed=1) / "exp"
    plan = unipc_plan(Bundle.load(exp).schedule, 3).with_guidance_rescale(0.7)
    add_generator(exp, plan, 3.0, "unrolled", log=lambda *_: None)
    assert Bundle.load(exp).generator(plan_key(plan), "unrolled") is not None
