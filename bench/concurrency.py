"""What concurrent calls on one shared Model cost: T threads x K calls of `generate` against the same T*K calls one
after another, per engine, median of R repeats (after a warm-up that builds the runners), and whether the digits
are the serial ones byte for byte.

    python -m ddpm.bench.concurrency --engines onnx,runtime-torch --threads 2 --calls 4 --repeat 5

Each call is `generate(16, seed=s)` with its own seed (the shipped model, the default UniPC-8 plan); with several
threads, calls of the same batch and plan run at once, each on a runner of its own (runtime.runner.RuntimeEngine).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model, engine: str, threads: int, calls: int, repeat: int, n: int = 16) -> dict:
    seeds = list(range(threads * calls))
    ref = {s: model.generate(n, seed=s, engine=engine, device="cpu") for s in seeds}   # warm-up and reference
    same = True

    def serial() -> None:
        nonlocal same
        for s in seeds:
            same &= bool(np.array_equal(model.generate(n, seed=s, engine=engine, device="cpu"), ref[s]))

    def parallel() -> None:
        nonlocal same
        out: dict = {}

        def work(mine):
            for s in mine:
                out[s] = model.generate(n, seed=s, engine=engine, device="cpu")
        pool = [threading.Thread(target=work, args=(seeds[k::threads],)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        same &= all(np.array_equal(out[s], ref[s]) for s in seeds)

    ser, par = [], []
    for _ in range(repeat):   # interleaved, so that a change of the machine's load hits both alike
        ser.append(_timed(serial))
        par.append(_timed(parallel))
    return {"engine": engine, "threads": threads, "calls": threads * calls, "serial_s": statistics.median(ser),
            "threads_s": statistics.median(par), "ratio": statistics.median(par) / statistics.median(ser),
            "serial_runs": ser, "threads_runs": par, "same_digits": same}


def main() -> None:
    import ddpm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="onnx,runtime-torch,torch,onnx-generator")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4, help="calls per thread")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    model = ddpm.load()
    for engine in a.engines.split(","):
        r = measure(model, engine, a.threads, a.calls, a.repeat)
        print(f"{engine:15s} {r['calls']} calls: serial {r['serial_s']:.2f} s, {a.threads} threads "
              f"{r['threads_s']:.2f} s (x{r['ratio']:.2f}), same digits: {r['same_digits']}  "
              f"[serial {' '.join(f'{t:.2f}' for t in r['serial_runs'])}; threads "
              f"{' '.join(f'{t:.2f}' for t in r['threads_runs'])}]", flush=True)


if __name__ == "__main__":
    main()
