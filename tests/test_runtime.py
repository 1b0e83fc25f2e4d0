"""The preallocated runtime: same digits from every engine, nothing allocated in the loop, clear errors."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.profiler import ProfilerActivity, profile

from ddpm.cli import main
from ddpm.export.onnx_export import export
from ddpm.runtime.bundle import Bundle
from ddpm.runtime.engines import make_engine
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.nets import EngineUnavailable, OnnxNet, TorchNet
from ddpm.runtime.noise import make_noise
from ddpm.runtime.runner import Runner
from ddpm.runtime.samplers import ddim_plan, ddpm_plan
from helpers import tiny_checkpoint

CPU = torch.device("cpu")
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    loaded = tiny_checkpoint(root, seed=1)
    export(loaded, root / "exp", fp16=True, log=lambda *_: None)
    return loaded, Bundle.load(root / "exp", expected_hash=loaded.hash)


def _engine(name, setup, fp16=False, device=CPU):
    loaded, bundle = setup
    return make_engine(name, device, loaded.model, 10, bundle, fp16=fp16)


PLANS = {"ddim": lambda s: ddim_plan(s, 8), "ddim-eta1": lambda s: ddim_plan(s, 6, eta=1.0), "ddpm": ddpm_plan}


@pytest.mark.parametrize("plan_name, guidance, uncond", [("ddim", 0.0, False), ("ddim", 2.0, False), ("ddim", 0.0, True),
                                                          ("ddim-eta1", 2.0, False), ("ddpm", 2.0, False)])
def test_engines_give_the_same_digits(setup, plan_name, guidance, uncond):
    plan = PLANS[plan_name](setup[1].schedule)
    labels = labels_for(6, None, uncond)
    run = lambda name, fp16=False: generate(_engine(name, setup, fp16), 6, plan, labels, guidance, seed=7, batch=4,
                                            progress=False).astype(int)
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
    bundle = setup[1]
    plan = ddim_plan(bundle.schedule, 5, eta=0.5)     # stochastic and guided: every buffer in use
    # chunk=4: the guided batch of 6 runs as two slices, each bound once to views of the buffers
    r = Runner(OnnxNet(bundle.onnx_path("fp16" if fp16 else "fp32"), CPU, chunk=4), 3, plan, True, 10)
    assert len(r.net.bindings) == 2
    x_T, z = make_noise(0, 0, 3, plan.steps)
    ptrs = [b.data_ptr() for b in (r.x, r.x_in, r.eps, r.t_in, r.y_in, r.z)]
    r.load(x_T, z, torch.tensor([1, 2, 3]), 1.5)
    r._loop()   # warm-up (onnxruntime's arena)
    r.load(x_T, z, torch.tensor([1, 2, 3]), 1.5)
    assert _allocated_bytes(r._loop) == 0
    assert [b.data_ptr() for b in (r.x, r.x_in, r.eps, r.t_in, r.y_in, r.z)] == ptrs
    # and the counter does see allocations: the torch model allocates its activations in the same loop
    r2 = Runner(TorchNet(setup[0].model, CPU), 3, plan, True, 10)
    r2.load(x_T, z, torch.tensor([1, 2, 3]), 1.5)
    assert _allocated_bytes(r2._loop) > 0


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_onnx_slices_compute_the_whole_batch(setup, chunk):
    """On a CPU the network runs over slices of the batch; together they give the whole batch's eps."""
    loaded, bundle = setup
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(7, 1, 28, 28, generator=g), torch.randint(0, 100, (7,), generator=g), torch.arange(7) % 11
    eps = torch.full_like(x, float("nan"))
    net = OnnxNet(bundle.onnx_path("fp32"), CPU, chunk=chunk)
    net.bind(x, t, y, eps)
    assert len(net.bindings) == -(-7 // chunk)
    for _ in range(2):   # and again: the bindings stay valid
        eps.fill_(float("nan"))
        net()
        with torch.no_grad():
            assert torch.allclose(eps, loaded.model(x, t, y), atol=1e-4)


def test_runner_matches_reference_step_for_step(setup):
    """The in-place step and samplers.sample implement the same formula (fp64-free check at fp32)."""
    from ddpm.runtime.samplers import guided, sample

    loaded, bundle = setup
    plan = ddim_plan(bundle.schedule, 4, eta=0.7)
    x_T, z = make_noise(3, 0, 2, plan.steps)
    y = torch.tensor([4, 9])
    ref = sample(guided(loaded.model, y, 10, 1.3), x_T.clone(), plan, lambda i: z[:, i])
    out = Runner(TorchNet(loaded.model, CPU), 2, plan, True, 10).run(x_T, z, y, 1.3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_unavailable_engines_are_clear(setup):
    with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):
        _engine("trt", setup)
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        _engine("tvm", setup)
    if not HAS_GPU:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
                OnnxNet(setup[1].onnx_path("fp32"), torch.device("cuda", 0))


def test_cli_gen_engines_agree(setup, tmp_path):
    import shutil

    root = tmp_path / "ck"
    root.mkdir()
    shutil.copy(setup[0].path, root / "model.safetensors")
    args = ["gen", "--ckpt", str(root), "-n", "5", "--steps", "4", "--batch", "3", "-q", "--seed", "2"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    outs = {}
    for engine in ("torch", "onnx", "runtime-torch"):
        r = CliRunner().invoke(main, [*args, "--engine", engine, "--out", str(tmp_path / f"{engine}.npz")], env=env)
        assert r.exit_code == 0, r.output
        outs[engine] = np.load(tmp_path / f"{engine}.npz")["images"].astype(int)
    assert np.abs(outs["onnx"] - outs["torch"]).max() <= 2 and np.abs(outs["runtime-torch"] - outs["torch"]).max() <= 2
    # an explicit export folder of another checkpoint is refused with the reason
    other = tmp_path / "other"
    other.mkdir()
    tiny_checkpoint(other, seed=5)
    r = CliRunner().invoke(main, [*args, "--ckpt", str(other), "--engine", "onnx", "--export", str(setup[1].root)])
    assert r.exit_code == 1 and "not from the checkpoint asked for" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_graph_parity_and_no_allocation(setup):
    loaded, bundle = setup
    dev = torch.device("cuda")
    plan = ddim_plan(bundle.schedule, 10, eta=0.5)
    x_T, z = make_noise(0, 0, 4, plan.steps)
    y = torch.tensor([0, 1, 2, 3])
    eager = make_engine("torch", dev, loaded.model, 10).run(x_T, z, y, plan, 1.0)
    r = Runner(TorchNet(loaded.model, dev), 4, plan, True, 10, cuda_graph=True)
    first = r.run(x_T, z, y, 1.0)     # captures
    assert r.graph is not None
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    again = r.run(x_T, z, y, 1.0)     # replays
    torch.cuda.synchronize()
    # the replay itself allocates nothing; only run()'s final .cpu() copy touches host memory
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert torch.equal(first, again)
    assert (first - eager).abs().max() < 1e-3
