"""ddpm eval's metrics behave: real digits score at the floor, noise and wrong labels do not."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm.evaluation import CLASSIFIER_FILE, Reference, frechet_distance
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


@pytest.mark.slow
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
    # real digits are recognisable as the real test set is; blends of two digits of different classes are not;
    # MNIST borders are black, noise's are not
    assert abs(uncond["uncond_top_prob"] - ref.test_top_prob) < 0.02 and ref.test_top_prob > 0.95
    other = np.roll(np.arange(len(test)), 1)
    mix = ((test.astype(int) + test[other]) // 2).astype(np.uint8)[labels != labels[other]][:300]
    assert ref.evaluate(mix, np.full(len(mix), -1), "blends")["uncond_top_prob"] < ref.test_top_prob - 0.05
    assert real["border_share"] < 0.03 and bad["border_share"] == 1.0 and ref.test_border_share < 0.03
    # the floor's spread: at N = 1000 the draws differ, and real test digits lie within reach of them
    assert real["floor_min"] < real["fd_floor"] < real["floor_max"]


@pytest.mark.slow
def test_floor_draws_are_disjoint_and_shrink_with_n(ref):
    small, large = ref.floors(200), ref.floors(5000)
    assert len(small) == 5 and len(set(small)) == 5
    assert np.mean(large) < np.mean(small) / 3                   # FD's bias falls like 1/N


@pytest.mark.slow
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


def test_evaluation_finds_missing_data_before_drawing_samples(tmp_path):
    """evaluate_sets loads the reference before it consumes a lazy set: a missing MNIST folder is reported before
    any sample is drawn, and a list of sets is checked before anything is loaded."""
    from ddpm.evaluation import EvaluationError, evaluate_sets
    from ddpm.train.data import DataError

    drawn = []

    def sets():
        drawn.append(True)
        yield "s", np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)

    with pytest.raises(DataError, match="MNIST files missing"):
        evaluate_sets(sets(), tmp_path / "none", download=False, log=None)
    assert not drawn
    with pytest.raises(EvaluationError, match=r"s: expected uint8 images \(N, 28, 28\), got uint8 \(4, 32, 32\)"):
        evaluate_sets([("s", np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.int64))], tmp_path / "none",
                      download=False, log=None)


def test_floor_spread_and_small_n_are_said_plainly(monkeypatch):
    """An FD below the floor's minimum is not "within the spread" (it is noise), and an N below MIN_N is flagged."""
    from ddpm.evaluation import MIN_N, format_table, metrics

    ref = metrics.Reference(classifier=None, test_features=np.zeros((4, 2)), train_images=np.zeros((4, 28, 28)),
                            test_top_prob=0.98, test_border_share=0.01)
    monkeypatch.setattr(metrics, "features_and_probs", lambda clf, x: (np.zeros((len(x), 2)), np.eye(10)[np.arange(len(x)) % 10]))
    monkeypatch.setattr(metrics, "frechet_distance", lambda a, b: 143.6)
    images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10
    rows = {}
    for name, floors in (("below", [200.0, 260.0]), ("within", [100.0, 200.0]), ("above", [50.0, 60.0])):
        monkeypatch.setattr(metrics.Reference, "floors", lambda self, n, floors=floors: floors)
        rows[name] = ref.evaluate(images, labels, name)
    assert [(r["within_floor_spread"], r["below_floor"]) for r in rows.values()] == [(False, True), (True, False),
                                                                                       (False, False)]
    table = format_table([rows["below"]])
    assert "0.62<" in table and "below the floor's minimum" in table and "inside the spread" not in table
    assert table.splitlines()[-1].startswith(f"Warning: N = 20 is below {MIN_N}")
    many = {**rows["within"], "n": MIN_N}
    assert "0.96*" in format_table([many]) and "Warning" not in format_table([many])


def test_eval_table_never_cuts_a_name(monkeypatch):
    """A set's name is printed whole, whatever its length (a cut "w=0.45" reads "w=0."), with the columns after it
    aligned under their heads."""
    from ddpm.evaluation import format_table, metrics

    ref = metrics.Reference(classifier=None, test_features=np.zeros((4, 2)), train_images=np.zeros((4, 28, 28)),
                            test_top_prob=0.98, test_border_share=0.01)
    monkeypatch.setattr(metrics, "features_and_probs", lambda clf, x: (np.zeros((len(x), 2)), np.eye(10)[np.arange(len(x)) % 10]))
    monkeypatch.setattr(metrics, "frechet_distance", lambda a, b: 1.0)
    monkeypatch.setattr(metrics.Reference, "floors", lambda self, n: [1.0, 2.0])
    names = ["ddim10-eta0-gi0.28-5.42 w=0.45", "ddim10-eta0-gi0.28-5.42 w=0.45 uncond", "a.npz"]
    rows = [ref.evaluate(np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10, name) for name in names]
    lines = format_table(rows).splitlines()
    for name, line in zip(names, lines[2:5]):
        assert line.startswith(name + " ") and line.index(" 20 ") + 2 == lines[0].index("N"), (line, lines[0])


