"""Sample quality without Inception: an MNIST classifier's features and predictions.

* Frechet distance (FID's formula, Heusel et al. 2017) between the classifier's penultimate-layer features of the
  samples and of the real MNIST test set, next to the same distance for N real *training* images (the floor: what
  a perfect generator scores at the same N, since FD is biased upwards at small N).
* Conditional accuracy: the classifier's agreement with the label each class-conditional sample was drawn for.
* Class histogram of unconditional samples, and the classifier's mean top-class probability on them beside its value
  on real test digits (how recognisable the digits are when no class was asked for).
* Clean backgrounds: the share of samples with a border pixel brighter than 2 grey levels (MNIST digits have black
  borders).

The floor is drawn several times (disjoint sets of training images where N allows), so every table shows its spread:
at small N the floor itself varies by tens of percent, and an FD inside that range is as good as real data.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_FILE = Path(__file__).resolve().parent.parent / "assets" / "classifier.safetensors"


class Classifier(nn.Module):
    """A small CNN (about 99% on MNIST test). features() is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _prep(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_u8)).float().div(255.0).unsqueeze(1)


def train_classifier(data_dir, out: str | os.PathLike, epochs: int = 3, seed: int = 0, progress: bool = True) -> float:
    """Train on MNIST train (random +-2 px shifts), save as safetensors; returns the test accuracy."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..model.io import atomic_write
    from ..train.data import load_mnist

    x, y = load_mnist(data_dir, "train")
    xt, yt = load_mnist(data_dir, "test")
    torch.manual_seed(seed)
    model, g = Classifier(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, Y = _prep(x), torch.from_numpy(y)
    steps = epochs * (len(X) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, disable=not progress, desc="classifier", unit="step")
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for k in range(len(X) // 128):
            idx = perm[k * 128:(k + 1) * 128]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(X[idx], shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    acc = float((predict(model, xt) == yt).mean())
    atomic_write(out, lambda tmp: save_file(model.state_dict(), tmp, metadata={"test_accuracy": f"{acc:.5f}"}))
    return acc


def load_classifier(path: str | os.PathLike = CLASSIFIER_FILE) -> Classifier:
    """The classifier of a safetensors file (`train_classifier`); CheckpointError when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..files import readable_name
    from ..model.io import CheckpointError

    model = Classifier()
    try:
        with readable_name(path) as name:
            model.load_state_dict(load_file(name))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not the weights of ddpm's MNIST classifier ({str(e).splitlines()[0]}); "
                              f"use --train-classifier to make them") from None
    for name, p in model.state_dict().items():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{path}: the classifier's {name} is not finite; use --train-classifier")
    return model.eval()


@torch.no_grad()
def features_and_probs(model: Classifier, images_u8: np.ndarray, batch: int = 1000):
    """(features (N,128) float64, class probabilities (N,10) float64) of uint8 images (N,28,28)."""
    feats, probs = [], []
    for i in range(0, len(images_u8), batch):
        f = model.features(_prep(images_u8[i:i + batch]))
        feats.append(f.double().numpy())
        probs.append(torch.softmax(model.fc2(f).double(), 1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def features_and_predictions(model: Classifier, images_u8: np.ndarray, batch: int = 1000):
    """(features (N,128) float64, predicted classes (N,) int64) of uint8 images (N,28,28)."""
    feats, probs = features_and_probs(model, images_u8, batch)
    return feats, probs.argmax(1)


def predict(model: Classifier, images_u8: np.ndarray) -> np.ndarray:
    return features_and_predictions(model, images_u8)[1]


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
        """Quality figures of uint8 images (N,28,28) drawn for labels (N,) (-1: unconditional). Raises ValueError."""
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
        if len(images) < 2:
            raise ValueError(f"{name}: need at least 2 images for a Frechet distance")
        feats, probs = features_and_probs(self.classifier, images)
        preds = probs.argmax(1)
        fd, floors = frechet_distance(feats, self.test_features), self.floors(len(images))
        floor = float(np.mean(floors))
        cond = labels >= 0
        res = {"name": name, "n": int(len(images)), "fd": fd, "fd_floor": floor, "fd_ratio": fd / floor,
               "floor_min": min(floors), "floor_max": max(floors), "floor_draws": len(floors),
               "within_floor_spread": bool(fd <= max(floors)),
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
        ratio = f"{r['fd_ratio']:.2f}" + ("*" if r["within_floor_spread"] else "")
        lines.append(f"{r['name'][:28]:<28} {r['n']:>6} {r['fd']:>9.3f} {floor:>22} {ratio:>9} {acc:>9} "
                     f"{100 * r['border_share']:>6.1f}%  {unc}")
    if any(r["within_floor_spread"] for r in rows):
        lines.append("* FD inside the spread of the real-data floor: at this N the samples cannot be told from real "
                     "digits by this measure (a ratio below 1 is noise, not better than real data)")
    if rows:
        lines.append(f"floor: FD of N real training images to the test set, mean of {rows[0]['floor_draws']} draws "
                     f"(min-max); border: share of samples with a pixel > 2 grey levels in the outer frame (real test "
                     f"digits: {100 * rows[0]['real_border_share']:.1f}%)")
    return "\n".join(lines)
