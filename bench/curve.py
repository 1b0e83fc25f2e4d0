"""The training curve of a run, drawn from `ddpm eval --json` files of its checkpoints:

    python -m ddpm.bench.curve --point 0=DIR0 --point 1500=DIR1 ... --out docs/img/training-curve.png

Each point is a step and a folder holding `eval-cond.json` (`ddpm eval --json`, conditional samples) and
`eval-uncond.json` (the same with `--uncond`), both one row each. The picture has three panels against the training
step: the conditional and unconditional FD/floor (Frechet distance in the eval classifier's features over the
real-data floor at the same N; 1 is real data), the conditional accuracy, and the unconditional mean top-class
probability beside the real digits' value, each with the target it is measured against (issue targets: FD/floor 1.25
conditional and 2.0 unconditional, accuracy 99.5%, top-class probability 0.96). Needs matplotlib (`pip install
".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {"fd_cond": 1.25, "fd_uncond": 2.0, "accuracy": 0.995, "top_prob": 0.96}


def read_point(folder: Path) -> dict:
    """The scores of one checkpoint: {"fd_cond", "fd_uncond", "accuracy", "top_prob", "real_top_prob", "n"} from
    folder/eval-cond.json and folder/eval-uncond.json (the first row of each, as `ddpm eval --json` writes them).
    Raises ValueError when a file is missing, is not such a JSON list, or lacks a score."""
    rows = {}
    for kind in ("cond", "uncond"):
        path = folder / f"eval-{kind}.json"
        try:
            rows[kind] = json.loads(path.read_text())[0]
        except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a `ddpm eval --json` file ({e})") from None
    cond, uncond = rows["cond"], rows["uncond"]
    try:
        return {"fd_cond": float(cond["fd_ratio"]), "accuracy": float(cond["cond_accuracy"]),
                "fd_uncond": float(uncond["fd_ratio"]), "top_prob": float(uncond["uncond_top_prob"]),
                "real_top_prob": float(uncond["real_top_prob"]), "n": int(cond["n"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}: a score is missing from its eval files ({e})") from None


def plot(points: dict[int, dict], out: Path) -> None:
    """Draws the curve of `points` ({step: read_point(...)}) into the PNG `out` (written as given: publish it with
    files.atomic_write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = sorted(points)
    col = {k: [points[s][k] for s in steps] for k in ("fd_cond", "fd_uncond", "accuracy", "top_prob")}
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.4))
    a.plot(steps, col["fd_cond"], "o-", label="conditional")
    a.plot(steps, col["fd_uncond"], "s-", label="unconditional")
    a.axhline(TARGETS["fd_cond"], ls=":", c="C0", label="target cond")
    a.axhline(TARGETS["fd_uncond"], ls=":", c="C1", label="target uncond")
    a.axhline(1.0, ls="--", c="grey", lw=0.8, label="real data")
    a.set(title="FD / floor (lower is better)", xlabel="training step", yscale="log")
    a.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))   # 2, not 2x10^0
    a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_yticks([1, TARGETS["fd_cond"], TARGETS["fd_uncond"], 4, 8])
    a.legend(fontsize=7)
    b.plot(steps, [100 * v for v in col["accuracy"]], "o-")
    b.axhline(100 * TARGETS["accuracy"], ls=":", c="C0", label="target")
    b.set(title="conditional accuracy (%)", xlabel="training step")
    b.legend(fontsize=7)
    c.plot(steps, col["top_prob"], "s-", c="C1")
    c.axhline(TARGETS["top_prob"], ls=":", c="C1", label="target")
    c.axhline(points[steps[0]]["real_top_prob"], ls="--", c="grey", lw=0.8, label="real digits")
    c.set(title="unconditional top-class probability", xlabel="training step")
    c.legend(fontsize=7)
    n = sorted({p["n"] for p in points.values()})
    fig.suptitle(f"step 0: the weights the run started from; N = {', '.join(map(str, n))} per point, one seed",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90, format="png")
    plt.close(fig)


def _point(text: str) -> tuple[int, Path]:
    step, sep, folder = text.partition("=")
    if not sep or not step.isdigit():
        raise argparse.ArgumentTypeError(f"expected STEP=FOLDER, got {text!r}")
    return int(step), Path(folder)


def main(argv=None) -> None:
    from ..errors import DdpmError
    from ..files import atomic_write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", type=_point, action="append", required=True, metavar="STEP=FOLDER",
                   help="a checkpoint's step and the folder of its eval-cond.json and eval-uncond.json")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        points = {step: read_point(folder) for step, folder in args.point}
    except ValueError as e:
        p.exit(1, f"Error: {e}\n")
    try:
        atomic_write(args.out, lambda tmp: plot(points, Path(tmp)))
    except DdpmError as e:
        p.exit(1, f"Error: {e}\n")
    print(f"Wrote the curve of {len(points)} points to {args.out}")


if __name__ == "__main__":
    main()
