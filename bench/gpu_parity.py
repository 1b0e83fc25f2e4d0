"""GPU check of the runtime on the default model: eager PyTorch against the captured CUDA graph (runtime-torch).

    python -m ddpm.bench.gpu_parity        # needs a CUDA GPU

For DDIM, DPM-Solver++(2M) and UniPC at 10 steps, guided (w = 0.3), with and without the guidance interval
(0.28, 5.42]: the largest difference between eager on the GPU and the graph, between the graph's first run and a
replay, and between eager on the GPU and eager on the CPU. TF32 is off, so all of it is fp32 arithmetic.
"""

import numpy as np
import torch

from ..model.io import default_model_path, load_model
from ..runtime.engines import make_engine
from ..runtime.noise import make_noise
from ..runtime.samplers import make_plan
from ..runtime.schedule import Schedule


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loaded = load_model(default_model_path())
    sched = Schedule.of(loaded.cfg)
    null = loaded.cfg.null_label
    eager = make_engine("torch", device="cuda", model=loaded.model, null_label=null)
    cpu = make_engine("torch", device="cpu", model=loaded.model, null_label=null)
    graph = make_engine("runtime-torch", device="cuda", model=loaded.model, null_label=null)
    for sampler in ("dpm++2m", "unipc", "ddim"):
        for interval in (None, (0.28, 5.42)):
            plan = make_plan(sched, sampler, 10, guidance_interval=interval)
            x_T, z = make_noise(0, 0, 16, plan.num_slots, loaded.cfg.image_shape)
            y = np.arange(16) % loaded.cfg.num_classes
            a, g1, g2 = (e.run(x_T, z, y, plan, 0.3) for e in (eager, graph, graph))
            c = cpu.run(x_T, z, y, plan, 0.3)
            captured = graph.runner(16, plan, True).graph is not None
            print(f"{plan.name}: {'graph' if captured else 'NO graph'}, runtime vs eager {np.abs(a - g1).max():.2e}, "
                  f"replay vs first {np.abs(g1 - g2).max():.1e}, GPU vs CPU eager {np.abs(a - c).max():.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
