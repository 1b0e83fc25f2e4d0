"""`ddpm bench` charges each engine its own peak GPU memory, while engines take turns on one device.

No GPU here: run_bench runs its real loop over stand-in engines and a stand-in for torch.cuda's memory functions
that keeps the books of a caching allocator (allocated, its peak, reserved) and of the device's free memory.
"""

import types

import pytest

from ddpm.bench import speed
from ddpm.bench.speed import MemoryMeter

MiB = 2**20


class FakeCuda:
    """torch.cuda's memory functions over a simulated device: torch's allocator plus allocations outside it."""

    def __init__(self, total=10_000 * MiB):
        self.allocated = self.peak = self.reserved = self.outside = 0
        self.total = total

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)   # a caching allocator keeps what it once reserved

    def free(self, n):
        self.allocated -= n

    def synchronize(self, device=None):
        pass

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.allocated

    def memory_reserved(self, device=None):
        return self.reserved

    def mem_get_info(self, device=None):
        return self.total - self.reserved - self.outside, self.total


class EagerLike:
    """Weights at creation; every run allocates its activations and frees them."""

    def __init__(self, cuda, weights, per_image):
        self.cuda, self.per_image = cuda, per_image
        cuda.alloc(weights)

    def run(self, batch):
        self.cuda.alloc(self.per_image * batch)
        self.cuda.free(self.per_image * batch)


class RuntimeLike:
    """Weights at creation; the first run at a batch size allocates the runner's buffers (kept), every run a
    transient workspace; optionally device memory outside torch (a TensorRT context, onnxruntime's arena)."""

    def __init__(self, cuda, weights, buffers_per_image, workspace, outside_weights=0, outside_per_runner=0):
        self.cuda, self.buffers, self.workspace, self.ctx = cuda, buffers_per_image, workspace, outside_per_runner
        self.runners = set()
        cuda.alloc(weights)
        cuda.outside += outside_weights

    def run(self, batch):
        if batch not in self.runners:
            self.runners.add(batch)
            self.cuda.alloc(self.buffers * batch)
            self.cuda.outside += self.ctx
        self.cuda.alloc(self.workspace)
        self.cuda.free(self.workspace)


def test_each_engine_is_charged_its_own_peak(monkeypatch):
    cuda = FakeCuda()
    makers = {"torch": lambda: EagerLike(cuda, 10 * MiB, 300 * MiB),
              "runtime-torch": lambda: RuntimeLike(cuda, 10 * MiB, 100 * MiB, 50 * MiB),
              "trt": lambda: RuntimeLike(cuda, 0, 20 * MiB, 0, outside_weights=40 * MiB, outside_per_runner=200 * MiB)}
    asked = []

    class Model:   # api.Model's config and engine(): engines made on the simulated device
        cfg = types.SimpleNamespace(image_shape=(1, 28, 28), num_classes=10)

        def engine(self, name, device, fp16, cuda_graph, threads, max_batch, log, plan=None):
            asked.append(max_batch)
            return makers[name]()

    monkeypatch.setattr(speed, "time_run", lambda eng, batch, plan, w, seed, dev, cfg: eng.run(batch) or 0.5)
    monkeypatch.setattr(speed, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(speed, "engine_versions", lambda engine: {})
    plan = types.SimpleNamespace(name="ddim2", steps=2, num_slots=0, history=0)   # what run_bench reads of a Plan
    res = speed.run_bench(Model(), ["torch", "runtime-torch", "trt"], [1, 4], plan, guidance=0.3, repeat=2,
                          device="cuda", cuda=cuda, log=lambda *_: None)
    assert asked == [8, 8, 8]                      # batch 4 with guidance: the network runs at 8
    got = {(c["engine"], c["batch"]): (c["peak_mem_torch_mb"], c["peak_mem_outside_torch_mb"], c["peak_mem_mb"])
           for c in res["results"]}
    assert got == {("torch", 1): (10 + 300, None, 310), ("torch", 4): (10 + 1200, None, 1210),
                   ("runtime-torch", 1): (10 + 100 + 50, None, 160), ("runtime-torch", 4): (10 + 400 + 50, None, 460),
                   ("trt", 1): (20, 40 + 200, 260), ("trt", 4): (80, 40 + 200, 320)}
    assert "peak MB: each engine's own GPU memory" in speed.format_table(res)


def test_meter_ignores_what_other_engines_hold_and_torch_releasing_memory():
    cuda = FakeCuda()
    meter = MemoryMeter(cuda, "cuda")
    with meter.measure(("a", 1)):
        cuda.alloc(100)                            # a's buffers, kept
    with meter.measure(("t", 1)):
        cuda.alloc(500)                            # t's activations, freed (torch keeps them reserved)
        cuda.free(500)
    with meter.measure(("b", 1), outside=True):
        cuda.reserved = cuda.allocated             # torch.cuda.empty_cache(): the device gets 500 back meanwhile
        cuda.alloc(40)
        cuda.outside += 70                         # b's own allocations outside torch
    with meter.measure(("a", 1)):
        cuda.alloc(30)
        cuda.free(30)
    assert meter.peak == {("a", 1): 130, ("t", 1): 500, ("b", 1): 40} and meter.outside == {("b", 1): 70}
    assert meter.engine_mb("a", 1) == pytest.approx((130 / MiB, None))
    assert meter.engine_mb("b", 1) == pytest.approx((40 / MiB, 70 / MiB))
