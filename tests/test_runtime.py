"""The preallocated runtime: same digits from every engine, nothing allocated in the loop, clear errors."""

import ast
import gc
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ddpm.model.io import load_model
from ddpm.runtime.bundle import Bundle
from ddpm.runtime.eager import guided, sample
from ddpm.runtime.engine import Engine, EngineClosed
from ddpm.runtime.engines import engine_versions, make_engine
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.nets import EngineUnavailable, OnnxNet, TorchNet
from ddpm.runtime.noise import make_noise
from ddpm.runtime.runner import Runner
from ddpm.runtime.samplers import ddim_plan, ddpm_plan, dpmpp_2m_plan, unipc_plan
from helpers import MNIST, invoke, slow_except, tiny_checkpoint, traced_peak

CPU = "cpu"
HAS_GPU = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_exported):
    root = tiny_exported(fp16=True)   # the export test_export.py reads too: made once a session
    loaded = load_model(root)
    return loaded, Bundle.load(root / "exp", expected_hash=loaded.hash)


def _engine(name, setup, fp16=False, device=CPU, max_batch=512):
    loaded, bundle = setup
    return make_engine(name, device=device, model=loaded.model, bundle=bundle, fp16=fp16, max_batch=max_batch)


PLANS = {"ddim": lambda s: ddim_plan(s, 8), "ddim-eta1": lambda s: ddim_plan(s, 6, eta=1.0), "ddpm": ddpm_plan,
         "dpm++2m": lambda s: dpmpp_2m_plan(s, 6), "unipc": lambda s: unipc_plan(s, 6),
         # guidance only on the rows with sigma in (0.5, 5]: the last three of six (the runner's half-batch call)
         "dpm++2m-gi": lambda s: dpmpp_2m_plan(s, 6).with_guidance_interval(0.5, 5.0),
         "unipc-gi": lambda s: unipc_plan(s, 6).with_guidance_interval(0.5, 5.0),
         "ddim-trailing-gi": lambda s: ddim_plan(s, 6, spacing="trailing").with_guidance_interval(0.5, 5.0)}


@pytest.mark.slow
@pytest.mark.parametrize("plan_name, guidance, uncond", [
    ("ddim", 0.0, False), ("ddim", 2.0, False), ("ddim", 0.0, True), ("ddim-eta1", 2.0, False), ("ddpm", 2.0, False),
    ("dpm++2m", 0.0, False), ("dpm++2m", 2.0, False), ("unipc", 0.0, True), ("unipc", 2.0, False),
    ("dpm++2m-gi", 2.0, False), ("unipc-gi", 2.0, False), ("ddim-trailing-gi", 2.0, False)])
def test_engines_give_the_same_digits(setup, plan_name, guidance, uncond):
    plan = PLANS[plan_name](setup[1].schedule)
    labels = labels_for(6, None, uncond)
    run = lambda name, fp16=False: generate(_engine(name, setup, fp16), 6, plan, labels, guidance, seed=7, batch=4,
                                            progress=False, image_shape=MNIST).astype(int)
    ref = run("torch")
    assert ref.std() > 5   # not a blank image: the comparison means something
    for name in ("runtime-torch", "onnx"):
        assert np.abs(run(name) - ref).max() <= 2, name            # fp32: within a few grey levels
    # fp16: a small mean difference (guidance w=2 amplifies eps errors up to 1 + 2w times)
    assert np.abs(run("onnx", fp16=True) - ref).mean() <= 2.0


