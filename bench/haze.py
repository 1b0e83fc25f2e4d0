"""Where the border haze comes from: frame-pixel statistics of generated digits, per plan and per row of a plan.

    python -m ddpm.bench.haze samples [--n 256] [--engine onnx] [--uncond | -w 0] --arm unipc/8 --arm ddim/50 ...
    python -m ddpm.bench.haze rows    [--n 256] [--engine torch] --arm unipc/8
    python -m ddpm.bench.haze real    [--n 256] --data DIR [--t 0 10 50 124 249]

Border haze is evaluation.metrics.border_share: the share of digits with a pixel brighter than 2 grey levels (of
255) in the outer 1-pixel frame (the MNIST test set: 1.1%). `samples` draws the same seeds with every arm (sampler,
steps, spacing, final_t: an arm is "sampler/steps/spacing/final_t", '-' for the default) and prints one markdown row
per arm: border share, the frame's mean grey level, its pixels' histogram, the same for the ring one pixel further in,
and the mean absolute grey-level difference from the first arm (whole image and the inside of the frame). `rows`
follows one arm row by row through the engine's step callback (x and x0_hat of each row). `real` noises real test
digits to x_t (Ho et al. 2020, eq. 4) and measures the frame of the network's x0_hat (eq. 15) at each t, with the
true labels and with the null label: the model's own error, apart from any sampler.

The engines and the network run on one thread (run it with OMP_NUM_THREADS=1 too) so that a shared machine
distorts it less; the numbers do not depend on it. bench/results/2026-12-06-border-haze.md has its tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LEVEL = 2                                  # border_share's threshold in grey levels
FRAME = np.ones((28, 28), dtype=bool)      # the outer 1-pixel frame (108 pixels)
FRAME[1:-1, 1:-1] = False
RING = np.zeros((28, 28), dtype=bool)      # the ring one pixel further in (100 pixels)
RING[1:-1, 1:-1] = True
RING[2:-2, 2:-2] = False
BINS = ((0, 0), (1, 2), (3, 5), (6, 19), (20, 255))   # grey-level bins of the pixel histograms


def parse_arm(spec: str) -> dict:
    """"sampler/steps/spacing/final_t" ('-' or missing: the default) -> make_plan's keywords."""
    parts = (spec.split("/") + ["-"] * 4)[:4]
    keys = ("sampler", "steps", "spacing", "final_t")
    conv = (str, int, str, int)
    return {k: c(v) for k, c, v in zip(keys, conv, parts) if v != "-"}


def frame_stats(u8: np.ndarray, mask: np.ndarray) -> dict:
    """Share of images with a pixel > LEVEL in `mask`, the mask's mean grey level and its pixels' histogram."""
    v = u8[:, mask].astype(np.int64)
    hist = {f"{lo}-{hi}" if lo != hi else str(lo): float(((v >= lo) & (v <= hi)).mean()) for lo, hi in BINS}
    return {"share": float((v > LEVEL).any(axis=1).mean()), "mean": float(v.mean()), "hist": hist}


def run_arm(model, engine, arm: dict, n: int, seed: int, labels, guidance: float, callback=None):
    """(plan, (n, H, W) uint8, seconds) of one arm on the given engine, the default guidance interval."""
    from ..options import GUIDANCE_INTERVAL
    from ..runtime.generate import generate
    from ..runtime.samplers import make_plan

    plan = make_plan(model.schedule, guidance_interval=GUIDANCE_INTERVAL, **arm)
    t0 = time.perf_counter()
    u8 = generate(engine, n, plan, labels, guidance, seed, batch=min(n, 64), progress=False, watch=callback,
                  image_shape=model.image_shape)
    return plan, u8, time.perf_counter() - t0


