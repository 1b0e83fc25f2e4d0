"""Sample quality without Inception, from the MNIST classifier's features and predictions (evaluation.classifier).

* Frechet distance (FID's formula, Heusel et al. 2017) between the classifier's penultimate-layer features of the
  samples and of the real MNIST test set, next to the same distance for N real *training* images (the floor: what
  a perfect generator scores at the same N, since FD is biased upwards at small N).
* Conditional accuracy: the classifier's agreement with the label each class-conditional sample was drawn for.
* Class histogram of unconditional samples, and the classifier's mean top-class probability on them beside its value
  on real test digits (how recognisable the digits are when no class was asked for).
* Inception Score (Salimans et al. 2016) from the classifier's class probabilities, next to its value for the same
  draws of N real training images as the floor: high when each sample is classified confidently and the classes are
  diverse; at most the number of classes (10).
* Clean backgrounds: the share of samples with a border pixel brighter than 2 grey levels (MNIST digits have black
  borders).

The floor is drawn several times (disjoint sets of training images where N allows), so every table shows its spread:
at small N the floor itself varies by tens of percent, and an FD inside that range (min <= FD <= max) is as good as
real data; one below the minimum is noise. Below MIN_N samples the table says that its figures are noise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import DdpmError
from .classifier import (CLASSIFIER_FILE, IMAGE_SHAPE, NUM_CLASSES, SAMPLE_BYTES, Classifier, features_and_probs,
                         load_classifier)


class EvaluationError(DdpmError, ValueError):
    """Images or labels the evaluator cannot score (wrong shape or type, fewer than 2); the message names the set."""


IS_SPLITS = 10   # the Inception Score's splits, as Salimans et al. 2016 report it (mean +- std over 10)
IS_EPS = 1e-12   # probabilities are clipped below at this before their log


def border_share(images_u8: np.ndarray, width: int = 1, level: int = 2) -> float:
    """The share of images with a pixel brighter than `level` grey levels in their outer `width`-pixel frame (for the
    MNIST test set, width 1: 1.1%; width 2: 12%, as strokes reach into the margin)."""
    frame = np.ones(images_u8.shape[1:], dtype=bool)
    frame[width:-width, width:-width] = False
    return float((images_u8[:, frame] > level).any(axis=1).mean())


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with Tr (S1 S2)^(1/2) from the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def inception_score(probs: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """The Inception Score of class probabilities probs (N, C), as (mean, std) over `splits` splits.

    Salimans et al. 2016, "Improved Techniques for Training GANs", section 4: IS = exp(E_x KL(p(y|x) || p(y))), with
    p(y|x) a row of probs and p(y) the mean row. As in the paper's code, the N rows are cut into `splits` contiguous
    parts of N // splits or one more, the score is computed within each part (p(y) its own mean), and the result is
    the mean and the population standard deviation (ddof 0) of the parts' scores. Computed in float64, with the logs
    of probabilities clipped below at IS_EPS (1e-12): a zero probability adds exactly 0 to the KL. It lies in
    [1, C]: 1 when every row is the same, C when every row is one-hot and each part holds every class equally often.

    probs: (N, C) floats, each row non-negative, finite and summing to 1 within 1e-4 (a softmax's output). Raises
    EvaluationError (a ValueError) for probs that are not such rows, for splits < 1, or for N < splits.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise EvaluationError(f"Inception Score: expected class probabilities (N, C), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1, rtol=0, atol=1e-4):
        raise EvaluationError("Inception Score: probabilities must be finite, non-negative rows summing to 1")
    if splits < 1 or len(p) < splits:
        raise EvaluationError(f"Inception Score: {splits} splits of {len(p)} rows (need 1 <= splits <= N)")
    logp = np.log(np.clip(p, IS_EPS, None))
    scores = []
    for i in range(splits):
        rows = slice(i * len(p) // splits, (i + 1) * len(p) // splits)
        part, logpart = p[rows], logp[rows]
        py = part.mean(0)
        kl = (part * (logpart - np.log(np.clip(py, IS_EPS, None)))).sum(1)   # KL(p(y|x) || p(y)) per row
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def is_splits(n: int) -> int:
    """The splits the evaluator's Inception Scores use at N samples: IS_SPLITS, fewer below 2 * IS_SPLITS samples so
    that every split holds at least 2 (N >= 2)."""
    return max(1, min(IS_SPLITS, n // 2))


FLOOR_DRAWS = 5
# Below this N the figures are noise: the floor's own draws spread by more than half its mean, and an FD can land
# below every draw of real data (measured on real MNIST in docs/evaluation.md, "What small N means").
MIN_N = 1000


def check_model_shape(image_shape: tuple[int, int, int]) -> None:
    """Return when a model's images (C, H, W) are what the classifier reads, (1, *IMAGE_SHAPE): greyscale MNIST
    digits. EvaluationError (one line naming the shape) otherwise, to be raised right after the model is loaded,
    before any sample is drawn (the samples' own check, check_samples, comes only after sampling them all)."""
    want = (1, *IMAGE_SHAPE)
    if tuple(image_shape) != want:
        raise EvaluationError(f"ddpm eval scores {'x'.join(map(str, want))} models (its classifier reads greyscale "
                              f"MNIST digits); this model makes {'x'.join(map(str, image_shape))} images")


def check_count(n: int) -> None:
    """The one limit on how many samples are evaluated, of `ddpm eval -n`, `ddpm eval --samples` and ddpm.evaluate:
    OutOfMemory (one line, the same for each) when `n` samples need more than the host memory available, at
    SAMPLE_BYTES each (the image and its classifier features; runtime.generate.ensure_memory)."""
    from ..runtime.generate import ensure_memory

    ensure_memory(n * SAMPLE_BYTES, f"evaluating {n} samples", "evaluate fewer samples", per_unit=SAMPLE_BYTES)


def check_samples(images, labels, name: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """(images, labels as int64) when they are what the evaluator scores: images (N,28,28) uint8 (the classifier's
    input, IMAGE_SHAPE), N >= 2 and within check_count, labels (N,) integers in -1..9 (-1: drawn without a label).
    EvaluationError otherwise, naming the set; OutOfMemory (check_count), checked from the shape alone, before any
    value is looked at (a broadcast view of one digit may declare any N)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 1 + len(IMAGE_SHAPE) or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        shape = ", ".join(map(str, IMAGE_SHAPE))
        raise EvaluationError(f"{name}: expected uint8 images (N, {shape}), got {images.dtype} {images.shape} (the "
                              f"classifier reads greyscale MNIST digits)")
    check_count(len(images))
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer) or \
            (len(labels) and (labels.min() < -1 or labels.max() > NUM_CLASSES - 1)):
        got = f"values from {labels.min()} to {labels.max()}" if labels.shape == images.shape[:1] and \
            np.issubdtype(labels.dtype, np.integer) else f"{labels.dtype} {labels.shape}"
        raise EvaluationError(f"{name}: labels must be {len(images)} integers in -1..{NUM_CLASSES - 1} (one per image), got "
                              f"{got}")
    if len(images) < 2:
        raise EvaluationError(f"{name}: need at least 2 images for a Frechet distance")
    return images, labels.astype(np.int64)


@dataclass
class Reference:
    """What every evaluation compares with: the real test set's features and the training images."""
    classifier: Classifier
    test_features: np.ndarray
    train_images: np.ndarray
    test_top_prob: float = float("nan")   # the classifier's mean top-class probability on the real test digits
    test_border_share: float = float("nan")   # border_share of the real test digits
    _train_features: np.ndarray | None = None
    _train_probs: np.ndarray | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, data_dir, classifier_path=CLASSIFIER_FILE) -> "Reference":
        from ..train.data import load_mnist

        clf = load_classifier(classifier_path)
        test, _ = load_mnist(data_dir, "test")
        train, _ = load_mnist(data_dir, "train")
        feats, probs = features_and_probs(clf, test)
        return cls(clf, feats, train, float(probs.max(1).mean()), border_share(test))

    def train_features(self, idx: np.ndarray) -> np.ndarray:
        """Features (len(idx), 128) of the training images idx (train_features_and_probs)."""
        return self.train_features_and_probs(idx)[0]

    def train_features_and_probs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (len(idx), 128), class probabilities (len(idx), 10)) of the training images idx, float64, each
        image's computed once in one classifier pass and kept (one thread at a time fills them: a Reference is shared
        by the threads of ddpm.evaluate)."""
        with self._lock:
            if self._train_features is None:
                self._train_features = np.full((len(self.train_images), self.test_features.shape[1]), np.nan)
                self._train_probs = np.full((len(self.train_images), NUM_CLASSES), np.nan)
            todo = idx[np.isnan(self._train_features[idx, 0])]
            if len(todo):
                self._train_features[todo], self._train_probs[todo] = features_and_probs(self.classifier,
                                                                                         self.train_images[todo])
            return self._train_features[idx], self._train_probs[idx]

    def floor_draws(self, n: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> list[np.ndarray]:
        """The indices of the training images in each of `draws` draws of n (disjoint while the 60000 allow; n is
        capped at their number)."""
        total = len(self.train_images)
        perm = np.random.default_rng(seed).permutation(total)
        n = min(n, total)
        return [perm[d * n:(d + 1) * n] if (d + 1) * n <= total
                else np.random.default_rng(seed + d).choice(total, n, False) for d in range(draws)]

    def floors(self, n: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> list[float]:
        """FD of n real training images to the test set, for `draws` draws of them (floor_draws): what a perfect
        generator scores at this n, and how much that varies."""
        return [frechet_distance(self.train_features(idx), self.test_features)
                for idx in self.floor_draws(n, draws, seed)]

    def real_inception_scores(self, n: int, splits: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> list[float]:
        """The Inception Score (inception_score's mean over `splits`; fewer where n is capped at fewer than 2 * splits
        training images, as is_splits) of n real training images, for the same draws as `floors` (their
        probabilities come from the same classifier pass as the floor's features)."""
        return [inception_score(self.train_features_and_probs(idx)[1], min(splits, is_splits(len(idx))))[0]
                for idx in self.floor_draws(n, draws, seed)]

    def floor(self, n: int, seed: int = 0) -> float:
        """The mean of `floors(n)`."""
        return float(np.mean(self.floors(n, seed=seed)))

    def evaluate(self, images: np.ndarray, labels: np.ndarray, name: str = "samples") -> dict:
        """Quality figures of uint8 images (N,28,28) drawn for labels (N,) (-1: unconditional): see `evaluate_sets`.
        Raises EvaluationError (check_samples)."""
        images, labels = check_samples(images, labels, name)
        feats, probs = features_and_probs(self.classifier, images)
        preds = probs.argmax(1)
        fd, floors = frechet_distance(feats, self.test_features), self.floors(len(images))
        floor = float(np.mean(floors))
        splits = is_splits(len(images))
        score, score_std = inception_score(probs, splits)
        cond = labels >= 0
        res = {"name": name, "n": int(len(images)), "fd": fd, "fd_floor": floor, "fd_ratio": fd / floor,
               "floor_min": min(floors), "floor_max": max(floors), "floor_draws": len(floors),
               "within_floor_spread": bool(min(floors) <= fd <= max(floors)),
               "below_floor": bool(fd < min(floors)),
               "cond_n": int(cond.sum()),
               "cond_accuracy": float((preds[cond] == labels[cond]).mean()) if cond.any() else None,
               "uncond_histogram": np.bincount(preds[~cond], minlength=10).tolist() if (~cond).any() else None,
               "uncond_top_prob": float(probs[~cond].max(1).mean()) if (~cond).any() else None,
               "real_top_prob": self.test_top_prob,
               "is": score, "is_std": score_std, "is_splits": splits,
               "real_is": float(np.mean(self.real_inception_scores(len(images), splits))),
               "border_share": border_share(images), "real_border_share": self.test_border_share}
        return res


def format_table(rows: list[dict]) -> str:
    """The rows of `Reference.evaluate` as a text table, with the floor's spread and what it means."""
    wide = max([28, *(len(r["name"]) for r in rows)])   # every name whole: a cut one may lose its guidance scale
    head = (f"{'samples':<{wide}} {'N':>6} {'FD':>9} {'floor (min-max)':>22} {'FD/floor':>9} {'cond acc':>9} "
            f"{'IS (real)':>13} {'border':>7}  uncond: top-prob (real), histogram %")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['cond_accuracy']:.2f}%" if r["cond_accuracy"] is not None else "-"
        unc = "-"
        if r.get("uncond_histogram"):
            total = sum(r["uncond_histogram"])
            unc = (f"{r['uncond_top_prob']:.3f} ({r['real_top_prob']:.3f}), "
                   + " ".join(f"{100 * h / total:.0f}" for h in r["uncond_histogram"]))
        floor = f"{r['fd_floor']:.3f} ({r['floor_min']:.2f}-{r['floor_max']:.2f})"
        ratio = f"{r['fd_ratio']:.2f}" + ("*" if r["within_floor_spread"] else "<" if r["below_floor"] else "")
        score = f"{r['is']:.2f} ({r['real_is']:.2f})"
        lines.append(f"{r['name']:<{wide}} {r['n']:>6} {r['fd']:>9.3f} {floor:>22} {ratio:>9} {acc:>9} "
                     f"{score:>13} {100 * r['border_share']:>6.1f}%  {unc}")
    if any(r["within_floor_spread"] for r in rows):
        lines.append("* FD inside the spread of the real-data floor (min <= FD <= max): at this N the samples cannot "
                     "be told from real digits by this measure (a ratio below 1 is noise, not better than real data)")
    if any(r["below_floor"] for r in rows):
        lines.append("< FD below the floor's minimum: lower than any draw of real digits at this N, which is noise "
                     "(too few samples), not better than real data")
    if rows:
        splits = sorted({r["is_splits"] for r in rows})   # is_splits: fewer than IS_SPLITS at small N
        lines.append(f"floor: FD of N real training images to the test set, mean of {rows[0]['floor_draws']} draws "
                     f"(min-max); IS: Inception Score of the classifier's class probabilities, mean of "
                     f"{' or '.join(map(str, splits))} split{'s' if splits != [1] else ''} (at most {NUM_CLASSES}, "
                     f"the number of classes), beside its mean over the floor's draws; "
                     f"border: share of samples with a pixel > 2 grey levels in the outer frame (real test digits: "
                     f"{100 * rows[0]['real_border_share']:.1f}%)")
    small = sorted({r["n"] for r in rows if r["n"] < MIN_N})
    if small:
        lines.append(f"Warning: N = {', '.join(map(str, small))} is below {MIN_N}: at this N FD and its floor are "
                     f"noise; use -n {MIN_N} or more (5000 and two seeds to compare within a few percent)")
    return "\n".join(lines)