def _allocated_bytes(fn) -> int:
    """Bytes allocated by torch's CPU allocator while fn runs (the profiler's memory accounting)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("fp16", [False, True])
def test_onnx_loop_allocates_nothing(setup, fp16):
    """The numpy runner's loop allocates no array: its traced peak stays below one image (784 floats), while the
    same measure sees every image-sized temporary of a naive numpy update."""
    bundle = setup[1]
    plan = ddim_plan(bundle.schedule, 5, eta=0.5)     # stochastic and guided: every buffer in use
    # chunk=4: the guided batch of 6 runs as two slices, each bound once to views of the buffers
    r = Runner(OnnxNet(bundle.onnx_path("fp16" if fp16 else "fp32"), CPU, chunk=4), 3, plan, True, 10, MNIST)
    assert len(r.call.bindings) == 2
    x_T, z = make_noise(0, 0, 3, plan.num_slots, MNIST)
    bufs = lambda: [b.ctypes.data for b in (r.x, r.x_in, r.eps, r.t_in, r.y_in, r.z, *r.x0)]
    ptrs = bufs()
    labels = np.array([1, 2, 3])
    r.load(x_T, z, labels, 1.5)
    r.loop()   # warm-up (onnxruntime's arena)
    r.load(x_T, z, labels, 1.5)
    assert traced_peak(r.loop) < 784 * 4   # no image-sized temporary (a few small Python objects at most)
    assert bufs() == ptrs
    # and the measure does see allocations: x = w x + s z written naively makes image-sized temporaries
    assert traced_peak(lambda: [r.x * 0.5 + 0.1 * r.z[0] for _ in range(3)]) >= 3 * 784 * 4


@pytest.mark.slow
def test_torch_runner_loop_allocates_only_in_the_network(setup):
    """runtime-torch: with a network that writes eps in place, the loop allocates nothing at all."""
    loaded = setup[0]
    plan = ddim_plan(setup[1].schedule, 5, eta=0.5)
    net = TorchNet(loaded.model, CPU)
    net.bind = lambda x_in, t_in, y_in, eps_out, last_t=-1: (lambda: eps_out.neg_())   # an allocation-free "network"
    r = Runner(net, 3, plan, True, 10, MNIST)
    x_T, z = make_noise(0, 0, 3, plan.num_slots, MNIST)
    r.load(x_T, z, np.array([1, 2, 3]), 1.5)
    assert _allocated_bytes(r.loop) == 0
    r2 = Runner(TorchNet(loaded.model, CPU), 3, plan, True, 10, MNIST)   # the real model allocates its activations
    r2.load(x_T, z, np.array([1, 2, 3]), 1.5)
    assert _allocated_bytes(r2.loop) > 0


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_onnx_slices_compute_the_whole_batch(setup, chunk):
    """On a CPU the network runs over slices of the batch; together they give the whole batch's eps."""
    loaded, bundle = setup
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1, 28, 28), dtype=np.float32)
    t, y = rng.integers(0, 100, 7).astype(np.int64), np.arange(7, dtype=np.int64) % 11
    eps = np.full_like(x, np.nan)
    net = OnnxNet(bundle.onnx_path("fp32"), CPU, chunk=chunk)
    call = net.bind(x, t, y, eps)
    assert len(call.bindings) == -(-7 // chunk)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    for _ in range(2):   # and again: the bindings stay valid
        eps.fill(np.nan)
        call()
        assert np.allclose(eps, ref, atol=1e-4)


@pytest.mark.parametrize("plan_name", ["ddim-eta0.7", "unipc-gi"])
@pytest.mark.parametrize("net", slow_except(["runtime-torch", "onnx"], "onnx"))
def test_runner_matches_reference_step_for_step(setup, net, plan_name):
    """The in-place step and eager.sample implement the same formula (noise, history, guidance interval)."""
    loaded, bundle = setup
    plan = (ddim_plan(bundle.schedule, 4, eta=0.7) if plan_name == "ddim-eta0.7"
            else unipc_plan(bundle.schedule, 5).with_guidance_interval(0.5, 5.0))
    x_T, z = make_noise(3, 0, 2, plan.num_slots, MNIST)
    y = np.array([4, 9])
    noise = None if z is None else (lambda s: torch.from_numpy(z)[:, s])
    ref = sample(guided(loaded.model, torch.from_numpy(y), 10, 1.3), torch.from_numpy(x_T), plan, noise).numpy()
    n = TorchNet(loaded.model, CPU) if net == "runtime-torch" else OnnxNet(bundle.onnx_path("fp32"), CPU)
    out = Runner(n, 2, plan, True, 10, MNIST).run(x_T, z, y, 1.3)
    assert np.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("name", slow_except(["runtime-torch", "onnx"], "onnx"))
def test_run_returns_a_copy(setup, name):
    """run() hands back an array that the next run cannot overwrite (on the CPU too)."""
    eng = _engine(name, setup)
    plan = ddim_plan(setup[1].schedule, 3)
    a_T, _ = make_noise(0, 0, 2, 0, MNIST)
    b_T, _ = make_noise(1, 0, 2, 0, MNIST)
    a = eng.run(a_T, None, np.array([1, 2]), plan, 0.0)
    keep = a.copy()
    b = eng.run(b_T, None, np.array([1, 2]), plan, 0.0)
    assert np.array_equal(a, keep) and not np.array_equal(a, b)
    r = eng.runner(2, plan, False)
    assert not np.shares_memory(a, r.ops.to_host(r.x)) if name == "onnx" else a.ctypes.data != r.x.data_ptr()


def test_unavailable_engines_are_clear(setup):
    with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):
        _engine("trt", setup)
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        _engine("tvm", setup)
    if not HAS_GPU:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
                OnnxNet(setup[1].onnx_path("fp32"), "cuda:0")