def cmd_samples(model, args) -> None:
    labels = model.labels(args.n, uncond=args.uncond)
    engine = model.engine(args.engine, threads=1)
    print(f"engine {args.engine}, n {args.n}, seed {args.seed}, "
          f"{'unconditional' if args.uncond else f'conditional, w = {args.guidance:g}'}\n")
    head = ("| arm | plan | calls | border | frame mean (grey) | frame pixels 0 / 1-2 / 3-5 / 6-19 / >=20 | "
            "ring border | ring mean | mean abs diff vs first (all / inside) | s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    first = None
    for spec in args.arm:
        plan, u8, secs = run_arm(model, engine, parse_arm(spec), args.n, args.seed, labels, args.guidance)
        f, r = frame_stats(u8, FRAME), frame_stats(u8, RING)
        if first is None:
            first = u8.astype(np.float64)
        d = np.abs(u8 - first)
        inside = ~FRAME
        print(f"| {spec} | {plan.name} | {plan.calls} | {f['share']:.1%} | {f['mean']:.3f} | "
              + " / ".join(f"{x:.4f}" for x in f["hist"].values())
              + f" | {r['share']:.1%} | {r['mean']:.3f} | {d.mean():.3f} / {d[:, inside].mean():.3f} | {secs:.0f} |",
              flush=True)
        if args.save:
            np.save(f"{args.save}-{spec.replace('/', '_')}.npy", u8)


def cmd_rows(model, args) -> None:
    from ..runtime.images import to_uint8

    labels = model.labels(args.n, uncond=args.uncond)
    engine = model.engine(args.engine, threads=1)
    rows: list = []
    keep = lambda i, t, x, x0: rows.append((i, t, x, x0))   # noqa: E731
    plan, u8, _ = run_arm(model, engine, parse_arm(args.arm[0]), args.n, args.seed, labels, args.guidance,
                          callback=keep)
    print(f"{plan.name}, engine {args.engine}, n {args.n} (the first batch), seed {args.seed}; output border "
          f"{frame_stats(u8, FRAME)['share']:.1%}\n")
    print("| row | t | noise level | w_x0 | x0_hat frame: border / mean grey / max | x frame: mean / std |")
    print("|---|---|---|---|---|---|")
    for i, t, x, x0 in rows:
        xs = x[:, 0][:, FRAME]
        col = "-"
        if x0 is not None:
            f = frame_stats(to_uint8(x0), FRAME)
            col = f"{f['share']:.1%} / {f['mean']:.3f} / {to_uint8(x0)[:, FRAME].max()}"
        print(f"| {i} | {t} | {plan.noise_level[i]:.3f} | {plan.w_x0[i]:.3f} | {col} | "
              f"{xs.mean():+.4f} / {xs.std():.4f} |")


def cmd_real(model, args) -> None:
    import torch

    from ..evaluation.metrics import border_share
    from ..runtime.images import to_uint8
    from ..train.data import load_mnist

    torch.set_num_threads(1)
    net, sched = model.torch_model, model.schedule
    images, classes = load_mnist(args.data, "test")
    x0 = torch.as_tensor(images[:args.n], dtype=torch.float32)[:, None] / 127.5 - 1
    y = torch.as_tensor(classes[:args.n])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    frame = torch.as_tensor(FRAME)
    print(f"{args.n} MNIST test digits (their own border share {border_share(images[:args.n]):.1%}), noise seed "
          f"{args.seed}\n")
    print("| t | noise level | labels | eps error on the frame: rms / mean | x0_hat - x0 on the frame (grey): "
          "rms / mean | border of x0_hat | x0_hat - x0, whole image (grey): rms |")
    print("|---|---|---|---|---|---|---|")
    for t in args.t:
        ab = float(sched.alphas_cumprod[t])
        xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
        for name, lab in (("true", y), ("null", torch.full_like(y, model.null_label))):
            with torch.no_grad():
                e = net(xt, torch.full((args.n,), t), lab)
            x0_hat = ((xt - (1 - ab) ** 0.5 * e) / ab ** 0.5).clamp(-1, 1)
            err = (e - eps)[:, 0][:, frame]
            dx = (x0_hat - x0)[:, 0][:, frame] * 127.5
            whole = (x0_hat - x0) * 127.5
            print(f"| {t} | {((1 - ab) / ab) ** 0.5:.3f} | {name} | {err.pow(2).mean().sqrt():.4f} / "
                  f"{err.mean():+.4f} | {dx.pow(2).mean().sqrt():.2f} / {dx.mean():+.3f} | "
                  f"{border_share(to_uint8(x0_hat)):.1%} | {whole.pow(2).mean().sqrt():.2f} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("samples", "rows", "real"))
    ap.add_argument("--arm", action="append", default=None,
                    help="sampler/steps/spacing/final_t, '-' for the default (repeat; default: unipc)")
    ap.add_argument("--n", type=int, default=256, help="digits (rows: the first batch of at most 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-w", "--guidance", type=float, default=None, help="default: the model's default guidance")
    ap.add_argument("--uncond", action="store_true", help="the null label (no guidance)")
    ap.add_argument("--engine", default="onnx")
    ap.add_argument("--data", help="the MNIST folder (real)")
    ap.add_argument("--t", type=int, nargs="+", default=[0, 2, 5, 10, 20, 50, 124, 249])
    ap.add_argument("--save", help="samples: save each arm's digits as PREFIX-<arm>.npy")
    ap.add_argument("--ckpt", help="a checkpoint (default: the shipped model)")
    args = ap.parse_args(argv)

    import ddpm
    from ..options import GUIDANCE

    args.arm = args.arm or ["unipc"]
    args.guidance = GUIDANCE if args.guidance is None else args.guidance
    model = ddpm.load(args.ckpt)
    {"samples": cmd_samples, "rows": cmd_rows, "real": cmd_real}[args.what](model, args)


if __name__ == "__main__":
    main()
