"""The MNIST classifier that `ddpm eval` measures samples with (MNIST has no Inception network): a small CNN, its
training, its weights file (assets/classifier.safetensors) and its features and predictions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_FILE = Path(__file__).resolve().parent.parent / "assets" / "classifier.safetensors"
IMAGE_SHAPE = (28, 28)   # the classifier reads greyscale MNIST digits, (H, W) uint8
NUM_CLASSES = 10
FEATURES = 128           # the width of the penultimate layer, whose activations the Frechet distance compares
# The memory one evaluated sample takes: the uint8 image and the classifier's float64 features.
SAMPLE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] + FEATURES * 8


class Classifier(nn.Module):
    """A small CNN (about 99% on MNIST test). features() is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (IMAGE_SHAPE[0] // 4) * (IMAGE_SHAPE[1] // 4), FEATURES)
        self.fc2 = nn.Linear(FEATURES, NUM_CLASSES)

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
    from tqdm import tqdm

    from ..model.io import atomic_write, safetensors_bytes
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
    data = safetensors_bytes(model.state_dict(), {"test_accuracy": f"{acc:.5f}"})
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
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
    """The predicted classes (N,) int64 of uint8 images (N,28,28)."""
    return features_and_predictions(model, images_u8)[1]