@pytest.mark.slow
def test_cli_gen_engines_agree(setup, tmp_path):
    import shutil

    root = tmp_path / "ck"
    root.mkdir()
    shutil.copy(setup[0].path, root / "model.safetensors")
    args = ["gen", "--ckpt", str(root), "-n", "5", "--steps", "4", "--batch", "3", "-q", "--seed", "2"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    outs = {}
    for engine in ("torch", "onnx", "runtime-torch"):
        r = invoke(*args, "--engine", engine, "--out", tmp_path / f"{engine}.npz", env=env)
        assert r.exit_code == 0, r.output
        outs[engine] = np.load(tmp_path / f"{engine}.npz")["images"].astype(int)
    assert np.abs(outs["onnx"] - outs["torch"]).max() <= 2 and np.abs(outs["runtime-torch"] - outs["torch"]).max() <= 2
    # an explicit export folder of another checkpoint is refused with the reason
    other = tmp_path / "other"
    other.mkdir()
    tiny_checkpoint(other, seed=5)
    r = invoke(*args, "--ckpt", other, "--engine", "onnx", "--export", setup[1].root)
    assert r.exit_code == 1 and "not from the checkpoint asked for" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("plan_name", ["ddim-eta0.5", "unipc-gi"])
def test_cuda_graph_parity_and_no_allocation(setup, plan_name):
    loaded, bundle = setup
    dev = "cuda"
    plan = (ddim_plan(bundle.schedule, 10, eta=0.5) if plan_name == "ddim-eta0.5"
            else unipc_plan(bundle.schedule, 8).with_guidance_interval(0.5, 5.0))
    x_T, z = make_noise(0, 0, 4, plan.num_slots, MNIST)
    y = np.array([0, 1, 2, 3])
    eager = make_engine("torch", device=dev, model=loaded.model).run(x_T, z, y, plan, 1.0)
    r = Runner(TorchNet(loaded.model, dev), 4, plan, True, 10, MNIST, cuda_graph=True)
    first = r.run(x_T, z, y, 1.0)     # captures
    assert r.graph is not None
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    again = r.run(x_T, z, y, 1.0)     # replays
    torch.cuda.synchronize()
    # the replay itself allocates nothing on the GPU; only run()'s final host copy touches host memory
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert np.array_equal(first, again)
    assert np.abs(first - eager).max() < 1e-3


# One engine object driven through a random sequence of calls: runners of one engine must never feed the network
# from each other's buffers, whatever the order of batch sizes, plans, guidance and labels.
SEQ_PLANS = {"ddim3": lambda s: ddim_plan(s, 3), "ddim5-eta1": lambda s: ddim_plan(s, 5, eta=1.0),
             "ddim4-eta0.5": lambda s: ddim_plan(s, 4, eta=0.5), "ddpm": ddpm_plan,
             "unipc5": lambda s: unipc_plan(s, 5), "dpm++2m4-gi": lambda s: dpmpp_2m_plan(s, 4).with_guidance_interval(0.5, 5.0)}


def _random_calls(n, seed):
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(n):
        if calls and rng.random() < 0.2:
            calls.append(calls[int(rng.integers(len(calls)))])        # an exact repeat of an earlier call
            continue
        plan = str(rng.choice(list(SEQ_PLANS), p=[0.2, 0.2, 0.2, 0.05, 0.2, 0.15]))
        calls.append((int(rng.integers(1, 10)), plan, float(rng.choice([0.0, 1.5])), bool(rng.random() < 0.75),
                      int(rng.integers(0, 3))))
    return calls


ON_GPU = [pytest.param(name, fp16, "cuda", marks=pytest.mark.gpu)
          for name in ("runtime-torch", "onnx", "trt") for fp16 in (False, True)]


@pytest.mark.parametrize("name, fp16, device",
                         [("runtime-torch", False, CPU), ("onnx", False, CPU), ("onnx", True, CPU), *ON_GPU])
@pytest.mark.slow
def test_any_sequence_of_calls_gives_the_eager_digits(setup, name, fp16, device):
    if device == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    bundle = setup[1]
    plans = {k: f(bundle.schedule) for k, f in SEQ_PLANS.items()}
    try:
        eng = _engine(name, setup, fp16, device, max_batch=18)   # on a GPU: CUDA graphs, each runner captured once
    except EngineUnavailable as e:
        pytest.skip(f"{name} is not available here: {e}")
    ref_eng = _engine("torch", setup, device=device)
    reference = {}
    for k, (batch, plan, w, cond, seed) in enumerate(_random_calls(32, seed=11)):
        p = plans[plan]
        x_T, z = make_noise(seed, 0, batch, p.num_slots, MNIST)
        labels = (np.arange(batch) + seed) % 10 if cond else None
        key = (batch, plan, w, cond, seed)
        if key not in reference:
            reference[key] = ref_eng.run(x_T, z, labels, p, w)
        out = eng.run(x_T, z, labels, p, w)
        diff = np.abs(np.rint(out * 127.5) - np.rint(reference[key] * 127.5))
        where = f"call {k}: batch {batch}, {plan}, w={w}, labels={cond}"
        if fp16:
            assert diff.mean() <= 2.0, where
        else:
            assert diff.max() <= 2, where
    assert len(eng.runners) <= eng.max_runners


@pytest.mark.parametrize("name", slow_except(["runtime-torch", "onnx"], "onnx"))
def test_failed_cuda_graph_capture_warns_once_and_runs_step_by_step(setup, name, monkeypatch):
    """A runner whose CUDA-graph capture fails says so once and gives the eager digits from the step-by-step loop.

    On the CPU, torch.cuda's stream and graph API is replaced by stand-ins, so the real Runner._capture runs: its
    warm-up loop on the "side stream" consumes the loaded buffers, then the capture itself fails."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def refused_capture(graph, **options):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", refused_capture)
    eng, ref_eng = _engine(name, setup), _engine("torch", setup)
    plan = ddim_plan(setup[1].schedule, 4, eta=0.5)
    x_T, z = make_noise(5, 0, 3, plan.num_slots, MNIST)
    labels = np.array([1, 2, 3])
    r = eng.runner(3, plan, True)
    r.use_graph = True                      # as on a GPU
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of the .* loop failed .*running it step by step"):
        first = eng.run(x_T, z, labels, plan, 1.5)
    assert not r.use_graph and r.graph is None
    ref = ref_eng.run(x_T, z, labels, plan, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no second warning
        again = eng.run(x_T, z, labels, plan, 1.5)
    for out in (first, again):
        assert np.abs(np.rint(out * 127.5) - np.rint(ref * 127.5)).max() <= 2


# ----------------------------------------------------------------------------------------------------- the protocol
def test_every_engine_declares_what_it_is(setup):
    for name in ("torch", "runtime-torch", "onnx"):
        with _engine(name, setup) as eng:
            assert Engine in type(eng).__mro__, name
            assert (eng.name, eng.device, eng.dtype) == (name, "cpu", "float32")
            assert eng.supports.edits and eng.supports.states and eng.supports.max_batch is None
            assert eng.supports.plan_key is None and "torch" in engine_versions(eng)
    with _engine("onnx", setup, fp16=True) as eng:
        assert eng.dtype == "float16" and "onnxruntime" in eng.versions()


def test_one_callback_sees_every_row_and_the_states_on_request(setup):
    """callback(i, t, x, x0_hat): progress only (None, None) by default; with states, host copies that agree
    across engines, the last x being the output."""
    plan = ddim_plan(setup[1].schedule, 4, eta=0.5)
    x_T, z = make_noise(2, 0, 2, plan.num_slots, MNIST)
    y = np.array([3, 8])
    rows = [(i, int(t)) for i, t in enumerate(plan.timesteps)]
    first = None
    for name in ("torch", "runtime-torch", "onnx"):
        progress, states = [], []
        with _engine(name, setup) as eng:
            eng.run(x_T, z, y, plan, 1.5, callback=lambda *a: progress.append(a))
            out = eng.run(x_T, z, y, plan, 1.5, callback=lambda *a: states.append(a), states=True)
        assert progress == [(i, t, None, None) for i, t in rows], name
        assert [s[:2] for s in states] == rows and np.array_equal(states[-1][2], out), name
        x0 = np.stack([s[3] for s in states])           # every DDIM row calls the network: an x0_hat each
        assert x0.shape == (4, 2, 1, 28, 28) and x0.dtype == np.float32
        first = x0 if first is None else first
        assert np.abs(x0 - first).max() < 1e-3, name


def test_generate_refuses_what_an_engine_does_not_support_before_any_work(setup):
    """What an engine declares (Supports) is checked before any noise is drawn: its network batch limit (a TensorRT
    engine file's range), its one plan (onnx-generator), edits and states."""
    import dataclasses

    plan = ddim_plan(setup[1].schedule, 2)
    labels = labels_for(3, None, False)
    eng = _engine("onnx", setup)
    eng.supports = dataclasses.replace(eng.supports, max_batch=4)
    with pytest.raises(EngineUnavailable, match=r"network batches up to 4, batch 3 needs 6 \(guidance doubles it\)"):
        generate(eng, 3, plan, labels, 1.0, batch=3, progress=False, image_shape=MNIST)
    unguided = generate(eng, 3, plan, labels, 0.0, batch=3, progress=False, image_shape=MNIST)
    assert unguided.shape == (3, 28, 28)   # unguided: 3
    eng.supports = dataclasses.replace(eng.supports, max_batch=None, plan_key="another plan", states=False)
    with pytest.raises(ValueError, match="runs one plan, not ddim"):
        generate(eng, 3, plan, labels, 1.0, progress=False, image_shape=MNIST)
    eng.supports = dataclasses.replace(eng.supports, plan_key=None)
    with pytest.raises(ValueError, match="cannot show every step"):
        generate(eng, 3, plan, labels, 1.0, progress=False, watch=lambda i, t, x, x0: None, image_shape=MNIST)


# ------------------------------------------------------------------------------------------------------ lifetime
@pytest.mark.parametrize("name", ["runtime-torch", "onnx"])
def test_close_frees_runners_buffers_and_the_network(setup, name):
    eng = _engine(name, setup)
    plan = ddim_plan(setup[1].schedule, 3, eta=0.5)
    x_T, z = make_noise(0, 0, 2, plan.num_slots, MNIST)
    eng.run(x_T, z, np.array([1, 2]), plan, 1.5)
    r = eng.runner(2, plan, True)
    buffers = [weakref.ref(b) for b in (r.x, r.x_in, r.eps, r.t_in, r.y_in, r.z, *r.x0)]
    network = weakref.ref(eng.net.sess if name == "onnx" else eng.net.model)   # the session, the model copy
    bindings = r.call.bindings if name == "onnx" else []
    eng.close()
    assert eng.closed and r.closed and r.call is None and not eng.runners
    del r
    gc.collect()
    assert all(b() is None for b in buffers) and network() is None
    assert all(len(b.get_outputs()) == 0 for b in bindings)   # the IO bindings were cleared


@pytest.mark.parametrize("name", ["torch", "runtime-torch", "onnx"])
def test_a_closed_engine_refuses_work_in_one_line(setup, name):
    plan = ddim_plan(setup[1].schedule, 2)
    x_T, _ = make_noise(0, 0, 2, 0, MNIST)
    with pytest.raises(RuntimeError, match="inside the block"):
        with _engine(name, setup) as eng:
            raise RuntimeError("inside the block")
    assert eng.closed                                    # `with` closed it on the way out
    eng.close()                                          # and again: nothing happens
    with pytest.raises(EngineClosed, match=rf"^the {name} engine is closed; make a new one") as e:
        eng.run(x_T, None, np.array([1, 2]), plan, 0.0)
    assert "\n" not in str(e.value)
    with pytest.raises(EngineClosed):
        generate(eng, 2, plan, labels_for(2, None, False), 0.0, progress=False, image_shape=MNIST)


def test_runners_leaving_the_pool_are_closed(setup):
    eng = _engine("onnx", setup)
    eng.max_runners = 1
    plan = ddim_plan(setup[1].schedule, 2)
    a = eng.runner(1, plan, False)
    b = eng.runner(2, plan, False)                       # the pool keeps one: a leaves it, closed
    assert a.closed and a.x is None and a.call is None and not b.closed
    assert [r for idle in eng.runners.values() for r in idle] == [b]
    eng.close()
    assert b.closed


def test_closing_during_a_run_lets_it_finish_then_frees_it(setup):
    eng, ref = _engine("onnx", setup), _engine("onnx", setup)
    plan = ddim_plan(setup[1].schedule, 3, eta=0.5)
    x_T, z = make_noise(4, 0, 2, plan.num_slots, MNIST)
    labels = np.array([5, 6])
    close_at_first_row = lambda i, t, x, x0: eng.close() if i == 0 else None
    out = eng.run(x_T, z, labels, plan, 1.5, callback=close_at_first_row)
    assert np.array_equal(out, ref.run(x_T, z, labels, plan, 1.5))
    assert eng.closed and not eng.runners and eng.net.sess is None   # freed when the run ended


def test_close_resets_the_cuda_graph(setup, monkeypatch):
    """On the CPU torch.cuda's stream and graph API is stood in (as in the capture-failure test below): the runner
    captures its loop into the stand-in graph, and closing the engine resets that graph."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        replays = resets = 0

        def replay(self):
            self.replays += 1

        def reset(self):
            self.resets += 1

    @contextlib.contextmanager
    def capture(graph, **options):
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    eng = _engine("runtime-torch", setup)
    plan = ddim_plan(setup[1].schedule, 2)
    r = eng.runner(2, plan, False)
    r.use_graph = True                                   # as on a GPU
    eng.run(*make_noise(0, 0, 2, 0, MNIST), np.array([1, 2]), plan, 0.0)
    graph = r.graph
    assert isinstance(graph, Graph) and graph.replays == 1
    eng.close()
    assert graph.resets == 1 and r.graph is None


def _imports(path: Path, package: str) -> list[str]:
    """The absolute names of the modules that a file of `package` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found += [module] if node.module else [f"{module}.{a.name}" for a in node.names]
    return found


def test_the_runtime_imports_nothing_from_export(tmp_path):
    """runtime/ runs what export/ builds; export/ hands over its builder (make_engine's build_trt), never the other
    way round."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..export.trt import a\nfrom .. import export\nimport ddpm.export.web\n"
                     "def f():\n    from .nets import b\n")
    assert _imports(probe, "ddpm.runtime") == ["ddpm.export.trt", "ddpm.export", "ddpm.export.web",
                                               "ddpm.runtime.nets"]
    bad = {p.name: [m for m in _imports(p, "ddpm.runtime") if m == "ddpm.export" or m.startswith("ddpm.export.")]
           for p in sorted((REPO / "runtime").glob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}
