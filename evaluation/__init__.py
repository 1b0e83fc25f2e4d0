"""The evaluator of `ddpm eval` and `ddpm.evaluate`: sample quality measured with an MNIST classifier.

    classifier.py   the classifier (a small CNN), its training and its weights file
    metrics.py      Frechet distance, its real-data floor, accuracy, histograms, Inception Score, border share;
                    the table

`evaluate_sets` is the whole job: the reference (the classifier, loaded or retrained, and the real MNIST digits it is
compared with), then the figures of each set of samples. Needs PyTorch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from ..files import input_path
from .classifier import (CLASSIFIER_FILE, FEATURES, IMAGE_SHAPE, Classifier, features_and_predictions,
                         load_classifier, predict, train_classifier)
from .metrics import (MIN_N, EvaluationError, Reference, border_share, check_samples, format_table, frechet_distance,
                      inception_score)

__all__ = ["CLASSIFIER_FILE", "MIN_N", "Classifier", "EvaluationError", "Reference", "SAMPLE_BYTES", "border_share",
           "check_samples", "evaluate_sets", "features_and_predictions", "format_table", "frechet_distance",
           "inception_score", "load_classifier", "predict", "reference", "train_classifier"]

# The memory one evaluated sample takes: the uint8 image and the classifier's float64 features.
SAMPLE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] + FEATURES * 8

_KEPT: dict = {}   # (MNIST folder, classifier file) -> Reference, for reference(keep=True)
_KEPT_LOCK = threading.Lock()   # evaluate from several threads: one load, one Reference shared


def reference(data: str | os.PathLike | None = None, classifier: str | os.PathLike | None = None,
              retrain: bool = False, download: bool = True, progress: bool = True,
              log: Callable[[str], object] | None = print, keep: bool = False) -> Reference:
    """The Reference that samples are scored against: the classifier and the real MNIST digits.

    data: the MNIST folder (train.data.resolve_data_dir: else $DDPM_DATA, else the cache folder), downloaded when
    missing unless download=False. classifier: its weights file, default the shipped one (CLASSIFIER_FILE).
    retrain: train the classifier first (3 epochs; into `classifier`, else the user's config folder,
    locations.user_dir) and log its test accuracy. progress: the retraining's progress bar. log: one-line messages
    (downloads, the retrained classifier), None for none. keep: keep the Reference for the next call with the same
    folder and classifier file (ddpm.evaluate; a retrained classifier replaces it).
    Raises train.data.DataError (missing or damaged MNIST), model.io.CheckpointError (a file that is not the
    classifier's weights) and EvaluationError (no classifier file).
    """
    from ..train.data import ensure_mnist, resolve_data_dir

    say = log or (lambda *_: None)
    folder = ensure_mnist(resolve_data_dir(data), download=download, progress=say)
    path = Path(classifier or CLASSIFIER_FILE)
    if retrain:
        if classifier is None:
            from ..locations import user_dir

            path = user_dir("config") / "classifier.safetensors"
        accuracy = train_classifier(folder, path, progress=progress)
        say(f"classifier retrained: test accuracy {100 * accuracy:.2f}% -> {path}")
    if not os.path.lexists(path):
        raise EvaluationError(f"classifier weights {path} not found (use --train-classifier)")
    input_path(path, EvaluationError, "; use --train-classifier", name=f"classifier weights {path}")
    if not keep:
        return Reference.load(folder, path)
    key = (str(folder), str(path))
    with _KEPT_LOCK:
        if retrain or key not in _KEPT:
            _KEPT[key] = Reference.load(folder, path)
        return _KEPT[key]


def evaluate_sets(sets: Iterable[tuple[str, object, object]], data: str | os.PathLike | None = None,
                  classifier: str | os.PathLike | None = None, retrain: bool = False, download: bool = True,
                  progress: bool = True, log: Callable[[str], object] | None = print,
                  keep: bool = False) -> list[dict]:
    """The quality figures of each set of samples, as `ddpm eval` reports them (one dict per set, in order).

    sets: (name, images (N,28,28) uint8 0 black .. 255 white, labels (N,) integers, -1 for a sample drawn without a
    label), N >= 2; a list is checked before anything is loaded, any other iterable (e.g. a generator that draws
    the samples) is consumed after the reference is loaded, so that a missing data folder or classifier is found
    before samples are drawn. The other arguments are `reference`'s.

    Each dict holds: name, n; fd (Frechet distance of the classifier's 128-d penultimate features to the real test
    set's, Heusel et al. 2017's formula), fd_floor (the same for n real training images, mean of FLOOR_DRAWS draws;
    floor_min / floor_max their spread, floor_draws their number), fd_ratio, within_floor_spread (floor_min <= fd <=
    floor_max), below_floor (fd < floor_min: noise, too few samples); cond_n,
    cond_accuracy (None without labelled samples); uncond_histogram, uncond_top_prob (None without unlabelled ones)
    and real_top_prob; is and is_std (the Inception Score of the classifier's class probabilities, Salimans et al.
    2016: mean and std over is_splits splits, 10 from N = 20), real_is (its mean over the floor's draws of n real
    training images, with the same splits); border_share and real_border_share. Raises EvaluationError for a set
    that is not such images and labels, and what `reference` raises.
    """
    if isinstance(sets, (list, tuple)):
        for name, images, labels in sets:
            check_samples(images, labels, name)
    ref = reference(data, classifier, retrain, download, progress, log, keep)
    return [ref.evaluate(images, labels, name) for name, images, labels in sets]
