"""Which form of generator.onnx to ship: one ONNX Loop over the plan's rows, or the rows unrolled (README "generator").

    python -m ddpm.bench.generator_forms --export DIR --steps 50 --batch 1,8 --repeat 5

For each form: the time to build it and to create its onnxruntime session (what a browser pays at page load), and
the time of one generation per batch size, alternating run by run with the step loop (the onnx engine) on the same
x_T, labels and guidance. Medians and min-max; CPU, onnxruntime's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    import onnx

    from ..export.generator import FORMS, build
    from ..runtime.bundle import Bundle
    from ..runtime.generator import GeneratorEngine
    from ..runtime.nets import OnnxNet
    from ..runtime.noise import make_noise
    from ..runtime.runner import RuntimeEngine, plan_key
    from ..runtime.samplers import ddim_plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="an export folder (ddpm export --out DIR)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=1.0)
    args = ap.parse_args(argv)
    bundle = Bundle.load(args.export)
    plan = ddim_plan(bundle.schedule, args.steps)
    net = onnx.load(str(bundle.onnx_path("fp32")))
    engines = {"onnx (step loop)": RuntimeEngine(OnnxNet(bundle.onnx_path("fp32")), bundle.null_label,
                                                   bundle.image_shape)}
    with tempfile.TemporaryDirectory() as tmp:
        for form in FORMS:
            t0 = time.perf_counter()
            path = Path(tmp) / f"{form}.onnx"
            onnx.save(build(net, plan, bundle.null_label, bundle.image_shape, form), str(path))
            t1 = time.perf_counter()
            engines[f"generator {form}"] = GeneratorEngine(path, {"plan": plan.name, "plan_key": plan_key(plan)},
                                                           bundle.null_label)
            t2 = time.perf_counter()
            print(f"{form}: built in {t1 - t0:.2f} s, {path.stat().st_size / 1e6:.2f} MB, "
                  f"{len(onnx.load(str(path)).graph.node)} top-level nodes; session created in {t2 - t1:.2f} s",
                  flush=True)
        print(f"{plan.name}, guidance {args.guidance:g}, {args.repeat} runs each after one warm-up")
        for batch in (int(b) for b in args.batch.split(",")):
            x_T, _ = make_noise(0, 0, batch, 0, bundle.image_shape)
            labels = np.arange(batch) % int(bundle.meta["num_classes"])
            times = {name: [] for name in engines}
            for eng in engines.values():
                eng.run(x_T, None, labels, plan, args.guidance)
            for _ in range(args.repeat):
                for name, eng in engines.items():
                    t0 = time.perf_counter()
                    eng.run(x_T, None, labels, plan, args.guidance)
                    times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                print(f"batch {batch:3d}  {name:20s} median {statistics.median(ts):7.3f} s  "
                      f"min-max {min(ts):.3f}-{max(ts):.3f} s", flush=True)


if __name__ == "__main__":
    main()
