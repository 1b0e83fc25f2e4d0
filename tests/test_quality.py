"""ddpm eval's metrics behave: real digits score at the floor, noise and wrong labels do not."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm.bench.quality import CLASSIFIER_FILE, Reference, frechet_distance
from ddpm.cli import main
from ddpm.train.data import load_mnist


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # N(0, I) vs N(m, 4I) in d=3: |m|^2 + 3 (1 + 4 - 2*2) = |m|^2 + 3
    b = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0, 0])
    assert frechet_distance(a, b) == pytest.approx(1 + 3, rel=0.05)


@pytest.fixture(scope="module")
def ref(mnist_dir):
    return Reference.load(mnist_dir)


def test_real_digits_score_at_the_floor_and_noise_does_not(ref, mnist_dir):
    test, labels = load_mnist(mnist_dir, "test")
    # a random subset: the test file is ordered by writer population, so test[:1000] is not representative
    idx = np.random.default_rng(0).choice(len(test), 1000, replace=False)
    test, labels = test[idx], labels[idx]
    real = ref.evaluate(test, labels, "real")
    assert real["cond_accuracy"] >= 0.98                       # the shipped classifier is >= 99% on MNIST test
    assert real["fd_ratio"] < 1.5                               # real test digits are as good as real train digits
    noise = np.random.default_rng(0).integers(0, 256, (1000, 28, 28)).astype(np.uint8)
    bad = ref.evaluate(noise, labels[:1000], "noise")
    assert bad["fd_ratio"] > 10 and bad["cond_accuracy"] < 0.3
    uncond = ref.evaluate(test[:500], np.full(500, -1), "uncond")
    assert uncond["cond_accuracy"] is None and sum(uncond["uncond_histogram"]) == 500
    assert min(uncond["uncond_histogram"]) > 20                 # every class present


def test_eval_cli_on_samples_file(mnist_dir, tmp_path):
    test, labels = load_mnist(mnist_dir, "test")
    np.savez(tmp_path / "s.npz", images=test[:300], labels=labels[:300])
    r = CliRunner().invoke(main, ["eval", "--data", str(mnist_dir), "--samples", str(tmp_path / "s.npz"),
                                  "--json", str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "q.json").read_text())[0]
    assert row["n"] == 300 and row["cond_accuracy"] > 0.97 and "FD/floor" in r.output
    (tmp_path / "bad.npz").write_bytes(b"nope")
    r = CliRunner().invoke(main, ["eval", "--data", str(mnist_dir), "--samples", str(tmp_path / "bad.npz")])
    assert r.exit_code == 1 and "not a samples file" in r.output


def test_classifier_is_shipped():
    assert CLASSIFIER_FILE.is_file()
