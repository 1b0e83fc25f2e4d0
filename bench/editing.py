"""How well the editing modes work, measured on real MNIST test digits with the eval classifier (ddpm.evaluation).

    python -m ddpm.bench.editing --data ../shared/data/mnist -n 200 --json edits.json

* class edits (SDEdit): digit k of the test set redrawn as class (y_k + 1 + k mod 9) mod 10, never its own; the
  classifier's agreement with that target, and how far the result moved from the input (mean |difference|);
* upscaling (ILVR, DDNM): each test digit box-averaged by f (2 or 4) and rounded, upscaled without a label; the
  consistency |down_f(result) - input| in grey levels, the classifier's accuracy on the results against the true
  labels, the RMS error to the original digit; nearest and bicubic upscaling beside them;
* inpainting (RePaint): the bottom half redrawn without a label; the classifier's accuracy against the true label
  (half a digit is ambiguous: this measures plausibility, not a truth) and whether the kept half is exact;
* restoration: test digits plus Gaussian noise of std sigma, clipped to [0, 255] and rounded as a picture file
  would be; PSNR to the clean digit before and after, and the classifier's accuracy.

Every row records its wall time and seconds per image (batch 64, the engine asked for). Needs PyTorch (the
classifier).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def class_edits(model, clf, x, y, strengths, guidances, engine, batch, seed=0) -> list[dict]:
    from ..evaluation import predict

    n = len(x)
    targets = (y.astype(np.int64) + 1 + np.arange(n) % 9) % 10
    rows = []
    for w in guidances:
        for s in strengths:
            out, sec = _timed(lambda: model.edit(x, label=targets, strength=s, guidance=w, engine=engine,
                                                 batch=batch, seed=seed))
            rows.append({"mode": "edit", "strength": s, "guidance": w, "n": n,
                         "accuracy": float((predict(clf, out) == targets).mean()),
                         "moved": float(np.abs(out.astype(np.int64) - x).mean()),
                         "seconds": sec, "s_per_image": sec / n})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def upscaling(model, clf, x, y, factors, methods, engine, batch, seed=0) -> list[dict]:
    from PIL import Image

    from ..runtime.edits import downsample, upsample
    from ..evaluation import predict

    rows = []
    for f in factors:
        small = np.clip(np.rint(downsample(x, f)), 0, 255).astype(np.uint8)
        outs = {"nearest": (upsample(small, f), 0.0),
                "bicubic": (np.stack([np.asarray(Image.fromarray(s).resize(x.shape[:0:-1], Image.Resampling.BICUBIC))
                                      for s in small]), 0.0)}
        for method, eta in methods:
            outs[f"{method} eta{eta:g}"] = _timed(lambda: model.upscale(small, f, method=method, eta=eta,
                                                                        engine=engine, batch=batch, seed=seed))
        for name, (out, sec) in outs.items():
            err = np.abs(downsample(out, f) - small)
            rows.append({"mode": "upscale", "factor": f, "method": name, "n": len(x),
                         "consistency_mean": float(err.mean()), "consistency_max": float(err.max()),
                         "consistency_within_1": float((err <= 1.0).mean()),
                         "accuracy": float((predict(clf, out) == y).mean()),
                         "rmse": float(np.sqrt(np.mean((out.astype(np.float64) - x) ** 2))),
                         "seconds": sec, "s_per_image": sec / len(x)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def inpainting(model, clf, x, y, configs, engine, batch, seed=0) -> list[dict]:
    from ..runtime.edits import half_mask
    from ..evaluation import predict

    keep = half_mask("bottom", model.image_shape[1])
    rows = []
    for c in configs:
        out, sec = _timed(lambda: model.inpaint(x, "bottom", engine=engine, batch=batch, seed=seed, **c))
        rows.append({"mode": "inpaint", **c, "n": len(x), "accuracy": float((predict(clf, out) == y).mean()),
                     "kept_exact": bool(np.array_equal(out[:, keep], x[:, keep])),
                     "seconds": sec, "s_per_image": sec / len(x)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def restoration(model, clf, x, y, sigmas, engine, batch, seed=0) -> list[dict]:
    from ..evaluation import predict

    rows = []
    rng = np.random.default_rng(seed)
    for sigma in sigmas:
        noisy = np.clip(np.rint(x + rng.standard_normal(x.shape) * sigma * 127.5), 0, 255).astype(np.uint8)
        out, sec = _timed(lambda: model.restore(noisy, sigma, engine=engine, batch=batch, seed=seed))
        rows.append({"mode": "restore", "sigma": sigma, "n": len(x), "psnr_noisy": _psnr(noisy, x),
                     "psnr_restored": _psnr(out, x), "accuracy_noisy": float((predict(clf, noisy) == y).mean()),
                     "accuracy_restored": float((predict(clf, out) == y).mean()),
                     "seconds": sec, "s_per_image": sec / len(x)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    import ddpm

    from ..train.data import load_mnist
    from ..evaluation import load_classifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MNIST folder (the test set is used)")
    p.add_argument("-n", type=int, default=200, help="test digits per measurement")
    p.add_argument("--ckpt", default=None, help="checkpoint [default: the shipped model]")
    p.add_argument("--engine", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only", default="edit,upscale,inpaint,restore", help="comma-separated modes to measure")
    p.add_argument("--strengths", default="0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--guidances", default="0.3,1,3")
    p.add_argument("--inpaint-configs", default="resample=1;jump=1,resample=3;jump=10,resample=10;"
                                                 "eta=0,resample=1;eta=0,jump=1,resample=3",
                   help="RePaint settings to measure, ';'-separated, each a ','-separated list of key=value "
                        "(steps, eta, jump, resample), e.g. 'steps=250,jump=10,resample=10' for the paper's")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    model, clf = ddpm.load(a.ckpt), load_classifier()
    x, y = load_mnist(a.data, "test")
    x, y = x[: a.n], y[: a.n]
    only = set(a.only.split(","))
    floats = lambda s: [float(v) for v in s.split(",")]
    rows = []
    if "edit" in only:
        rows += class_edits(model, clf, x, y, floats(a.strengths), floats(a.guidances), a.engine, a.batch)
    if "upscale" in only:
        rows += upscaling(model, clf, x, y, (2, 4), [("ilvr", 1.0), ("ilvr", 0.0), ("ddnm", 1.0), ("ddnm", 0.0)],
                          a.engine, a.batch)
    if "inpaint" in only:
        value = lambda k, v: float(v) if k == "eta" else int(v)
        configs = [{k: value(k, v) for k, v in (kv.split("=") for kv in c.split(","))}
                   for c in a.inpaint_configs.split(";") if c]
        rows += inpainting(model, clf, x, y, configs, a.engine, a.batch)
    if "restore" in only:
        rows += restoration(model, clf, x, y, (0.2, 0.5, 1.0), a.engine, a.batch)
    if a.json:
        from ..files import write_text

        write_text(a.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
