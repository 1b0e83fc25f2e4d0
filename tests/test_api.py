"""The Python API (ddpm.load / Model): what a user calls, its errors, its engine cache."""

from types import SimpleNamespace

import numpy as np
import pytest

import ddpm
from ddpm.api import DdpmError
from ddpm.runtime import engines
from ddpm.runtime.engine import Supports
from ddpm.runtime.nets import EngineUnavailable


@pytest.fixture(scope="module")
def model():
    return ddpm.load()


def test_generate_shapes_labels_and_seeds(model):
    a = model.generate(6, label=3, steps=4, seed=1, batch=4)
    assert a.shape == (6, 28, 28) and a.dtype == np.uint8 and a.std() > 10
    b = model.generate(3, label=3, steps=4, seed=1, start=3, batch=2)       # samples 3..5 of the same stream
    assert np.abs(a[3:].astype(int) - b).max() <= 1
    assert model.labels(4).tolist() == [0, 1, 2, 3] and model.labels(2, uncond=True).tolist() == [-1, -1]
    assert model.labels(3, [4, 5, 6]).tolist() == [4, 5, 6]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1}, "n must be"), ({"batch": 0}, "batch must be"), ({"label": 10}, "label must be"),
    ({"label": [1, 2, 3]}, "label must be a class in 0..9, or 2 of them"),
    ({"guidance": float("nan")}, "guidance must be"),
    ({"steps": 5000}, "steps must be in 1..1000"), ({"sampler": "euler"}, "sampler must be one of"),
    ({"engine": "tvm"}, "engine must be an engine name"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"label": 3, "uncond": True}, "exclude each other"),
])
def test_bad_arguments_raise_one_error_type(model, kwargs, message):
    with pytest.raises(DdpmError, match=message):
        model.generate(**{"n": 2, "steps": 2, **kwargs})


def test_load_errors_are_ddpm_errors(tmp_path):
    with pytest.raises(DdpmError, match="does not exist"):
        ddpm.load(tmp_path / "nothing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"not a model")
    with pytest.raises(DdpmError, match="not a readable safetensors"):
        ddpm.load(tmp_path / "x.safetensors")


def test_trt_engines_are_cached_per_batch_range(monkeypatch, model):
    """A TensorRT engine serves a batch range: a larger batch must get its own engine, not the smaller one's."""
    made = []
    monkeypatch.setattr(engines, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(engines, "have_torch", lambda: True)
    monkeypatch.setattr(engines, "make_engine", lambda name, *, max_batch, **options:
                        made.append((name, max_batch)) or SimpleNamespace(closed=False))
    m = ddpm.load()
    a, b, c = m.engine("trt", max_batch=16), m.engine("trt", max_batch=128), m.engine("trt", max_batch=16)
    assert a is not b and a is c and made == [("trt", 16), ("trt", 128)]
    assert m.engine("onnx", max_batch=16) is m.engine("onnx", max_batch=128)   # onnx serves any batch


def test_runner_errors_inside_generate_become_ddpm_errors(monkeypatch):
    """Runners (and their bindings) are built on first use inside generate(): their errors are the user's too."""
    class Broken:
        name, device, supports = "onnx", "cpu", Supports(edits=True, states=True)

        def run(self, *a, **k):
            raise EngineUnavailable("model.onnx: tensor 'x' is float16, the runner's buffer is float32")

    m = ddpm.load()
    monkeypatch.setattr(m, "engine", lambda *a, **k: Broken())
    with pytest.raises(DdpmError, match="tensor 'x' is float16"):
        m.generate(2, steps=2)


@pytest.mark.slow
def test_evaluate_scores_real_digits_and_refuses_bad_labels(mnist_dir, tmp_path):
    """ddpm.evaluate: real test digits score inside the floor's spread with the classifier's accuracy; noise does not;
    bad labels and a folder without MNIST are one DdpmError each."""
    from ddpm.train.data import load_mnist

    test, labels = load_mnist(mnist_dir, "test")
    real = ddpm.evaluate(test[:500], labels[:500].astype(np.int64), data=mnist_dir)
    assert real["cond_accuracy"] > 0.97 and real["fd_ratio"] < 1.5 and real["n"] == 500
    noise = np.random.default_rng(0).integers(0, 256, (500, 28, 28), dtype=np.uint8)
    bad = ddpm.evaluate(noise, -np.ones(500, np.int64), data=mnist_dir)
    assert bad["fd_ratio"] > 10 and bad["cond_accuracy"] is None and sum(bad["uncond_histogram"]) == 500
    for wrong in (labels[:499], labels[:500].astype(np.float32), np.full(500, 10)):
        with pytest.raises(ddpm.DdpmError, match="labels"):
            ddpm.evaluate(test[:500], wrong, data=mnist_dir)
    with pytest.raises(ddpm.DdpmError, match="MNIST"):
        ddpm.evaluate(test[:500], labels[:500].astype(np.int64), data=tmp_path / "none", download=False)


def test_evaluate_names_itself_in_every_refusal_of_its_samples(tmp_path):
    """Labels out of -1..9 and fewer than 2 digits were refused without the `ddpm.evaluate():` every other bad
    argument names, and only after the MNIST data was looked up. Both name the function, before any data is read."""
    digits = np.zeros((4, 28, 28), np.uint8)
    for images, labels, what in ((digits, np.full(4, 10), "labels must be 4 integers in -1..9"),
                                 (digits[:1], np.zeros(1, np.int64), "need at least 2 images")):
        with pytest.raises(ddpm.DdpmError, match=r"^ddpm\.evaluate\(\): samples: " + what):
            ddpm.evaluate(images, labels, data=tmp_path / "none", download=False)
