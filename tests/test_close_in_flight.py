"""Model.close() while other threads generate: every call still returns the digits of a serial call, with no error;
an engine closed while it runs frees what it holds when the run ends. And the sampling options that contradict each
other (two precisions; guidance without labels) are refused before any work, in the API as in the CLI."""

import threading
import time

import numpy as np
import pytest

import ddpm
from ddpm.errors import OptionError
from ddpm.options import Sampling
from ddpm.pipeline import JobEngine
from ddpm.runtime.engine import EngineClosed
from helpers import invoke, slow_except, tiny_checkpoint

ENGINES = ("torch", "runtime-torch", "onnx", "onnx-generator")
CALL = dict(seed=5, batch=2, steps=4, device="cpu")
DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[6:22, 12:16] = 255


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("closing")
    tiny_checkpoint(root)
    m = ddpm.load(root)
    yield m
    m.close()


@pytest.mark.parametrize("engine", slow_except(ENGINES, "onnx"))
def test_close_while_threads_generate(model, engine):
    ref = model.generate(4, engine=engine, **CALL)
    results, errors, stop = [], [], threading.Event()

    def work():
        while not stop.is_set():
            try:
                results.append(np.array_equal(model.generate(4, engine=engine, **CALL), ref))
            except BaseException as e:   # noqa: BLE001 - any error at all fails the test
                errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    # 1.5 s of closes, and on until the threads have made 6 calls (on a loaded machine 1.5 s held 5; 60 s at most)
    while (time.monotonic() - t0 < 1.5 or len(results) < 6) and time.monotonic() - t0 < 60:
        model.close()
        time.sleep(0.003)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, sorted(set(errors))[:3]
    assert len(results) >= 6 and all(results), (engine, len(results), results.count(False))


def _plan_run(model, eng, callback=None):
    from ddpm.runtime.noise import make_noise

    plan = model.plan("ddim", 4)
    x_T, z = make_noise(0, 0, 2, plan.num_slots, model.image_shape)
    return eng.run(x_T, z, np.array([1, 2]), plan, 0.0, callback=callback)


@pytest.mark.parametrize("engine", ["torch", "runtime-torch"])
def test_close_during_a_run_lets_it_finish(model, engine):
    """close() from another thread in the middle of a run: the run ends with the digits of an undisturbed one; the
    engine is closed at once (new work refused) and freed once the run has ended."""
    from ddpm.runtime.engines import make_engine

    make = lambda: make_engine(engine, model=model.torch_model, null_label=model.null_label)
    with make() as eng:
        ref = _plan_run(model, eng)
    eng = make()
    midway, closed = threading.Event(), threading.Event()

    def callback(i, t, x, x0):
        if i == 1:
            midway.set()
            assert closed.wait(10)

    out = {}
    runner = threading.Thread(target=lambda: out.setdefault("x", _plan_run(model, eng, callback)))
    runner.start()
    assert midway.wait(30)
    eng.close()
    assert eng.closed
    if engine == "torch":
        assert eng.model is not None    # still running on it
    closed.set()
    runner.join()
    assert np.array_equal(out["x"], ref)
    with pytest.raises(EngineClosed):   # the engine's own close(): refused afterwards
        _plan_run(model, eng)
    if engine == "torch":
        assert eng.model is None        # freed after the run


def test_a_job_whose_engine_the_model_closed_runs_on_a_new_one(model):
    """The window between a job picking its engine up and running a batch on it: Model.close() there costs the job
    nothing (a new engine runs the batch); the engine itself, used directly, refuses."""
    ref = _plan_run(model, model.engine("torch", "cpu"))
    job = JobEngine(model, dict(name="torch", device="cpu", max_batch=64))
    held = model.engine("torch", "cpu")
    model.close()
    assert np.array_equal(_plan_run(model, job), ref)
    with pytest.raises(EngineClosed):
        _plan_run(model, held)


def test_two_precisions_refused_before_any_file(model, ckpt, tmp_path):
    with pytest.raises(OptionError, match="choose one precision") as e:
        model.generate(2, int8=True, fp16=True)   # the tiny model has no int8 export: refused before looking
    assert e.value.option == "int8"
    with pytest.raises(OptionError, match="int8 runs on the onnx engine"):
        model.generate(2, int8=True, engine="torch")
    for extra, message in ((["--fp16"], "choose one precision"),
                           (["--engine", "torch"], "int8 runs on the onnx engine")):
        r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--int8", *extra, "--out", tmp_path / "a.png")
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert "ddpm export --int8" not in r.output and "has no generator" not in r.output


def test_the_sampling_options_refuse_guidance_without_labels():
    """The options value finds the fault when it is built, for the API and the CLI alike (each in its own words);
    a guidance left at its default, or an explicit 0, is no fault."""
    for cli, words in ((False, "uncond=True samples have none"), (True, "give --label, or leave out --guidance")):
        with pytest.raises(OptionError, match=words) as e:
            Sampling.of({"guidance": 2.0, "seed": 1}, {"guidance"}, labelled=False, cli=cli)
        assert e.value.option == "guidance"
    assert Sampling.of({"guidance": 2.0}, {"seed"}, labelled=False).guidance == 2.0
    assert Sampling.of({"guidance": 0.0}, {"guidance"}, labelled=False).guidance == 0.0
    assert Sampling.of({"guidance": 2.0}, {"guidance"}).guidance == 2.0


def test_api_refuses_guidance_without_labels(model):
    for call in (lambda: model.generate(2, uncond=True, guidance=2.0, steps=2),
                 lambda: model.edit(DIGIT, guidance=2.0, n=1, steps=2),
                 lambda: model.restore(DIGIT, sigma=0.3, guidance=2.0, n=1, steps=2)):
        with pytest.raises(OptionError, match="uncond=True samples have none") as e:
            call()
        assert e.value.option == "guidance"
    # the default guidance, or an explicit 0, is fine
    assert model.generate(2, uncond=True, steps=2, engine="torch", device="cpu").shape == (2, 28, 28)
    assert model.generate(2, uncond=True, guidance=0.0, steps=2, engine="torch", device="cpu").shape == (2, 28, 28)