def test_eval_refuses_a_model_of_another_shape_before_loading_or_drawing(tmp_path, fake_mnist, monkeypatch):
    """A model whose images are not the classifier's 1x28x28 is refused in one line right after it is loaded: no
    reference is loaded and no sample drawn (at -n 10000 the samples' own check would come after an hour)."""
    import dataclasses

    from ddpm import pipeline
    from helpers import TINY, invoke, tiny_checkpoint

    loaded = tiny_checkpoint(tmp_path, cfg=dataclasses.replace(TINY, image_size=32))
    work = []
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: work.append("drawn"))
    monkeypatch.setattr(Reference, "load", classmethod(lambda cls, *a, **k: work.append("reference")))
    r = invoke("eval", "--ckpt", loaded.path, "-n", 300, "--data", fake_mnist, "--engine", "torch")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: ddpm eval scores 1x28x28 models (its classifier reads greyscale MNIST digits); this model makes "
        "1x32x32 images"], r.output
    assert work == []


def test_eval_of_a_model_without_classes_scores_it_unconditionally(tmp_path, fake_mnist):
    """A model without classes (one class, the web page's "none" first) has no class accuracy to give: its class 0
    is not the digit 0. eval draws and scores its samples unconditionally and says so in one line; a guidance scale,
    which would have no label to steer towards, is refused."""
    import dataclasses

    from helpers import TINY, invoke, tiny_checkpoint

    loaded = tiny_checkpoint(tmp_path, cfg=dataclasses.replace(TINY, num_classes=1))
    base = ["eval", "--ckpt", loaded.path, "--data", fake_mnist, "--engine", "torch", "--sampler", "ddim", "--steps", 2]
    r = invoke(*base, "-n", 20, "--json", tmp_path / "q.json")
    assert r.exit_code == 0, r.output
    assert "this model has no classes: its samples are drawn and scored unconditionally" in r.output
    row = json.loads((tmp_path / "q.json").read_text())[0]
    assert row["cond_accuracy"] is None and sum(row["uncond_histogram"]) == 20 and row["name"].endswith(" uncond")
    r = invoke(*base, "-n", 20, "--guidance", 1)
    assert r.exit_code == 2 and "this model has no classes" in r.output and "--guidance" in r.output, r.output


def test_the_legend_names_the_splits_the_scores_used(monkeypatch):
    """The Inception Score's legend says how many splits each score is a mean of (fewer at small N: is_splits), not
    the 10 it uses from N = 20."""
    from ddpm.evaluation import format_table, metrics

    ref = metrics.Reference(classifier=None, test_features=np.zeros((4, 2)), train_images=np.zeros((40, 28, 28)),
                            test_top_prob=0.98, test_border_share=0.01)
    monkeypatch.setattr(metrics, "features_and_probs",
                        lambda clf, x: (np.zeros((len(x), 2)), np.eye(10)[np.arange(len(x)) % 10]))
    monkeypatch.setattr(metrics, "frechet_distance", lambda a, b: 1.0)
    monkeypatch.setattr(metrics.Reference, "floors", lambda self, n: [1.0, 1.0])
    rows = {n: ref.evaluate(np.zeros((n, 28, 28), np.uint8), np.arange(n) % 10, f"n{n}") for n in (3, 8, 20)}
    assert [r["is_splits"] for r in rows.values()] == [1, 4, 10]
    assert "mean of 1 split (" in format_table([rows[3]]) and "mean of 10 splits" in format_table([rows[20]])
    assert "mean of 1 or 4 or 10 splits" in format_table(list(rows.values()))


def test_eval_samples_rows_name_one_file_each(tmp_path):
    """Two --samples files with one name (a/s.npz, b/s.npz) gave two rows named s.npz; one file given twice (by any
    path) was scored twice. Rows are named by the path where names repeat, and a file given twice is one line."""
    from ddpm.cli_options import sample_names

    for d in "ab":
        (tmp_path / d).mkdir()
        (tmp_path / d / "s.npz").write_bytes(b"")
    (tmp_path / "t.npz").write_bytes(b"")
    a, b, t = str(tmp_path / "a" / "s.npz"), str(tmp_path / "b" / "s.npz"), str(tmp_path / "t.npz")
    assert sample_names([a, b, t]) == [a, b, "t.npz"]
    assert sample_names([t]) == ["t.npz"]
    (tmp_path / "link.npz").symlink_to(t)
    r = CliRunner().invoke(main, ["eval", "--samples", t, "--samples", str(tmp_path / "link.npz")])
    assert r.exit_code == 2 and "are the same file: give each file once" in r.output, r.output
