"""One Model shared by threads: any mix of methods, batches, plans and engines called from several threads at once
gives, byte for byte, the digits of the same calls made one after another."""

import random
import threading

import numpy as np
import pytest

import ddpm
from helpers import tiny_checkpoint

ENGINES = ("onnx", "runtime-torch", "torch")
DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[6:22, 12:16] = 255   # a "1"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    tiny_checkpoint(root)
    return ddpm.load(root)


def _calls() -> list[tuple[str, tuple, dict]]:
    """(method, args, kwargs): every method on every engine, at two batch sizes, guided and not, with calls that
    share a runner (the same batch and plan) and calls that do not."""
    calls = []
    for engine in ENGINES:
        common = dict(engine=engine, device="cpu")
        calls += [("generate", (6,), dict(seed=1, batch=2, steps=4, **common)),
                  ("generate", (6,), dict(seed=2, batch=2, steps=4, **common)),   # the same runner, other noise
                  ("generate", (4,), dict(seed=3, batch=3, steps=4, guidance=0.0, label=7, **common)),
                  ("generate", (4,), dict(seed=4, batch=3, sampler="ddim", steps=5, eta=0.5, uncond=True,
                                          guidance=0.0, **common))]
        edit = dict(n=3, batch=2, steps=5, **common)
        calls += [("inpaint", (DIGIT,), dict(mask="top", seed=5, resample=2, **edit)),
                  ("edit", (DIGIT,), dict(label=4, strength=0.7, seed=6, **edit)),
                  ("upscale", (DIGIT[::2, ::2],), dict(seed=7, **edit)),
                  ("restore", (DIGIT,), dict(sigma=0.3, seed=8, **edit))]
    calls += [("generate", (6,), dict(seed=s, batch=3, steps=4, engine="onnx-generator", device="cpu"))
              for s in (9, 10)]
    return calls


def _run(model, call):
    method, args, kwargs = call
    return getattr(model, method)(*args, **kwargs)


@pytest.mark.slow
def test_threads_give_the_serial_digits(model):
    calls = _calls()
    serial = [_run(model, c) for c in calls]
    threads, rounds = 3, 1
    results: dict = {}
    errors: list = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        order = list(range(len(calls))) * rounds
        random.Random(k).shuffle(order)    # every thread its own order: the same call often runs in two at once
        try:
            start.wait()
            for i in order:
                results.setdefault(i, []).append(_run(model, calls[i]))
        except BaseException as e:         # reported below, with the call's thread
            errors.append((k, e))

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    bad = []
    for i, call in enumerate(calls):
        assert len(results[i]) == threads * rounds
        for got in results[i]:
            if not np.array_equal(got, serial[i]):
                bad.append(f"{call[0]} {call[2]}: {int((got != serial[i]).sum())} pixels differ")
    assert not bad, "\n".join(bad)


def test_a_burst_of_threads_keeps_the_runner_pool_bounded(model):
    """Eight threads at once on one batch and plan each need a runner; afterwards at most max_runners stay."""
    eng = model.engine("onnx", "cpu")
    start = threading.Barrier(8)
    out: list = []

    def work(seed: int) -> None:
        start.wait()
        out.append((seed, model.generate(4, seed=seed, batch=4, steps=4, engine=eng)))

    pool = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for seed, got in out:
        assert np.array_equal(got, model.generate(4, seed=seed, batch=4, steps=4, engine=eng))
    assert sum(map(len, eng.runners.values())) <= eng.max_runners
