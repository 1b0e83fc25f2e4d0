"""The model shipped in the package loads and draws digits the classifier recognises."""

import numpy as np
import pytest

from ddpm.bench.quality import load_classifier, predict
from ddpm.model.io import default_model_path, load_model
from ddpm.runtime.eager import EagerEngine
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.samplers import ddim_plan
from ddpm.runtime.schedule import Schedule


def test_default_model_draws_recognisable_digits():
    path = default_model_path()
    assert path.is_file(), "the default model must ship with the package"
    loaded = load_model(path)
    assert loaded.cfg.num_classes == 10 and loaded.cfg.image_size == 28
    plan = ddim_plan(Schedule.make(loaded.cfg.schedule, loaded.cfg.timesteps), 20)
    labels = labels_for(30, None, False)
    images = generate(EagerEngine(loaded.model, loaded.cfg.null_label), 30, plan, labels, 1.0, seed=0, batch=30,
                      progress=False)
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
