"""Export the shipped MNIST classifier (assets/classifier.safetensors) to ONNX (assets/classifier.onnx), which the
editing commands run without PyTorch (runtime/classifier.py), verified against the PyTorch classifier on real digits.

    python -m ddpm.evaluation.export_classifier --data DIR [--out assets/classifier.onnx]

The check: the first --n MNIST test digits through both, the largest |logit difference| at most TOLERANCE and the
same argmax on every digit; the file is written only then (atomically) and its sha256 printed, to be recorded as
runtime.classifier.CLASSIFIER_ONNX_SHA256. Needs PyTorch and the onnx package.
"""

from __future__ import annotations

import argparse
import inspect
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DdpmError
from ..runtime.classifier import CLASSIFIER_ONNX, INPUT, OUTPUT, OnnxClassifier
from .classifier import CLASSIFIER_FILE, IMAGE_SHAPE, Classifier, _prep, load_classifier

TOLERANCE = 1e-4   # the largest |logit difference| accepted between ONNX (onnxruntime, fp32) and PyTorch (fp32)


def to_onnx_bytes(model: Classifier, opset: int = 17) -> bytes:
    """The classifier traced to ONNX: images (N, 1, 28, 28) float32 in [0, 1] -> logits (N, 10), N dynamic."""
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, *IMAGE_SHAPE),), buf, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, **kw)
    return buf.getvalue()


@torch.no_grad()
def compare(model: Classifier, onnx_path: Path, images_u8: np.ndarray) -> dict:
    """The ONNX file's logits against PyTorch's on (N, 28, 28) uint8 images: max_abs_logit_diff, argmax_agree
    (the share of images with the same argmax), n."""
    ref = model(_prep(images_u8)).numpy()
    got = OnnxClassifier(onnx_path, sha256=None).logits(images_u8)
    return {"n": len(images_u8), "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "argmax_agree": float((got.argmax(1) == ref.argmax(1)).mean())}


def main(argv=None) -> None:
    import tempfile

    from ..files import atomic_write
    from ..runtime.bundle import file_sha256
    from ..train.data import load_mnist

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MNIST folder (its test digits verify the export)")
    p.add_argument("--out", default=str(CLASSIFIER_ONNX), help="the ONNX file to write")
    p.add_argument("--weights", default=str(CLASSIFIER_FILE), help="the classifier's safetensors")
    p.add_argument("-n", type=int, default=10000, help="test digits to verify on")
    a = p.parse_args(argv)
    model = load_classifier(a.weights)
    x, _ = load_mnist(a.data, "test")
    data = to_onnx_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classifier.onnx"
        path.write_bytes(data)
        figures = compare(model, path, x[: a.n])
    print(figures)
    if figures["max_abs_logit_diff"] > TOLERANCE or figures["argmax_agree"] < 1.0:
        raise DdpmError(f"the ONNX classifier differs from PyTorch's: {figures}")
    atomic_write(a.out, lambda t: Path(t).write_bytes(data))
    print(f"{a.out}: sha256 {file_sha256(Path(a.out))}")


if __name__ == "__main__":
    main()
