"""The shipped MNIST classifier (evaluation/classifier.py) as ONNX, run by onnxruntime (no PyTorch): what the editing
commands read a picture's class with when no label is given (`read_labels`).

assets/classifier.onnx is made from assets/classifier.safetensors by `python -m ddpm.evaluation.export_classifier`
(which checks it against the PyTorch classifier on real digits); its sha256 is recorded here and checked on loading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DdpmError

CLASSIFIER_ONNX = Path(__file__).resolve().parent.parent / "assets" / "classifier.onnx"
CLASSIFIER_ONNX_SHA256 = "d20757f9f9ac0d9a209835f183a663b6b86d87b8c182a0452c3150f14af9be48"
INPUT, OUTPUT = "images", "logits"   # (N, 1, 28, 28) float32 in [0, 1] -> (N, 10) float32
IMAGE_SHAPE = (28, 28)
# The least top-class probability at which an editing command conditions on the class the classifier reads from
# its input; below it the input is ambiguous and the unconditional model runs. Measured on 200 MNIST test digits
# upscaled x4 (bench/results/2026-12-06-editing-label.md): the read label did better than the unconditional model in
# every probability bin from 0.3 up (p in [0.3, 0.5): 25 of 32 right against 18), worse only below (2 of 5 against 3).
MIN_PROB = 0.3


class ClassifierError(DdpmError):
    """The shipped ONNX classifier is missing or damaged (reinstall the package), or a picture it cannot read."""


@dataclass(frozen=True)
class Reading:
    """The classifier's read of m pictures: classes (m,) int64, the top class; probs (m,) float64, its probability
    (softmax of the logits); labels (m,) int64, the class where probs >= the threshold, else -1 (ambiguous: the
    unconditional model); threshold: that least probability."""

    classes: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    threshold: float

    def describe(self) -> str:
        """One line saying which label an edit of these pictures conditions on, e.g. "label 3 read from the input by
        the classifier (p=0.97)"."""
        if len(self.labels) == 1:
            k, p = int(self.classes[0]), float(self.probs[0])
            if self.labels[0] >= 0:
                return f"label {k} read from the input by the classifier (p={p:.2f})"
            return (f"the input is ambiguous (the classifier reads {k} with p={p:.2f} < {self.threshold:g}): using the "
                    f"unconditional model")
        read = int((self.labels >= 0).sum())
        return (f"labels read from the {len(self.labels)} inputs by the classifier; {len(self.labels) - read} "
                f"ambiguous (p < {self.threshold:g}) use the unconditional model")


class OnnxClassifier:
    """The classifier's ONNX file in one onnxruntime session (CPU), made once per process (`shared`); threads may
    call it at once. Raises ClassifierError for a missing or damaged file, EngineUnavailable without onnxruntime."""

    def __init__(self, path: str | Path = CLASSIFIER_ONNX, sha256: str | None = CLASSIFIER_ONNX_SHA256,
                 threads: int | None = 1):
        from .bundle import file_sha256
        from .nets import import_onnxruntime, ort_cpu_options, ort_session

        path = Path(path)
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise ClassifierError(f"the classifier {path} cannot be read ({e.strerror or e}); reinstall the "
                                  f"package") from None
        if sha256 is not None and digest != sha256:
            raise ClassifierError(f"the classifier {path} is damaged (its sha256 differs from the recorded one); "
                                  f"reinstall the package")
        ort = import_onnxruntime("reading a picture's label")
        self.session = ort_session(ort, path, ort_cpu_options(ort, threads), ["CPUExecutionProvider"])

    def logits(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, 10) float32 logits of (N, 28, 28) uint8 pictures (0 black .. 255 white), as the PyTorch classifier's
        forward of images / 255."""
        x = np.asarray(images_u8)
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise ClassifierError(f"the classifier reads (N, 28, 28) pictures, got shape {x.shape}")
        x = (x.astype(np.float32) / np.float32(255.0))[:, None]
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})[0]

    def probs(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, 10) float64 class probabilities (softmax of `logits`)."""
        z = self.logits(images_u8).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    _shared: "OnnxClassifier | None" = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls) -> "OnnxClassifier":
        """The shipped classifier, loaded on first use and kept for the process."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared


def read_labels(images_u8: np.ndarray, threshold: float = MIN_PROB, classifier: OnnxClassifier | None = None
                ) -> Reading:
    """The classes the shipped classifier reads from (m, 28, 28) uint8 pictures (a Reading): the top class where its
    probability is at least `threshold`, else -1. classifier: default the shipped one (OnnxClassifier.shared)."""
    p = (classifier or OnnxClassifier.shared()).probs(images_u8)
    classes, top = p.argmax(axis=1).astype(np.int64), p.max(axis=1)
    return Reading(classes, top, np.where(top >= threshold, classes, -1).astype(np.int64), float(threshold))
