"""Sample quality against network calls: every sampler at a few step counts, scored as `ddpm eval` scores them.

    python -m ddpm.bench.sweep --data ../shared/data/mnist --out bench/sweep           # measure, table, plot
    python -m ddpm.bench.sweep --data ../shared/data/mnist --out bench/sweep --groups fine,interval-fine
    python -m ddpm.bench.sweep --out bench/sweep --report                              # table and plot again

Every point generates N class-conditional samples (classes 0-9 in turn, the seeded noise stream of `ddpm gen`) with
one plan and scores them with ddpm.evaluation (Frechet distance of the MNIST classifier's features to the test
set, the floor at the same N, conditional accuracy), exactly as `ddpm eval -n N --sampler S --steps K ...` does. The
points come in groups, measured in this order:

    main      ddim, dpm++2m, unipc at 5, 8, 10, 15, 20 steps (ddim also at 50), each with its default spacing,
              at the default guidance, for every seed (the spread of two seeds)
    spacing   the three spacings (linspace, trailing, logsnr) for every sampler at 5, 10 and 20 steps, seed 0
    interval  guidance only inside a noise-level interval (Kynkaanniemi et al. 2024) for the two solvers at 10 steps,
              at three guidance weights, beside the same weights on every step, seed 0
    fine      (asked for by name) every sampler at 6 and 7 steps, every seed: between 5 and 8 calls
    interval-fine  (asked for by name) the solvers at 6, 8 and 10 steps with w = 0.45 and 0.6 inside the paper's
              interval (0.28, 5.42], every seed

Results go to OUT/sweep.json as they come, one row per point, so an interrupted run resumes where it stopped (a point
already there is skipped). OUT/sweep.md (the tables) and OUT/sweep.png (FD/floor and accuracy against calls) are
written from sweep.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from ..files import atomic_write, write_text

GUIDANCE = 0.3                                   # the CLI default (cli.GUIDANCE)
STEPS = (5, 8, 10, 15, 20)
SAMPLERS = ("ddim", "dpm++2m", "unipc")
INTERVALS = ((0.28, 5.42), (0.2, 2.0), (0.5, 10.0), (1.0, math.inf))   # the first: the paper's for SD-XL / EDM2-S
INTERVAL_W = (0.3, 0.6, 1.0)


def point_key(p: dict) -> str:
    gi = "all" if p["interval"] is None else f"{p['interval'][0]:g},{p['interval'][1]:g}"
    return f"{p['sampler']}|{p['steps']}|{p['spacing']}|w{p['guidance']:g}|gi{gi}|seed{p['seed']}|n{p['n']}"


def grid(groups, seeds, n) -> list[dict]:
    """The points to measure, in order (duplicates across groups are measured once)."""
    from ..runtime.samplers import DEFAULT_SPACING, SPACINGS

    pts = []
    add = lambda group, sampler, steps, spacing=None, w=GUIDANCE, interval=None, seed=0: pts.append(
        {"group": group, "sampler": sampler, "steps": steps, "spacing": spacing or DEFAULT_SPACING[sampler],
         "guidance": w, "interval": interval, "seed": seed, "n": n})
    if "main" in groups:
        for seed in seeds:
            for sampler in SAMPLERS:
                for steps in STEPS + ((50,) if sampler == "ddim" else ()):
                    add("main", sampler, steps, seed=seed)
    if "spacing" in groups:
        for steps in (10, 5, 20):
            for sampler in SAMPLERS:
                for spacing in SPACINGS:
                    add("spacing", sampler, steps, spacing)
    if "interval" in groups:
        for sampler in ("dpm++2m", "unipc"):
            for w in INTERVAL_W:
                add("interval", sampler, 10, w=w)
                for iv in INTERVALS:
                    add("interval", sampler, 10, w=w, interval=iv)
    if "fine" in groups:                         # between 5 and 8 calls
        for seed in seeds:
            for sampler in SAMPLERS:
                for steps in (6, 7):
                    add("fine", sampler, steps, seed=seed)
    if "interval-fine" in groups:                # the paper's interval at a few step counts and weights
        for seed in seeds:
            for sampler in ("dpm++2m", "unipc"):
                for steps in (6, 8, 10):
                    for w in (0.45, 0.6):
                        add("interval-fine", sampler, steps, w=w, interval=INTERVALS[0], seed=seed)
    seen, out = set(), []
    for p in pts:
        if point_key(p) not in seen:
            seen.add(point_key(p))
            out.append(p)
    return out


def network_images(plan, guided: bool) -> int:
    """Images through the network per sample: one per call, two on the guided rows."""
    return int(plan.calls_net.sum() + (guided and plan.cfg[plan.calls_net].sum()))


def measure(args) -> None:
    import torch

    from .. import load
    from ..runtime.engines import resolve_device
    from ..runtime.generate import generate, labels_for, network_batch
    from ..runtime.samplers import make_plan
    from ..runtime.schedule import Schedule
    from .. import evaluation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "sweep.json"
    doc = json.loads(store.read_text()) if store.exists() else {"meta": {}, "rows": []}
    done = {r["key"] for r in doc["rows"]}
    todo = [p for p in grid(args.groups, args.seeds, args.n) if point_key(p) not in done]
    print(f"{len(todo)} points to measure ({len(done)} already in {store})", flush=True)
    if not todo:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.startswith("cuda"):   # plain fp32 on the GPU too, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    loaded = load(args.ckpt)
    eng = loaded.engine(args.engine, device, cuda_graph=not args.no_cuda_graph,
                        max_batch=network_batch(args.batch, guided=True))
    ref = evaluation.Reference.load(args.data)
    sched = Schedule.of(loaded.cfg)
    floors = {}
    doc["meta"] = {"engine": eng.name, "device": device, "model": loaded.hash[:16], "batch": args.batch,
                   "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    for k, p in enumerate(todo):
        plan = make_plan(sched, p["sampler"], p["steps"], spacing=p["spacing"], guidance_interval=p["interval"])
        labels = labels_for(p["n"], None, False, loaded.cfg.num_classes)
        t0 = time.perf_counter()
        images = generate(eng, p["n"], plan, labels, p["guidance"], p["seed"], args.batch, progress=False,
                          image_shape=loaded.cfg.image_shape)
        seconds = time.perf_counter() - t0
        if p["n"] not in floors:
            floors[p["n"]] = ref.floor(p["n"])
        feats, preds = evaluation.features_and_predictions(ref.classifier, images)
        fd = evaluation.frechet_distance(feats, ref.test_features)
        row = {**p, "key": point_key(p), "plan": plan.name, "calls": plan.calls,
               "network_images": network_images(plan, p["guidance"] > 0), "fd": fd, "floor": floors[p["n"]],
               "fd_ratio": fd / floors[p["n"]], "accuracy": float((preds == labels).mean()), "seconds": seconds}
        doc["rows"].append(row)
        write_text(store, json.dumps(doc, indent=1) + "\n")   # atomic: a kill never loses the rows measured
        print(f"[{k + 1}/{len(todo)}] {row['key']}: FD/floor {row['fd_ratio']:.3f}, accuracy "
              f"{100 * row['accuracy']:.2f}%, {seconds:.1f}s", flush=True)


# ------------------------------------------------------------------------------------------------------ report
def _fmt_iv(iv) -> str:
    return "all" if iv is None else f"({iv[0]:g}, {iv[1]:g}]"


def _spread(vals, fmt) -> str:
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(float(np.mean(vals)))} ({fmt(min(vals))}-{fmt(max(vals))})"


def _configs(rows, keep) -> list[list[dict]]:
    """The rows that `keep` accepts, grouped by everything but the seed, in sampler, steps, spacing, w order."""
    groups = {}
    for r in rows:
        if keep(r):
            groups.setdefault(r["key"].rsplit("|seed", 1)[0] + f"|n{r['n']}", {})[r["seed"]] = r
    out = [list(g.values()) for g in groups.values()]
    return sorted(out, key=lambda g: (SAMPLERS.index(g[0]["sampler"]), g[0]["steps"], g[0]["spacing"],
                                      g[0]["guidance"], _fmt_iv(g[0]["interval"])))


def _cells(rs) -> str:
    return (f"{len(rs)} | {_spread([r['fd_ratio'] for r in rs], lambda v: f'{v:.2f}')} | "
            f"{_spread([100 * r['accuracy'] for r in rs], lambda v: f'{v:.2f}%')} |")


def tables(doc: dict) -> str:
    rows = doc["rows"]
    m = doc.get("meta", {})
    n = sorted({r["n"] for r in rows})
    lines = [f"Measured with `python -m ddpm.bench.sweep` on {m.get('gpu') or m.get('device')} ({m.get('engine')} "
             f"engine, fp32, torch {m.get('torch')}), model {m.get('model')}, N = {', '.join(map(str, n))} "
             f"class-conditional samples per point, classes 0-9 in turn. Where a point was measured with several "
             f"seeds: their mean (min-max).", ""]
    plain = lambda r: r["guidance"] == GUIDANCE and r["interval"] is None
    default_spacing = lambda r: r["spacing"] == ("linspace" if r["sampler"] == "ddim" else "trailing")
    # 1. every sampler against its calls, default spacing, default guidance on every step
    lines += [f"Guidance w = {GUIDANCE:g} on every step, each sampler's default spacing:", "",
              "| sampler | spacing | steps | network calls | seeds | FD / floor | conditional accuracy |",
              "|---|---|---|---|---|---|---|"]
    for rs in _configs(rows, lambda r: plain(r) and default_spacing(r)):
        lines.append(f"| {rs[0]['sampler']} | {rs[0]['spacing']} | {rs[0]['steps']} | {rs[0]['calls']} | {_cells(rs)}")
    # 2. the spacings, seed 0
    lines += ["", f"Spacing (seed 0, w = {GUIDANCE:g} on every step):", "",
              "| sampler | steps | spacing | seeds | FD / floor | conditional accuracy |", "|---|---|---|---|---|---|"]
    for rs in _configs(rows, lambda r: plain(r) and r["seed"] == 0 and r["steps"] in (5, 10, 20)):
        lines.append(f"| {rs[0]['sampler']} | {rs[0]['steps']} | {rs[0]['spacing']} | {_cells(rs)}")
    # 3. guidance intervals, beside guidance on every step
    interval_cfgs = {(r["sampler"], r["steps"]) for r in rows if r["interval"] is not None}
    lines += ["", "Guidance interval (trailing spacing): guidance only where sigma = sqrt((1 - abar)/abar) is in the "
              "interval, the conditional model alone elsewhere; network images per sample count both halves of a "
              "guided call:", "",
              "| sampler | steps | guidance w | interval of sigma | network images / sample | seeds | FD / floor | "
              "conditional accuracy |", "|---|---|---|---|---|---|---|---|"]
    for rs in _configs(rows, lambda r: (r["sampler"], r["steps"]) in interval_cfgs and default_spacing(r)):
        r = rs[0]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {_fmt_iv(r['interval'])} | "
                     f"{r['network_images']} | {_cells(rs)}")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> bool:
    """FD/floor and accuracy against network calls, one line per sampler (mean of the seeds, min-max bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    main = [r for r in doc["rows"] if r["group"] in ("main", "fine")]
    if not main:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for s in SAMPLERS:
        ks = sorted({r["steps"] for r in main if r["sampler"] == s})
        if not ks:
            continue
        for ax, key, scale in ((axes[0], "fd_ratio", 1), (axes[1], "accuracy", 100)):
            vals = [[scale * r[key] for r in main if r["sampler"] == s and r["steps"] == k] for k in ks]
            mean = np.array([np.mean(v) for v in vals])
            err = np.array([[mean[j] - min(v), max(v) - mean[j]] for j, v in enumerate(vals)]).T
            ax.errorbar(ks, mean, yerr=err, marker="o", capsize=3, label=s)
    base = [r for r in main if r["sampler"] == "ddim" and r["steps"] == 50]
    if base:   # today's default as a reference line
        axes[0].axhline(np.mean([r["fd_ratio"] for r in base]), color="grey", ls="--", lw=1, label="ddim 50 (mean)")
        axes[1].axhline(np.mean([100 * r["accuracy"] for r in base]), color="grey", ls="--", lw=1,
                        label="ddim 50 (mean)")
    axes[0].set(xscale="log", xlabel="network calls per sample", ylabel="FD / floor",
                title=f"Frechet distance (N = {main[0]['n']})")
    axes[1].set(xscale="log", xlabel="network calls per sample", ylabel="conditional accuracy (%)",
                title=f"accuracy, guidance w = {GUIDANCE:g}")
    for ax in axes:
        ax.minorticks_off()
        ax.set_xticks([5, 6, 7, 8, 10, 15, 20, 50], labels=["5", "6", "7", "8", "10", "15", "20", "50"])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def report(out: Path) -> list[Path]:
    doc = json.loads((out / "sweep.json").read_text())
    write_text(out / "sweep.md", tables(doc) + "\n")
    files = [out / "sweep.md"]
    if plot(doc, out / "sweep.png"):
        files.append(out / "sweep.png")
    return files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None, help="MNIST folder (the real test set and the floor)")
    ap.add_argument("--out", default="bench/sweep", help="folder for sweep.json, sweep.md, sweep.png")
    ap.add_argument("-n", type=int, default=5000, help="samples per point (default 5000)")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1],
                    help="seeds of the main group (default 0,1)")
    ap.add_argument("--groups", type=lambda v: v.split(","), default=["main", "spacing", "interval"],
                    help="comma-separated: main, spacing, interval, fine, interval-fine "
                         "(default main,spacing,interval)")
    ap.add_argument("--engine", default="auto", help="as ddpm eval --engine (default auto)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=100, help="samples per batch (default 100)")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rewrite sweep.md and sweep.png from sweep.json")
    args = ap.parse_args(argv)
    if not args.report:
        if args.data is None:
            ap.error("--data is needed to measure")
        measure(args)
    print("wrote " + ", ".join(map(str, report(Path(args.out)))))


if __name__ == "__main__":
    main()
