"""The model shipped in the package loads and draws digits the classifier recognises."""

import numpy as np
import pytest

from ddpm.evaluation import load_classifier, predict
from ddpm.model.io import default_model_path, load_model
from ddpm.runtime.eager import EagerEngine
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.samplers import ddim_plan
from ddpm.runtime.schedule import Schedule


@pytest.mark.slow
def test_default_model_draws_recognisable_digits():
    path = default_model_path()
    assert path.is_file(), "the default model must ship with the package"
    loaded = load_model(path)
    assert loaded.cfg.num_classes == 10 and loaded.cfg.image_size == 28
    plan = ddim_plan(Schedule.of(loaded.cfg), 20)
    labels = labels_for(30, None, False)
    images = generate(EagerEngine(loaded.model, loaded.cfg.null_label), 30, plan, labels, 1.0, seed=0, batch=30,
                      progress=False, image_shape=loaded.cfg.image_shape)
    assert images.std() > 40                                   # ink on a dark background, not a flat image
    accuracy = (predict(load_classifier(), images) == labels).mean()
    assert accuracy >= 0.9, f"classifier agrees with only {accuracy:.0%} of the requested labels"


def test_shipped_export_belongs_to_the_shipped_model():
    """The default model ships with its verified ONNX export, so generating needs no export at first use."""
    import ddpm
    from ddpm.runtime.bundle import Bundle

    model = ddpm.load()
    assert model.export_dir == ddpm.api.default_export_dir()
    bundle = Bundle.load(model.export_dir, expected_hash=load_model(default_model_path()).hash)
    assert bundle.onnx_path("fp32").is_file()          # and its sha256 matches export.json
    assert bundle.meta["files"]["fp32"]["parity"]["error"] <= 1e-4


@pytest.mark.slow
def test_class_edits_with_the_shipped_model(mnist_dir):
    """SDEdit at the default strength 0.6 and guidance: the classifier agrees with the requested class. Measured
    99% on 100 test digits (README "Editing", python -m ddpm.bench.editing); here 20 digits, at least 18."""
    import ddpm
    from ddpm.train.data import load_mnist

    x, y = load_mnist(mnist_dir, "test")
    x, y = x[:20], y[:20].astype(np.int64)
    targets = (y + 1 + np.arange(20) % 9) % 10
    out = ddpm.load().edit(x, label=targets, engine="onnx")
    agree = (predict(load_classifier(), out) == targets).sum()
    assert agree >= 18, f"the classifier agrees with {agree} of 20 class edits"


@pytest.mark.slow
def test_upscales_with_the_shipped_model(mnist_dir):
    """ILVR x2 on 10 test digits: every result's 2x2 means within 0.5 grey level of the input, and the classifier
    still reads the original digit (measured 98% on 100 digits; here at least 8 of 10)."""
    import ddpm
    from ddpm.runtime.edits import downsample
    from ddpm.train.data import load_mnist

    x, y = load_mnist(mnist_dir, "test")
    small = np.clip(np.rint(downsample(x[:10], 2)), 0, 255).astype(np.uint8)
    out = ddpm.load().upscale(small, 2, engine="onnx")
    assert np.abs(downsample(out, 2) - small).max() <= 0.5
    assert (predict(load_classifier(), out) == y[:10]).sum() >= 8
