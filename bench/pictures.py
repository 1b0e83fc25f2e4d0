"""Every picture in the README, made from the shipped model with one command:

    python -m ddpm.bench.pictures --data DIR --out docs/img [--bench-json bench-out/bench.json]

classes.png (a 10x10 grid, class k in column k) and trajectory.png with the default sampler (UniPC-8), inpaint.png,
edits.png, upscale.png, restore.png with the edits' (DDIM-50), and bench.png (from the JSON of a `ddpm bench` run, or
a small run made here: torch, runtime-torch and onnx at batch 1 and 8, DDIM-50, guidance 1, 3 runs each, one thread
per engine so that a machine shared with other jobs distorts it less). The inputs of the edits are
MNIST test digits (fixed indices); every sample comes from seed 0 of the noise stream, so the pictures are the
same on every run and engine up to a grey level. README "Editing" says what each picture shows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

TEST_DIGITS = (0, 1, 2, 3)   # MNIST test digits 7, 2, 1, 0
EDIT_DIGITS = (0, 1, 3)      # 7, 2, 0


def _save(images: np.ndarray, path: Path, nrow: int) -> None:
    from ..runtime.images import save_grid

    save_grid(np.asarray(images, dtype=np.uint8), path, nrow=nrow)


def classes(model, out: Path, engine: str) -> None:
    """100 digits, the default sampler (UniPC-8) and guidance, labels 0..9 in turn: class k in column k."""
    _save(model.generate(100, engine=engine), out / "classes.png", nrow=10)


def inpaint(model, x, out: Path, engine: str, n: int = 6) -> None:
    """Per row: the input, the mask (white: kept), the input with the redrawn part grey, n completions (RePaint
    j=1 r=3 over DDIM-50 eta 1, unconditional); the rows redraw the bottom, top, left and right halves."""
    from ..runtime.edits import HALVES, half_mask

    tiles = []
    for img, half in zip(x, HALVES[1::-1] + HALVES[2:]):
        keep = half_mask(half, model.image_shape[1])
        tiles += [img, keep.astype(np.uint8) * 255, np.where(keep, img, 64)]
        tiles += list(model.inpaint(img, half, n=n, engine=engine))
    _save(np.stack(tiles), out / "inpaint.png", nrow=n + 3)


def edits(model, x, out: Path, engine: str, strength: float = 0.6) -> None:
    """Per row: the input, then SDEdit at strength 0.6 to classes 0..9 (one sample each, default guidance)."""
    tiles = []
    for img in x:
        tiles += [img, *model.edit(np.repeat(img[None], 10, axis=0), label=np.arange(10), strength=strength,
                                   engine=engine)]
    _save(np.stack(tiles), out / "edits.png", nrow=11)


def upscale(model, x, out: Path, engine: str, n: int = 3) -> None:
    """Per row: the original digit; its 14x14 box average (shown enlarged), n ILVR x2 results; its 7x7 box
    average, n ILVR x4 results (unconditional, DDIM-50 eta 1)."""
    from ..runtime.edits import downsample, upsample

    tiles = []
    for img in x:
        tiles.append(img)
        for f in (2, 4):
            small = np.clip(np.rint(downsample(img[None], f)[0]), 0, 255).astype(np.uint8)
            tiles += [upsample(small, f), *model.upscale(small, f, n=n, engine=engine)]
    _save(np.stack(tiles), out / "upscale.png", nrow=1 + 2 * (n + 1))


def restore(model, x, out: Path, engine: str, sigma: float = 0.5, n: int = 3) -> None:
    """Per row: the clean digit, with Gaussian noise of std 0.5 (64 grey levels; clipped and rounded like a
    picture file), n restorations (unconditional)."""
    rng = np.random.default_rng(0)
    tiles = []
    for img in x:
        noisy = np.clip(np.rint(img + rng.standard_normal(img.shape) * sigma * 127.5), 0, 255).astype(np.uint8)
        tiles += [img, noisy, *model.restore(noisy, sigma, n=n, engine=engine)]
    _save(np.stack(tiles), out / "restore.png", nrow=n + 2)


def trajectory(model, out: Path, engine: str) -> None:
    """4 samples (labels 0..3), the default sampler (UniPC-8): x_t and the predicted x0 after each of its rows. (A
    gif, `ddpm gen --trajectory x.gif`, is 150-350 kB here: the noisy frames do not compress; the README keeps to
    small PNGs.)"""
    from ..runtime.generate import generate
    from ..runtime.images import Trajectory

    traj = Trajectory(4)
    eng = model.engine(engine)
    generate(eng, 4, model.plan(), np.arange(4), 0.3, seed=0, progress=False, image_shape=model.image_shape,
             watch=traj)
    traj.save(out / "trajectory.png")


def bench_plot(model, out: Path, bench_json: str | None) -> None:
    import json

    from ..files import atomic_write, write_text
    from .speed import plot, run_bench

    if bench_json:
        res = json.loads(Path(bench_json).read_text())
    else:
        import torch

        torch.set_num_threads(1)
        res = run_bench(model, ["torch", "runtime-torch", "onnx"], [1, 8], model.plan("ddim", 50), 1.0, 3, threads=1,
                        log=lambda *_: None)
        write_text(out / "bench.json", json.dumps(res, indent=1) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the benchmark plot needs matplotlib: pip install 'ddpm[plot]'") from None
    atomic_write(out / "bench.png", lambda tmp: plot(res, Path(tmp)))


def main(argv=None) -> None:
    import ddpm

    from ..train.data import ensure_mnist, load_mnist, resolve_data_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="MNIST folder (else $DDPM_DATA or the cache; downloaded if missing)")
    p.add_argument("--out", default="docs/img", help="folder for the pictures")
    p.add_argument("--engine", default="auto")
    p.add_argument("--bench-json", default=None, help="bench.json of a `ddpm bench` run to plot instead of timing")
    p.add_argument("--only", default="classes,inpaint,edits,upscale,restore,trajectory,bench")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ddpm.load()
    x, _ = load_mnist(ensure_mnist(resolve_data_dir(a.data)), "test")
    jobs = {"classes": lambda: classes(model, out, a.engine),
            "inpaint": lambda: inpaint(model, x[list(TEST_DIGITS)], out, a.engine),
            "edits": lambda: edits(model, x[list(EDIT_DIGITS)], out, a.engine),
            "upscale": lambda: upscale(model, x[list(TEST_DIGITS)], out, a.engine),
            "restore": lambda: restore(model, x[list(TEST_DIGITS)], out, a.engine),
            "trajectory": lambda: trajectory(model, out, a.engine),
            "bench": lambda: bench_plot(model, out, a.bench_json)}
    for name in a.only.split(","):
        t0 = time.perf_counter()
        jobs[name]()
        print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
    for f in sorted(out.iterdir()):
        print(f"{f} {f.stat().st_size / 1024:.1f} kB")


if __name__ == "__main__":
    main()
