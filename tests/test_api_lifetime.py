"""A Model's engines have a lifetime: Model.close() and `with ddpm.load() as m:` close them; the Model stays usable."""

import numpy as np
import pytest

import ddpm
from ddpm.runtime.engine import EngineClosed


def _use(eng, model):
    """One 2-image batch of 2 DDIM steps through `eng` directly: (2, C, H, W) float32."""
    from ddpm.runtime.noise import make_noise

    plan = model.plan("ddim", 2)
    x_T, z = make_noise(0, 0, 2, plan.num_slots, model.image_shape)
    return eng.run(x_T, z, np.array([1, 2]), plan, 0.0)


def test_close_closes_the_engines_and_a_later_call_makes_new_ones():
    model = ddpm.load()
    before = model.generate(2, steps=2, engine="onnx", device="cpu")
    eng = model.engine("onnx", "cpu")
    _use(eng, model)
    model.close()
    assert eng.closed
    with pytest.raises(EngineClosed):
        _use(eng, model)
    model.close()                                               # closing again does nothing
    again = model.engine("onnx", "cpu")
    assert again is not eng and not again.closed
    assert np.array_equal(model.generate(2, steps=2, engine="onnx", device="cpu"), before)   # same digits


def test_with_block_closes_the_engines():
    with ddpm.load() as model:
        eng = model.engine("onnx", "cpu")
        _use(eng, model)
    assert eng.closed
    with pytest.raises(EngineClosed):
        _use(eng, model)
