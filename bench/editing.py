"""How well the editing modes work, measured on real MNIST test digits with the eval classifier (ddpm.evaluation).

    python -m ddpm.bench.editing --data ../shared/data/mnist -n 200 --json edits.json
    python -m ddpm.bench.editing --data DIR -n 200 --only restore --sigmas 0.5 --label-source none,read
    python -m ddpm.bench.editing --data DIR -n 1000 --only upscale --factors 4 --methods ilvr:1 --precisions fp32,int8

* class edits (SDEdit): digit k of the test set redrawn as class (y_k + 1 + k mod 9) mod 10, never its own; the
  classifier's agreement with that target, and how far the result moved from the input (mean |difference|);
* upscaling (ILVR, DDNM): each test digit box-averaged by f (2 or 4) and rounded, upscaled without a label; the
  consistency |down_f(result) - input| in grey levels, the classifier's accuracy on the results against the true
  labels, the RMS error to the original digit; nearest and bicubic upscaling beside them;
* inpainting (RePaint): the bottom half redrawn without a label; the classifier's accuracy against the true label
  (half a digit is ambiguous: this measures plausibility, not a truth) and whether the kept half is exact;
* restoration: test digits plus Gaussian noise of std sigma, clipped to [0, 255] and rounded as a picture file
  would be; PSNR to the clean digit before and after, and the classifier's accuracy.

--label-source says what the inpainting, upscaling and restoration rows condition on: "none", the unconditional
model; "read", the class the shipped classifier's ONNX copy (runtime.classifier) reads from each input as a user
would give it (the kept part with the rest black, the small picture enlarged by pixel repetition, the noisy
picture), whatever its probability, with the editing defaults' guidance. Such a row adds read_accuracy (how often
that read is the true label) and, with both sources, a table of the accuracy when inputs read with a top
probability below p fall back to the unconditional model (per_image keeps each digit's figures for it).

--precisions fp32,int8 runs every row at each precision of the network (int8: `ddpm export --int8` first), same
seed, and gives each row its border haze (the share of digits with a pixel brighter than 2 grey levels in the outer
frame) and, for the later precisions, the mean and max grey-level difference from the first one's digits.

Every row records its wall time and seconds per image (batch 64, the engine asked for). Needs PyTorch (the
classifier).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..evaluation.metrics import border_share


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _by_precision(call, run: dict) -> list[tuple[np.ndarray, float, dict]]:
    """One edit call at each precision of run["precisions"] ("fp32", "int8": the network's convolutions, see
    `ddpm export --int8`), same seed: [(outputs (N, H, W) uint8, seconds, row fields)]. The row fields name the
    precision, the share of digits with a pixel brighter than 2 grey levels in the outer frame (border haze,
    evaluation.metrics.border_share) and, after the first precision, the mean and max |difference| in grey levels
    from the first precision's digits."""
    done = []
    for precision in run["precisions"]:
        out, sec = _timed(lambda: call(engine=run["engine"], batch=run["batch"], int8=precision == "int8"))
        fields = {"precision": precision, "border": border_share(out)}
        if done:
            diff = np.abs(out.astype(np.int64) - done[0][0])
            fields.update({f"diff_mean_vs_{run['precisions'][0]}": float(diff.mean()),
                           f"diff_max_vs_{run['precisions'][0]}": int(diff.max())})
        done.append((out, sec, fields))
    return done


def _conditioning(source: str, seen: np.ndarray, y: np.ndarray):
    """(the edit method's keywords, the row's extra fields) for a label source: "none", the unconditional model (no
    label; upscale, which reads a label by default, is also given uncond=True); "read", the class the ONNX
    classifier reads from `seen` (the inputs as given, (N, 28, 28) uint8)."""
    if source == "none":
        return {}, {"label_source": "none"}
    if source != "read":
        raise SystemExit(f"unknown label source {source!r}: none or read")
    from ..runtime.classifier import read_labels

    r = read_labels(seen, threshold=0.0)
    return {"label": r.classes}, {"label_source": "read", "read_accuracy": float((r.classes == y).mean()),
                                  "per_image": {"read_class": r.classes.tolist(),
                                                "read_prob": [round(float(p), 5) for p in r.probs]}}


def _scored(row: dict, correct: np.ndarray) -> dict:
    """The row with each digit's correctness kept beside the read (per_image), for threshold_table."""
    if "per_image" in row:
        row["per_image"]["correct"] = correct.astype(int).tolist()
    else:
        row["per_image"] = {"correct": correct.astype(int).tolist()}
    return row


