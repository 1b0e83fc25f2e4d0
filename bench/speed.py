"""`ddpm bench`: every engine against eager PyTorch on the same work, in one run.

For each batch size, every available engine runs R full generations (noise from the seeded stream, the whole
reverse loop, the images back on the host), after one warm-up each; engines alternate run by run so that drift on
a shared machine hits them alike. On a GPU each run is timed with CUDA events, synchronising only at its ends; on a
CPU with a monotonic clock. On a GPU each engine's own peak memory is measured too (MemoryMeter).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import labels as class_labels
from ..runtime.engines import engine_versions
from ..runtime.generate import network_batch
from ..runtime.nets import cpu_count
from ..runtime.noise import make_noise
from ..runtime.runner import RuntimeEngine


@dataclass
class Case:
    engine: str
    batch: int
    times: list[float] = field(default_factory=list)


# engines whose GPU memory is not all allocated through torch: onnxruntime's CUDA arena and TensorRT's engine and
# execution contexts (their I/O buffers are the runner's torch tensors)
OUTSIDE_TORCH = ("onnx", "trt")


class MemoryMeter:
    """Each engine's own peak GPU memory while the engines of `ddpm bench` take turns on one device.

    Every measured stretch (an engine's creation, each of its runs) is keyed by (engine, what) and bracketed by
    `measure`: it synchronises, notes torch's allocated bytes and resets torch's peak statistic, and afterwards takes
    the peak above that start. Bytes a stretch leaves allocated (a runner's buffers, the weights) stay charged to its
    key, so a key's peak is what its earlier stretches kept plus the highest peak of any one of them, whatever the
    other engines hold meanwhile (torch.cuda.max_memory_allocated alone is device-wide).

    For engines that allocate outside torch (outside=True): the device's used memory (cudaMemGetInfo: total - free)
    grows by their allocations plus torch's own reserved growth; the part beyond torch's is added to the key. That
    figure is device-wide: it assumes no other process allocates during the stretch, and it includes CUDA modules that
    the engine is the first to load. `cuda` is torch.cuda or a stand-in with the same functions (tests).
    """

    def __init__(self, cuda, device):
        self.cuda, self.device = cuda, device
        self.kept: dict = {}      # key -> torch bytes its stretches left allocated
        self.peak: dict = {}      # key -> peak torch bytes, counting what its earlier stretches kept
        self.outside: dict = {}   # key -> device bytes allocated outside torch

    @contextmanager
    def measure(self, key, outside: bool = False):
        c, d = self.cuda, self.device
        c.synchronize(d)
        start, reserved, free = c.memory_allocated(d), c.memory_reserved(d), c.mem_get_info(d)[0]
        c.reset_peak_memory_stats(d)
        yield
        c.synchronize(d)
        kept = self.kept.get(key, 0)
        self.peak[key] = max(self.peak.get(key, 0), kept + c.max_memory_allocated(d) - start)
        self.kept[key] = kept + c.memory_allocated(d) - start
        if outside:
            grown = (free - c.mem_get_info(d)[0]) - (c.memory_reserved(d) - reserved)
            self.outside[key] = self.outside.get(key, 0) + max(0, grown)

    def engine_mb(self, name: str, batch: int) -> tuple[float, float | None]:
        """(peak MiB through torch, MiB outside torch or None) of engine `name` at a batch size: what its creation
        kept (weights) plus the peak of its runs at that batch size."""
        torch_bytes = self.kept.get((name, "create"), 0) + self.peak.get((name, batch), 0)
        outside = [self.outside[k] for k in ((name, "create"), (name, batch)) if k in self.outside]
        return torch_bytes / 2**20, sum(outside) / 2**20 if outside else None


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def device_name(device) -> str:
    if _cuda(device):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    cpus = cpu_count()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({cpus} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({cpus} CPUs)"


def time_run(engine, batch: int, plan, guidance: float, seed: int, device, cfg) -> float:
    """Seconds for one full generation of `batch` images of a model whose config is `cfg` (model.config.ModelConfig:
    its image shape and classes): noise, loop, images on the host. The labels are `ddpm gen`'s, the classes in turn
    (pipeline.labels), made before the clock starts."""
    labels = class_labels(cfg.num_classes, batch)
    if _cuda(device):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        x_T, z = make_noise(seed, 0, batch, plan.num_slots, cfg.image_shape)
        engine.run(x_T, z, labels, plan, guidance)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    x_T, z = make_noise(seed, 0, batch, plan.num_slots, cfg.image_shape)
    engine.run(x_T, z, labels, plan, guidance)
    return time.perf_counter() - t0


def kernel_floor(engine, batch: int, plan, guidance: float, device, cfg) -> float | None:
    """GPU only, runtime engines only (their runners step row by row): summed CUDA kernel time of one loop step
    (profiler) x steps, in seconds, for a model whose config is `cfg` (its image shape and classes)."""
    if not _cuda(device) or not isinstance(engine, RuntimeEngine):
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    r = engine.runner(batch, plan, guidance != 0)
    x_T, z = make_noise(0, 0, batch, plan.num_slots, cfg.image_shape)
    with r.net.stream_context():
        r.load(x_T, z, class_labels(cfg.num_classes, batch), guidance)
        r.step(0)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r.step(plan.steps // 2)
            torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) for e in kernels)
    return kernel_us * 1e-6 * plan.steps


def run_bench(model, engines, batches, plan, guidance=1.0, repeat=3, fp16=False, device="cpu",
              cuda_graph=True, seed=0, threads=None, log=print, cuda=None, baseline=None, int8=False) -> dict:
    """Time `engines` (names) of `model` (api.Model) at every batch size on `plan`; engines that cannot run here are
    reported as skipped with the reason. With a `baseline` plan (e.g. DDIM-50 when `plan` is a few-step solver) the
    eager engine also runs it, in the same alternation, and every case gets its speedup over that baseline. On a GPU
    also each engine's own peak memory (MemoryMeter, over torch.cuda or the stand-in `cuda`). Returns the results as
    a dict (see format_table). int8: the onnx engine is also timed with model_int8.onnx (`ddpm export --int8`), as
    "onnx int8" beside the fp32 "onnx", and onnx-generator with its int8 generator as "onnx-generator int8"; without
    an int8 model (or generator) that row is skipped with the reason."""
    from ..api import DdpmError
    from ..runtime.generate import check_batch_fits

    meter = None
    if _cuda(device):
        if cuda is None:
            import torch

            cuda = torch.cuda
        meter = MemoryMeter(cuda, device)
    for batch in batches:   # before any engine is made or any buffer allocated
        check_batch_fits(plan, batch, model.cfg.image_shape, guided=guidance != 0, device=device, cuda=cuda)
    metered = lambda key, name: (meter.measure(key, name.split()[0] in OUTSIDE_TORCH) if meter is not None
                                 else nullcontext())
    net_batch = network_batch(max(batches), guidance != 0)
    ready, skipped = {}, {}
    # int8: the onnx engine is timed twice, fp32 as "onnx" and int8 as "onnx int8", alternating like any two engines;
    # onnx-generator likewise
    variants = [(name, name, {}) for name in engines] + [(f"{name} int8", name, {"int8": True}) for name in
                                                         ("onnx", "onnx-generator") if int8 and name in engines]
    for key, name, kw in variants:
        try:
            with metered((key, "create"), name):
                ready[key] = model.engine(name, device=device, fp16=fp16 and name != "torch", cuda_graph=cuda_graph,
                                          threads=threads, max_batch=net_batch, log=log, plan=plan, **kw)
        except DdpmError as e:
            skipped[key] = str(e)          # reported once, in the table
    runs = {name: (eng, plan) for name, eng in ready.items()}
    base_name = None
    if baseline is not None and "torch" in ready:
        base_name = f"torch {baseline.name}"
        runs[base_name] = (ready["torch"], baseline)
    cases = []
    for batch in batches:
        group = {name: Case(name, batch) for name in runs}
        for name, (eng, p) in runs.items():   # warm-up: buffers, ORT arenas, CUDA graph capture, cuDNN autotune
            with metered((name, batch), name):
                time_run(eng, batch, p, guidance, seed, device, model.cfg)
        for r in range(repeat):
            for name, (eng, p) in runs.items():       # alternate engines run by run
                with metered((name, batch), name):
                    group[name].times.append(time_run(eng, batch, p, guidance, seed, device, model.cfg))
            log(f"batch {batch}, repeat {r + 1}/{repeat}: " +
                ", ".join(f"{n} {group[n].times[-1]:.3f}s" for n in runs))
        floors = {name: kernel_floor(eng, batch, plan, guidance, device, model.cfg) for name, eng in ready.items()}
        if floors.get("torch") is None:   # eager runs the same kernels as the runtime's torch model
            floors["torch"] = floors.get("runtime-torch")
        for name, (eng, p) in runs.items():
            c = group[name]
            floor = floors[name] if name in ready else None
            torch_mb, outside_mb = meter.engine_mb(name, batch) if meter is not None else (None, None)
            cases.append({"engine": name, "plan": p.name, "batch": batch, "times_s": c.times,
                          "median_s": statistics.median(c.times), "min_s": min(c.times), "max_s": max(c.times),
                          "ms_per_step": 1000 * statistics.median(c.times) / p.steps,
                          "images_per_s": batch / statistics.median(c.times),
                          # this engine's own peak GPU memory: through torch, and outside it (onnxruntime, TensorRT)
                          "peak_mem_mb": None if torch_mb is None else torch_mb + (outside_mb or 0),
                          "peak_mem_torch_mb": torch_mb, "peak_mem_outside_torch_mb": outside_mb,
                          "floor_s": floor, "vs_floor": statistics.median(c.times) / floor if floor else None})
        base = next((c for c in cases if c["engine"] == "torch" and c["batch"] == batch), None)
        slow = next((c for c in cases if c["engine"] == base_name and c["batch"] == batch), None)
        for c in cases:
            if c["batch"] == batch:
                same_plan = c["plan"] == plan.name
                c["speedup_vs_eager"] = base["median_s"] / c["median_s"] if base and same_plan else None
                c["speedup_vs_baseline"] = slow["median_s"] / c["median_s"] if slow else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"device": device_name(device), "sampler": plan.name, "steps": plan.steps, "guidance": guidance,
            "fp16": fp16, "int8": int8, "repeat": repeat, "baseline": None if base_name is None else baseline.name,
            "cuda_graph": cuda_graph and _cuda(device),
            "versions": {n: engine_versions(e) for n, e in ready.items()}, "skipped": skipped,
            "process_peak_rss_mb": rss, "results": cases}


def format_table(res: dict, markdown: bool = False) -> str:
    base = res.get("baseline")
    cols = ["engine", "batch", "median s", "min-max s", "ms/step", "img/s", "vs eager",
            *([f"vs eager {base}"] if base else []), "peak MB", "vs floor"]
    rows = []
    for c in res["results"]:
        rows.append([c["engine"], str(c["batch"]), f"{c['median_s']:.3f}", f"{c['min_s']:.3f}-{c['max_s']:.3f}",
                     f"{c['ms_per_step']:.2f}", f"{c['images_per_s']:.1f}",
                     f"{c['speedup_vs_eager']:.2f}x" if c.get("speedup_vs_eager") else "-",
                     *([f"{c['speedup_vs_baseline']:.2f}x" if c.get("speedup_vs_baseline") else "-"] if base else []),
                     f"{c['peak_mem_mb']:.0f}" if c["peak_mem_mb"] is not None else "-",
                     f"{c['vs_floor']:.2f}x" if c["vs_floor"] else "-"])
    head = (f"{res['device']}; {res['sampler']} ({res['steps']} steps), guidance {res['guidance']:g}, "
            f"fp16 {res['fp16']}, int8 (onnx) {res.get('int8', False)}, {res['repeat']} runs each, "
            f"CUDA graph {res['cuda_graph']}")
    if markdown:
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
        fmt = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))
        lines = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if all(c["peak_mem_mb"] is None for c in res["results"]):   # CPU: no per-engine figure
        lines.append(f"peak memory (CPU): the whole process's peak RSS, {res['process_peak_rss_mb']:.0f} MB")
    else:
        lines.append("peak MB: each engine's own GPU memory at that batch size (weights, buffers, activations; for "
                     f"{' and '.join(OUTSIDE_TORCH)} also what they allocate outside torch)")
    for name, why in res["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    lines.append("versions: " + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in vs.items())
                                          for n, vs in res["versions"].items()))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    """time per image against batch size per engine; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(c["engine"] for c in res["results"]):
        pts = [(c["batch"], 1000 * c["median_s"] / c["batch"]) for c in res["results"] if c["engine"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter, ScalarFormatter

    class Plain(LogFormatterSciNotation):
        """Log-axis labels where matplotlib puts them, written as plain numbers: 2.5, not 2.5x10^0."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    batches = sorted({c["batch"] for c in res["results"]})
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per image (full loop)",
           title=f"{res['sampler']} on {res['device']}"[:70])
    ax.set_xticks(batches)                                  # the batch sizes measured, written as plain numbers
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


OUTPUT_NAMES = ("bench.json", "bench.md", "bench.png")   # what `ddpm bench --out DIR` writes into DIR


def output_files(out: Path) -> list[Path]:
    """The files write_outputs writes into the folder `out`: bench.json, bench.md and, when matplotlib can be
    imported, bench.png; the command checks each before any work (cli_options.check_output)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [out / name for name in OUTPUT_NAMES[:2]]
    return [out / name for name in OUTPUT_NAMES]


def write_outputs(res: dict, out: Path) -> list[Path]:
    """output_files(out) (bench.json, bench.md, with matplotlib bench.png), each written atomically; returns them."""
    from ..files import atomic_write, write_text

    files = output_files(out)
    write_text(files[0], json.dumps(res, indent=1) + "\n")
    write_text(files[1], format_table(res, markdown=True) + "\n")
    if len(files) > 2:
        atomic_write(files[2], lambda tmp: plot(res, Path(tmp)))
    return files
