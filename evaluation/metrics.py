"""Sample quality without Inception, from the MNIST classifier's features and predictions (evaluation.classifier).

* Frechet distance (FID's formula, Heusel et al. 2017) between the classifier's penultimate-layer features of the
  samples and of the real MNIST test set, next to the same distance for N real *training* images (the floor: what
  a perfect generator scores at the same N, since FD is biased upwards at small N).
* Conditional accuracy: the classifier's agreement with the label each class-conditional sample was drawn for.
* Class histogram of unconditional samples, and the classifier's mean top-class probability on them beside its value
  on real test digits (how recognisable the digits are when no class was asked for).
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
from .classifier import CLASSIFIER_FILE, IMAGE_SHAPE, NUM_CLASSES, Classifier, features_and_probs, load_classifier


class EvaluationError(DdpmError, ValueError):
    """Images or labels the evaluator cannot score (wrong shape or type, fewer than 2); the message names the set."""


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


FLOOR_DRAWS = 5
# Below this N the figures are noise: the floor's own draws spread by more than half its mean, and an FD can land
# below every draw of real data (measured on real MNIST in docs/evaluation.md, "What small N means").
MIN_N = 1000


def check_samples(images, labels, name: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """(images, labels as int64) when they are what the evaluator scores: images (N,28,28) uint8 (the classifier's
    input, IMAGE_SHAPE), N >= 2, labels (N,) integers in -1..9 (-1: drawn without a label). EvaluationError
    otherwise, naming the set."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 1 + len(IMAGE_SHAPE) or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        shape = ", ".join(map(str, IMAGE_SHAPE))
        raise EvaluationError(f"{name}: expected uint8 images (N, {shape}), got {images.dtype} {images.shape} (the "
                              f"classifier reads greyscale MNIST digits)")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer) or \
            (len(labels) and (labels.min() < -1 or labels.max() > NUM_CLASSES - 1)):
        raise EvaluationError(f"labels must be {len(images)} integers in -1..{NUM_CLASSES - 1} (one per image), got "
                              f"{labels.dtype} {labels.shape}")
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
        """Features of the training images idx, each computed once and kept (one thread at a time fills them: a
        Reference is shared by the threads of ddpm.evaluate)."""
        with self._lock:
            if self._train_features is None:
                self._train_features = np.full((len(self.train_images), self.test_features.shape[1]), np.nan)
            todo = idx[np.isnan(self._train_features[idx, 0])]
            if len(todo):
                self._train_features[todo] = features_and_probs(self.classifier, self.train_images[todo])[0]
            return self._train_features[idx]

    def floors(self, n: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> list[float]:
        """FD of n real training images to the test set, for `draws` draws of them (disjoint while the 60000 allow):
        what a perfect generator scores at this n, and how much that varies."""
        total = len(self.train_images)
        perm = np.random.default_rng(seed).permutation(total)
        n = min(n, total)
        out = []
        for d in range(draws):
            lo = d * n
            idx = perm[lo:lo + n] if lo + n <= total else np.random.default_rng(seed + d).choice(total, n, False)
            out.append(frechet_distance(self.train_features(idx), self.test_features))
        return out

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
               "border_share": border_share(images), "real_border_share": self.test_border_share}
        return res


def format_table(rows: list[dict]) -> str:
    """The rows of `Reference.evaluate` as a text table, with the floor's spread and what it means."""
    head = (f"{'samples':<28} {'N':>6} {'FD':>9} {'floor (min-max)':>22} {'FD/floor':>9} {'cond acc':>9} "
            f"{'border':>7}  uncond: top-prob (real), histogram %")
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
        lines.append(f"{r['name'][:28]:<28} {r['n']:>6} {r['fd']:>9.3f} {floor:>22} {ratio:>9} {acc:>9} "
                     f"{100 * r['border_share']:>6.1f}%  {unc}")
    if any(r["within_floor_spread"] for r in rows):
        lines.append("* FD inside the spread of the real-data floor (min <= FD <= max): at this N the samples cannot "
                     "be told from real digits by this measure (a ratio below 1 is noise, not better than real data)")
    if any(r["below_floor"] for r in rows):
        lines.append("< FD below the floor's minimum: lower than any draw of real digits at this N, which is noise "
                     "(too few samples), not better than real data")
    if rows:
        lines.append(f"floor: FD of N real training images to the test set, mean of {rows[0]['floor_draws']} draws "
                     f"(min-max); border: share of samples with a pixel > 2 grey levels in the outer frame (real test "
                     f"digits: {100 * rows[0]['real_border_share']:.1f}%)")
    small = sorted({r["n"] for r in rows if r["n"] < MIN_N})
    if small:
        lines.append(f"Warning: N = {', '.join(map(str, small))} is below {MIN_N}: at this N FD and its floor are "
                     f"noise; use -n {MIN_N} or more (5000 and two seeds to compare within a few percent)")
    return "\n".join(lines)
