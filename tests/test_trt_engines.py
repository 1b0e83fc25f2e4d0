"""Which TensorRT engine file is used (runtime/trt.py), what profile a new one is built with (export/trt.py), and
what a TensorRT net frees, on a fake `tensorrt` module.

TensorRT and a GPU are not available here, so `tensorrt` is a small stand-in that records what the builder is asked
for; the network's inputs come from the real exported ONNX file. That the calls themselves match TensorRT's API is
checked against its stubs in test_trt_typing.py.
"""

import json
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ddpm.cli import main
from ddpm.export import trt as trt_export
from ddpm.export.trt import ensure_engine
from ddpm.model.io import load_model
from ddpm.runtime import trt as trt_runtime
from ddpm.runtime.bundle import Bundle
from ddpm.runtime.nets import EngineUnavailable, check_io
from ddpm.runtime.trt import choose_engine, engine_files, trt_engine_io
from helpers import MNIST

GPU = "Fake GPU"


def fake_tensorrt(version="10.13.0.35"):
    """A stand-in for the tensorrt module: the builder API that export/trt.py uses, recording every profile."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.built = []   # one dict per build_serialized_network call: input name -> (min, opt, max) shapes

    class Dims(list):
        pass

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, Dims(shape)

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            return self.parse(open(path, "rb").read(), path)

        def parse(self, model, path=None):   # a serialized model; path only for external weights
            for inp in onnx.load_from_string(bytes(model)).graph.input:   # -1 for the dynamic batch, as TensorRT
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(inp.name, dims))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert all(isinstance(d, Dims) for d in (lo, opt, hi))
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Cache:
        def serialize(self):
            return b"timing"

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            pass

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert network.flags == 1 << 1 and len(config.profiles) == 1   # strongly typed on TensorRT 10
            trt.built.append(config.profiles[0].shapes)
            return b"engine"

    trt.Dims, trt.Logger, trt.Builder, trt.OnnxParser = Dims, Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_export, "gpu_name", lambda: GPU)
    monkeypatch.setattr(trt_runtime, "gpu_name", lambda: GPU)
    return trt


@pytest.fixture(scope="module")
def exported(tiny_exported):
    return load_model(tiny_exported(0))


def _bundle(exported, tmp_path):
    """A fresh copy of the export folder (engines are written into it)."""
    import shutil

    shutil.copytree(exported.path.parent / "exp", tmp_path / "exp")
    return Bundle.load(tmp_path / "exp")


@pytest.mark.slow
def test_profile_is_the_network_batch_and_covering_engines_are_reused(fake_trt, exported, tmp_path):
    b = _bundle(exported, tmp_path)
    quiet = lambda *_: None
    # gen --batch 64 with guidance: the network runs at 128, so the engine is optimised for 128
    plan = ensure_engine(b, "fp32", 1, 128, opt_batch=128, log=quiet)
    assert plan.name == "model_b1-128.plan" and len(fake_trt.built) == 1
    assert fake_trt.built[0] == {"x": ([1, 1, 28, 28], [128, 1, 28, 28], [128, 1, 28, 28]),
                                 "t": ([1], [128], [128]), "y": ([1], [128], [128])}
    meta = json.loads(plan.with_suffix(".plan.json").read_text())
    assert (meta["min_batch"], meta["opt_batch"], meta["max_batch"], meta["gpu"]) == (1, 128, 128, GPU)
    # a smaller request is covered: no second build
    assert ensure_engine(b, "fp32", 1, 64, opt_batch=64, log=quiet) == plan and len(fake_trt.built) == 1
    # a larger one is not
    wide = ensure_engine(b, "fp32", 1, 256, log=quiet)
    assert wide.name == "model_b1-256.plan" and len(fake_trt.built) == 2
    assert fake_trt.built[1]["x"][1] == [64, 1, 28, 28]          # the default optimisation batch of an export
    # both cover 1..100: the narrowest wins unless the other is optimised for the batch asked for
    assert ensure_engine(b, "fp32", 1, 100, opt_batch=100, log=quiet) == plan
    assert ensure_engine(b, "fp32", 1, 100, opt_batch=64, log=quiet) == wide
    assert len(fake_trt.built) == 2


@pytest.mark.slow
def test_stale_engines_are_rebuilt(fake_trt, exported, tmp_path):
    b = _bundle(exported, tmp_path)
    plan = ensure_engine(b, "fp32", 1, 256, log=lambda *_: None)
    fake_trt.__version__ = "10.14.1.48"                            # TensorRT upgraded: the engine is stale
    said = []
    assert ensure_engine(b, "fp32", 1, 8, opt_batch=8, log=said.append).name == "model_b1-8.plan"
    assert len(fake_trt.built) == 2 and "model_b1-256.plan is stale (built for tensorrt='10.13.0.35'" in said[0]
    # and one of the same range is rebuilt in place, for this version
    assert ensure_engine(b, "fp32", 1, 256, log=lambda *_: None) == plan and len(fake_trt.built) == 3
    assert json.loads(plan.with_suffix(".plan.json").read_text())["tensorrt"] == "10.14.1.48"


def test_choose_engine_checks_gpu_onnx_and_range(tmp_path):
    want = {"tensorrt": "10.13", "gpu": GPU, "onnx_sha256": "abc"}
    meta = lambda lo, hi, opt=None, **kw: {**want, "min_batch": lo, "max_batch": hi, "opt_batch": opt or hi, **kw}
    p = lambda name: tmp_path / name
    assert choose_engine([], want, 1, 8, 8) == (None, "no engine built yet")
    other_gpu = (p("a_b1-256.plan"), meta(1, 256, gpu="Other GPU"))
    other_onnx = (p("b_b1-256.plan"), meta(1, 256, onnx_sha256="def"))
    narrow = (p("c_b1-4.plan"), meta(1, 4))
    high = (p("d_b16-64.plan"), meta(16, 64))
    plan, why = choose_engine([other_gpu, other_onnx, narrow, high], want, 1, 8, 8)
    assert plan is None
    assert "a_b1-256.plan is stale (built for gpu='Other GPU'" in why and "onnx_sha256='def'" in why
    assert "c_b1-4.plan covers batch 1..4" in why and "d_b16-64.plan covers batch 16..64" in why
    good = (p("e_b1-32.plan"), meta(1, 32))
    assert choose_engine([narrow, good, high], want, 1, 8, 8) == (good[0], "")


def test_engine_files_skip_unreadable_and_foreign(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    for name, info in (("model_b1-8", {"min_batch": 1}), ("model_b1-16", None), ("model_fp16_b1-8", {}),
                       ("model_b1-32", "{not json")):
        (tmp_path / f"{name}.plan").write_bytes(b"engine")
        if info is not None:
            (tmp_path / f"{name}.plan.json").write_text(info if isinstance(info, str) else json.dumps(info))
    assert [(p.name, m) for p, m in engine_files(onnx_path)] == [("model_b1-8.plan", {"min_batch": 1})]


@pytest.mark.slow
def test_cli_export_trt_then_gen_batch_reuses_it(fake_trt, exported, tmp_path):
    """`ddpm export --trt` builds 1-256; the engine that `gen --batch 64` with guidance needs (1-128) is that one."""
    ckpt = exported.path.parent
    r = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--trt"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e" / "model_b1-256.plan").is_file() and len(fake_trt.built) == 1
    plan = ensure_engine(Bundle.load(tmp_path / "e"), "fp32", 1, 128, opt_batch=128, log=lambda *_: None)
    assert plan.name == "model_b1-256.plan" and len(fake_trt.built) == 1


@pytest.mark.parametrize("args, net_batch", [([], 128), (["--guidance", "0"], 64), (["--uncond"], 64)])
def test_gen_asks_for_the_network_batch(exported, tmp_path, monkeypatch, args, net_batch):
    """The engine is made for the batch the network runs at: 2 x --batch with guidance, --batch without."""
    from ddpm.runtime import engines

    asked = []
    real = engines.make_engine

    def spy(name, **options):
        asked.append(options["max_batch"])
        return real("onnx", **options)

    monkeypatch.setattr(engines, "make_engine", spy)
    r = CliRunner().invoke(main, ["gen", "--ckpt", str(exported.path.parent), "-n", 2, "--steps", 2, "--batch", 64,
                                  "-q", "--out", str(tmp_path / "g.npz"), "--export", str(exported.path.parent / "exp"),
                                  *args])
    assert r.exit_code == 0, r.output
    assert asked == [net_batch]


class FakeEngine:
    """A deserialized engine as trt_engine_io reads it."""

    def __init__(self, io, batch=(1, 64)):
        self.io = io                 # name -> (mode, dtype) in the fake module's enums
        self.batch = batch

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name, profile):
        lo, hi = self.batch
        return [[lo, 1, 28, 28], [hi, 1, 28, 28], [hi, 1, 28, 28]]


def test_trt_engine_io_names_modes_dtypes_and_batch(monkeypatch):
    trt = fake_tensorrt()
    trt.DataType = types.SimpleNamespace(FLOAT="F", HALF="H", INT64="I64", INT32="I32")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    io, batch = trt_engine_io(FakeEngine({"x": ("in", "H"), "t": ("in", "I64"), "y": ("in", "I64"),
                                          "eps": ("out", "H")}, (1, 32)))
    assert io == {"x": ("input", "float16"), "t": ("input", "int64"), "y": ("input", "int64"),
                  "eps": ("output", "float16")} and batch == (1, 32)
    bufs = {"x": np.zeros((2, 1, 28, 28), np.float16), "t": np.zeros(2, np.int64), "y": np.zeros(2, np.int64),
            "eps": np.zeros((2, 1, 28, 28), np.float16)}
    check_io(io, bufs, "e.plan")
    # an engine whose t is int32 (an ONNX file from elsewhere) is refused with the tensor named
    io, _ = trt_engine_io(FakeEngine({"x": ("in", "H"), "t": ("in", "I32"), "y": ("in", "I64"), "eps": ("out", "H")}))
    with pytest.raises(EngineUnavailable, match="tensor 't' is I32, the runner's buffer is int64"):
        check_io(io, bufs, "e.plan")
    io, batch = trt_engine_io(FakeEngine({"input": ("in", "F"), "eps": ("out", "F")}))
    assert batch is None
    with pytest.raises(EngineUnavailable, match="the runtime needs x, t, y -> eps"):
        check_io(io, bufs, "e.plan")


class FakeContext:
    """An execution context as TrtNet.bind drives it: shapes and addresses by name."""

    def __init__(self):
        self.shapes, self.addresses = {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def infer_shapes(self):
        return [n for n in ("x", "t", "y") if n not in self.shapes]


def _fake_trt_net(engine):
    """A TrtNet without a GPU: the deserialized engine that TrtNet.__init__ would make, faked, on the CPU."""
    import torch

    from ddpm.runtime.trt import TrtNet

    class Runtime:   # what deserialized the engine
        pass

    net = object.__new__(TrtNet)
    net.engine, net.runtime, net.path, net.batch_range, net.max_batch = engine, Runtime(), "e.plan", (1, 8), 8
    net.device, net.dtype, net.stream = torch.device("cpu"), "float32", None
    net.io_types = {"x": ("input", "float32"), "t": ("input", "int64"), "y": ("input", "int64"),
                    "eps": ("output", "float32")}
    return net


def test_trt_bind_gives_each_runner_its_own_context_within_the_batch_range():
    import torch

    engine = FakeEngine({})
    engine.contexts = []
    engine.create_execution_context = lambda: engine.contexts.append(FakeContext()) or engine.contexts[-1]
    net = _fake_trt_net(engine)
    bufs = lambda n: (torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.int64),
                      torch.zeros(n, dtype=torch.int64), torch.zeros(n, 1, 28, 28))
    a, b = bufs(8), bufs(3)
    net.bind(*a)
    net.bind(*b)
    ca, cb = engine.contexts
    assert ca.shapes == {"x": (8, 1, 28, 28), "t": (8,), "y": (8,)} and cb.shapes["x"] == (3, 1, 28, 28)
    assert ca.addresses == dict(zip(("x", "t", "y", "eps"), (t.data_ptr() for t in a)))
    assert cb.addresses == dict(zip(("x", "t", "y", "eps"), (t.data_ptr() for t in b)))
    with pytest.raises(EngineUnavailable, match=r"runs batches 1\.\.8, this runner needs 9.*--batch 1-9"):
        net.bind(*bufs(9))
    with pytest.raises(EngineUnavailable, match="tensor 'x' is float32, the runner's buffer is float16"):
        net.bind(torch.zeros(2, 1, 28, 28, dtype=torch.float16), *bufs(2)[1:])


def test_closing_a_trt_engine_drops_its_contexts_then_the_engine_and_runtime():
    """RuntimeEngine.close closes every runner (each drops its execution context), then the TrtNet (the engine and
    the runtime that deserialized it); the engine then refuses work."""
    import gc
    import weakref

    from ddpm.runtime.engine import EngineClosed
    from ddpm.runtime.runner import RuntimeEngine
    from ddpm.runtime.samplers import ddim_plan
    from ddpm.runtime.schedule import Schedule

    contexts = []
    engine = FakeEngine({})
    engine.create_execution_context = lambda: contexts.append(weakref.ref(ctx := FakeContext())) or ctx
    net = _fake_trt_net(engine)
    held = weakref.ref(engine), weakref.ref(net.runtime)
    del engine
    eng = RuntimeEngine(net, 10, MNIST)
    assert eng.supports.max_batch == 8 and eng.name == "trt"
    plan = ddim_plan(Schedule.make("linear", 10), 2)
    runners = [eng.runner(2, plan, True), eng.runner(3, plan, False)]   # a context each, bound to its buffers
    assert len(contexts) == 2 and all(c() is not None for c in contexts)
    eng.close()
    gc.collect()
    assert all(r.closed and r.call is None for r in runners) and all(c() is None for c in contexts)
    assert net.engine is None and net.runtime is None and all(h() is None for h in held)
    with pytest.raises(EngineClosed, match="^the trt engine is closed"):
        eng.runner(2, plan, True)
