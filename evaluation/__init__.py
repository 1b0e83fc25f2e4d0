"""The evaluator of `ddpm eval` and `ddpm.evaluate`: sample quality measured with an MNIST classifier.

    classifier.py   the classifier (a small CNN), its training and its weights file
    metrics.py      Frechet distance, its real-data floor, accuracy, histograms, Inception Score, border share;
                    the table

`evaluate_sets` is the whole job: the reference (the classifier, loaded or retrained, and the real MNIST digits it is
compared with), then the figures of each set of samples; `evaluate` (`ddpm.evaluate`) is the Python API's call of
it. The evaluator needs PyTorch, but importing this package does not: `import ddpm` imports `evaluate`, and the
base install is torch-free. The names read from classifier.py and metrics.py are imported when first used (PEP 562).
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from ..arguments import checked
from ..files import input_path
from ..schema import Str

# the names this package takes from its modules, imported on first use: both import PyTorch
_FROM = {**dict.fromkeys(("CLASSIFIER_FILE", "FEATURES", "IMAGE_SHAPE", "SAMPLE_BYTES", "Classifier",
                          "features_and_predictions", "load_classifier", "predict", "train_classifier"), "classifier"),
         **dict.fromkeys(("MIN_N", "EvaluationError", "Reference", "border_share", "check_count", "check_model_shape",
                          "check_samples", "format_table", "frechet_distance", "inception_score"), "metrics")}

__all__ = sorted([*_FROM, "evaluate", "evaluate_sets", "reference"])


def __getattr__(name: str):
    if name in _FROM:
        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .classifier import CLASSIFIER_FILE, train_classifier
    from .metrics import EvaluationError, Reference

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
    from .metrics import check_samples

    if isinstance(sets, (list, tuple)):
        for name, images, labels in sets:
            check_samples(images, labels, name)
    ref = reference(data, classifier, retrain, download, progress, log, keep)
    return [ref.evaluate(images, labels, name) for name, images, labels in sets]


def _count_limit(dims: dict) -> None:
    """check_count of the N the images declare, from their shape alone (before their labels' values are read)."""
    from .metrics import check_count

    if "N" in dims:
        check_count(dims["N"][0])


@checked(name=Str(), limits=_count_limit)
def evaluate(images, labels, data: str | os.PathLike | None = None, name: str = "samples",
             download: bool = True) -> dict:
    """Quality figures of generated digits, as `ddpm eval` reports them (evaluate_sets).

    images: (N, 28, 28) uint8, 0 black .. 255 white (what `Model.generate` returns), N >= 2; images of another
    shape are refused before anything is loaded (a model of another image shape cannot be scored). labels: (N,)
    integers, the class each digit was drawn for, -1 for unconditional ones (every digit of a model without classes,
    num_classes 1, whose class 0 is not the digit 0: model.labels(n, uncond=True)). data: the MNIST folder (default $DDPM_DATA, else
    ~/.cache/ddpm/mnist, downloaded when missing unless download=False). Returns a dict: fd (Frechet distance of the
    shipped classifier's 128-d features to the real test set's, Heusel et al. 2017's formula), fd_floor (the same for
    N real training images, mean of 5 draws; floor_min/floor_max their spread), fd_ratio, within_floor_spread
    (floor_min <= fd <= floor_max), below_floor (fd < floor_min: noise, too few digits), cond_accuracy (None without
    labelled digits), uncond_histogram / uncond_top_prob (None without unconditional ones), is / is_std (the
    Inception Score of the classifier's class probabilities, Salimans et al. 2016, over 10 splits) and real_is (the
    same for the floor's draws of N real training digits), border_share. Needs PyTorch (the classifier). Raises
    DdpmError for bad arrays, missing data or no PyTorch."""
    from ..model.io import require_torch

    from .metrics import EvaluationError, check_samples

    try:   # what the arguments' types allow and the scores cannot take (labels out of range, N < 2)
        check_samples(images, labels, name)
    except EvaluationError as e:
        raise EvaluationError(f"ddpm.evaluate(): {e}") from None
    require_torch("ddpm.evaluate")
    return evaluate_sets([(name, images, labels)], data, download=download, log=None, keep=True)[0]
