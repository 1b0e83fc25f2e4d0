"""`ddpm bench` (bench/speed.py) asks the one engine factory (api.Model.engine) by keyword and times `ddpm gen`'s
labels (pipeline.labels): only engine.run is timed."""

import types

from ddpm import pipeline
from ddpm.bench import speed
from ddpm.runtime.samplers import ddim_plan
from ddpm.runtime.schedule import Schedule


def test_bench_makes_engines_by_keyword_and_runs_gens_labels(monkeypatch):
    made, runs = [], []

    class Engine:
        def run(self, x_T, z, labels, plan, guidance):
            runs.append((x_T.shape, labels.dtype, labels.tolist()))

    class Model:   # api.Model's config and engine(), whose options are keywords only here
        cfg = types.SimpleNamespace(image_shape=(1, 8, 8), num_classes=3)

        def engine(self, name, *, device, fp16, cuda_graph, threads, max_batch, log, plan, int8=False):
            made.append((name, device, fp16, max_batch, int8))
            return Engine()

    monkeypatch.setattr(speed, "engine_versions", lambda engine: {})
    plan = ddim_plan(Schedule.make("linear", 100), 2)
    res = speed.run_bench(Model(), ["torch", "onnx"], [4], plan, guidance=1.0, repeat=2, fp16=True,
                          log=lambda *_: None)
    assert made == [("torch", "cpu", False, 8, False), ("onnx", "cpu", True, 8, False)]
    gen = pipeline.labels(3, 4)                                                         # what gen draws: 0 1 2 0
    assert runs == [((4, 1, 8, 8), gen.dtype, gen.tolist())] * 6                      # warm-up and 2 runs each
    assert [c["engine"] for c in res["results"]] == ["torch", "onnx"]