def threshold_table(rows: list[dict], thresholds=(0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)) -> list[dict]:
    """For each measurement with both label sources: the accuracy of conditioning on the read label where its top
    probability is at least p and running the unconditional model below (p = 1.01: always unconditional), with the
    share of digits read confidently; and, per probability bin, the accuracy of either arm on those digits."""
    key = lambda r: tuple((k, r[k]) for k in ("mode", "factor", "method", "sigma", "jump", "resample", "precision")
                                if k in r)
    pairs = {}
    for r in rows:
        if "label_source" in r:
            pairs.setdefault(key(r), {})[r["label_source"]] = r
    out = []
    for k, arms in pairs.items():
        if set(arms) != {"none", "read"}:
            continue
        read = np.asarray(arms["read"]["per_image"]["correct"], bool)
        none = np.asarray(arms["none"]["per_image"]["correct"], bool)
        p = np.asarray(arms["read"]["per_image"]["read_prob"])
        for t in thresholds:
            use = p >= t
            out.append({**dict(k), "threshold": t, "share_read": float(use.mean()),
                        "accuracy": float(np.where(use, read, none).mean())})
        for lo, hi in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01)):
            b = (p >= lo) & (p < hi)
            out.append({**dict(k), "bin": [lo, hi], "n": int(b.sum()),
                        "accuracy_read": float(read[b].mean()) if b.any() else None,
                        "accuracy_none": float(none[b].mean()) if b.any() else None})
    return out


def class_edits(model, clf, x, y, strengths, guidances, run, seed=0) -> list[dict]:
    from ..evaluation import predict

    n = len(x)
    targets = (y.astype(np.int64) + 1 + np.arange(n) % 9) % 10
    rows = []
    for w in guidances:
        for s in strengths:
            for out, sec, fields in _by_precision(
                    lambda **r: model.edit(x, label=targets, strength=s, guidance=w, seed=seed, **r), run):
                rows.append({"mode": "edit", "strength": s, "guidance": w, "n": n, **fields,
                             "accuracy": float((predict(clf, out) == targets).mean()),
                             "moved": float(np.abs(out.astype(np.int64) - x).mean()),
                             "seconds": sec, "s_per_image": sec / n})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def upscaling(model, clf, x, y, factors, methods, run, seed=0, sources=("none",), start=0) -> list[dict]:
    from PIL import Image

    from ..runtime.edits import downsample, upsample
    from ..evaluation import predict

    rows = []
    for f in factors:
        small = np.clip(np.rint(downsample(x, f)), 0, 255).astype(np.uint8)
        outs = [("nearest", upsample(small, f), 0.0, {}),
                ("bicubic", np.stack([np.asarray(Image.fromarray(s).resize(x.shape[:0:-1], Image.Resampling.BICUBIC))
                                      for s in small]), 0.0, {})]
        for method, eta in methods:
            for source in sources:
                kw, extra = _conditioning(source, upsample(small, f), y)
                name = f"{method} eta{eta:g}" + (f" {source}" if len(sources) > 1 else "")
                outs += [(name, out, sec, {**extra, **fields}) for out, sec, fields in _by_precision(
                    lambda **r: model.upscale(small, f, method=method, eta=eta, seed=seed, start=start,
                                            uncond=source == "none", **kw, **r),
                    run)]
        for name, out, sec, extra in outs:
            err = np.abs(downsample(out, f) - small)
            correct = predict(clf, out) == y
            rows.append(_scored({"mode": "upscale", "factor": f, "method": name.removesuffix(" none").removesuffix(
                                 " read"), "n": len(x), **extra,
                                 "consistency_mean": float(err.mean()), "consistency_max": float(err.max()),
                                 "consistency_within_1": float((err <= 1.0).mean()),
                                 "accuracy": float(correct.mean()),
                                 "rmse": float(np.sqrt(np.mean((out.astype(np.float64) - x) ** 2))),
                                 "seconds": sec, "s_per_image": sec / len(x)}, correct))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_image"}), flush=True)
    return rows


def inpainting(model, clf, x, y, configs, run, seed=0, sources=("none",), start=0) -> list[dict]:
    from ..runtime.edits import half_mask
    from ..evaluation import predict

    keep = half_mask("bottom", model.image_shape[1])
    rows = []
    for c in configs:
        for source in sources:
            kw, extra = _conditioning(source, np.where(keep, x, 0).astype(np.uint8), y)
            for out, sec, fields in _by_precision(
                    lambda **r: model.inpaint(x, "bottom", seed=seed, start=start, **c, **kw, **r), run):
                correct = predict(clf, out) == y
                rows.append(_scored({"mode": "inpaint", **c, "n": len(x), **extra, **fields,
                                     "accuracy": float(correct.mean()),
                                     "kept_exact": bool(np.array_equal(out[:, keep], x[:, keep])),
                                     "seconds": sec, "s_per_image": sec / len(x)}, correct))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_image"}), flush=True)
    return rows


