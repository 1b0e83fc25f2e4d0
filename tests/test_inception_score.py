"""The Inception Score (Salimans et al. 2016) of ddpm eval: its formula on known predictions, and its row."""

import numpy as np
import pytest

from ddpm.evaluation import EvaluationError, Reference, format_table, inception_score
from ddpm.train.data import load_mnist


@pytest.mark.parametrize("classes", [2, 4, 10])
def test_confident_uniform_predictions_score_the_number_of_classes(classes):
    # one-hot rows, every class equally often in each of the 10 contiguous splits
    probs = np.eye(classes)[np.arange(10 * classes * 3) % classes]
    mean, std = inception_score(probs)
    assert mean == pytest.approx(classes, abs=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_identical_predictions_score_one():
    probs = np.tile([0.7, 0.2, 0.1], (50, 1))
    assert inception_score(probs, splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_two_class_example_by_hand():
    # p(y) = (0.75, 0.25); KL of [1, 0] = log(4/3); of [0.5, 0.5] = 0.5 log(2/3) + 0.5 log 2 = 0.5 log(4/3)
    # IS = exp(mean KL) = exp(0.75 log(4/3)) = (4/3)^0.75
    mean, std = inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1)
    assert mean == pytest.approx((4 / 3) ** 0.75, abs=1e-12) and std == 0
    # two splits: the scores of each part (1 for a single row), their mean and population std
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.9, 0.1]])
    assert inception_score(probs, splits=2) == pytest.approx((1.5, 0.5), abs=1e-12)


@pytest.mark.parametrize("probs, splits, message", [
    (np.full((5, 2), 0.5), 10, "10 splits of 5 rows"),
    (np.full((5, 2), 0.5), 0, "0 splits of 5 rows"),
    (np.full((5, 2), 0.6), 1, "summing to 1"),
    (np.array([[1.5, -0.5]] * 5), 1, "non-negative"),
    (np.array([[np.nan, 1.0]] * 5), 1, "finite"),
    (np.full(10, 0.1), 1, r"expected class probabilities \(N, C\), got shape \(10,\)"),
])
def test_bad_probabilities_are_one_clear_error(probs, splits, message):
    with pytest.raises(EvaluationError, match=message):
        inception_score(probs, splits)
    assert issubclass(EvaluationError, ValueError)


def test_eval_row_has_is_beside_real_digits(fake_mnist):
    """Training digits used as samples score the Inception Score of the floor's draws of real training digits; the
    row and the table carry both, and the real value comes from the floor's classifier pass (no second one)."""
    from ddpm.evaluation import metrics

    ref = Reference.load(fake_mnist)
    train, labels = load_mnist(fake_mnist, "train")
    n = 40
    passes = []
    real = metrics.features_and_probs
    ref_probs = lambda clf, x: passes.append(len(x)) or real(clf, x)   # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "features_and_probs", ref_probs)
        row = ref.evaluate(train[:n], labels[:n].astype(np.int64), "real")
    assert passes[0] == n and sum(passes[1:]) == 5 * n   # the samples, then the floor's 5 draws, each once
    assert row["is_splits"] == 10 and row["is_std"] >= 0
    scores = ref.real_inception_scores(n, 10)
    assert row["real_is"] == pytest.approx(np.mean(scores))
    assert min(scores) - 0.3 <= row["is"] <= max(scores) + 0.3 and 1 <= row["is"] <= 10
    assert abs(row["is"] - row["real_is"]) < 0.3 * row["real_is"]
    table = format_table([row])
    assert "IS (real)" in table.splitlines()[0] and f"{row['is']:.2f} ({row['real_is']:.2f})" in table


def test_real_inception_scores_use_the_floors_draws():
    """real_is is computed on the same training digits as the floor (the probabilities of one classifier pass)."""
    from ddpm.evaluation import metrics

    ref = metrics.Reference(classifier=None, test_features=np.zeros((4, 2)), train_images=np.zeros((30, 28, 28)))
    ref._train_features = np.zeros((30, 2))
    ref._train_probs = np.eye(10)[np.arange(30) // 3]   # images 3k..3k+2 are class k
    draws = ref.floor_draws(10)
    expected = [inception_score(ref._train_probs[idx], 5)[0] for idx in draws]
    assert ref.real_inception_scores(10, 5) == pytest.approx(expected)
    assert len(draws) == 5 and all(len(d) == 10 for d in draws)