def restoration(model, clf, x, y, sigmas, run, seed=0, sources=("none",)) -> list[dict]:
    from ..evaluation import predict

    rows = []
    rng = np.random.default_rng(seed)
    for sigma in sigmas:
        noisy = np.clip(np.rint(x + rng.standard_normal(x.shape) * sigma * 127.5), 0, 255).astype(np.uint8)
        for source in sources:
            kw, extra = _conditioning(source, noisy, y)
            for out, sec, fields in _by_precision(
                    lambda **r: model.restore(noisy, sigma, seed=seed, **kw, **r), run):
                correct = predict(clf, out) == y
                rows.append(_scored({"mode": "restore", "sigma": sigma, "n": len(x), **extra, **fields,
                                     "psnr_noisy": _psnr(noisy, x), "psnr_restored": _psnr(out, x),
                                     "accuracy_noisy": float((predict(clf, noisy) == y).mean()),
                                     "accuracy": float(correct.mean()), "seconds": sec, "s_per_image": sec / len(x)},
                                    correct))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_image"}), flush=True)
    return rows


def main(argv=None) -> None:
    import ddpm

    from ..train.data import load_mnist
    from ..evaluation import load_classifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MNIST folder (the test set is used)")
    p.add_argument("-n", type=int, default=200, help="test digits per measurement")
    p.add_argument("--first", type=int, default=0,
                   help="the first test digit (upscale and inpaint: digit k is sample k of the seed, so that runs over "
                        "consecutive ranges add up to one run over their union)")
    p.add_argument("--ckpt", default=None, help="checkpoint [default: the shipped model]")
    p.add_argument("--engine", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated: fp32, int8 (ddpm export --int8); each row is run at each, same seed, the "
                        "later ones with their grey-level difference from the first")
    p.add_argument("--only", default="edit,upscale,inpaint,restore", help="comma-separated modes to measure")
    p.add_argument("--strengths", default="0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--guidances", default="0.3,1,3")
    p.add_argument("--inpaint-configs", default="resample=1;jump=1,resample=3;jump=10,resample=10;"
                                                 "eta=0,resample=1;eta=0,jump=1,resample=3",
                   help="RePaint settings to measure, ';'-separated, each a ','-separated list of key=value "
                        "(steps, eta, jump, resample), e.g. 'steps=250,jump=10,resample=10' for the paper's")
    p.add_argument("--label-source", default="none",
                   help="what inpaint, upscale and restore condition on, comma-separated: none (the unconditional "
                        "model), read (the class the classifier reads from the input)")
    p.add_argument("--factors", default="2,4", help="upscaling factors")
    p.add_argument("--methods", default="ilvr:1,ilvr:0,ddnm:1,ddnm:0", help="upscalers as method:eta")
    p.add_argument("--sigmas", default="0.2,0.5,1.0", help="restoration noise levels")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    model, clf = ddpm.load(a.ckpt), load_classifier()
    x, y = load_mnist(a.data, "test")
    x, y = x[a.first: a.first + a.n], y[a.first: a.first + a.n]
    only = set(a.only.split(","))
    floats = lambda s: [float(v) for v in s.split(",")]
    sources = a.label_source.split(",")
    precisions = a.precisions.split(",")
    if not set(precisions) <= {"fp32", "int8"}:
        raise SystemExit(f"unknown precision in {a.precisions!r}: fp32 or int8")
    run = {"engine": a.engine, "batch": a.batch, "precisions": precisions}
    rows = []
    if "edit" in only:
        rows += class_edits(model, clf, x, y, floats(a.strengths), floats(a.guidances), run)
    if "upscale" in only:
        methods = [(m, float(e)) for m, e in (v.split(":") for v in a.methods.split(","))]
        rows += upscaling(model, clf, x, y, [int(f) for f in a.factors.split(",")], methods, run,
                          sources=sources, start=a.first)
    if "inpaint" in only:
        value = lambda k, v: float(v) if k == "eta" else int(v)
        configs = [{k: value(k, v) for k, v in (kv.split("=") for kv in c.split(","))}
                   for c in a.inpaint_configs.split(";") if c]
        rows += inpainting(model, clf, x, y, configs, run, sources=sources, start=a.first)
    if "restore" in only:
        rows += restoration(model, clf, x, y, floats(a.sigmas), run, sources=sources)
    for t in threshold_table(rows):
        print(json.dumps(t), flush=True)
    if a.json:
        from ..files import write_text

        write_text(a.json, json.dumps({"rows": rows, "thresholds": threshold_table(rows)}) + "\n")


if __name__ == "__main__":
    main()
