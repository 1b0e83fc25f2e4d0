"""A job's batch holds a use of the Model's engine (runtime.engine.EngineCache): Model.close() between the job
picking its engine up and the batch starting on it closes that engine only when the batch ends. Driven by a stand-in
engine whose run waits on an Event, so the close lands in that window every time, with no clock."""

import threading

import numpy as np
import pytest

from ddpm import pipeline
from ddpm.api import Model
from ddpm.model.config import ModelConfig
from ddpm.runtime.engine import CountedEngine, EngineClosed, Supports

ARGS = dict(name="torch", device="cpu", max_batch=64)


class Gated(CountedEngine):
    """An engine whose run waits for `go` before it starts its batch (where a real engine refuses a closed one)."""

    name, device, dtype = "torch", "cpu", "float32"
    supports = Supports(edits=False, states=False)

    def __init__(self, picked: threading.Event, go: threading.Event):
        self._init_uses()
        self.picked, self.go, self.freed = picked, go, False

    def run(self, x_T, *args, **kwargs):
        self.picked.set()
        assert self.go.wait(30)
        with self.in_use():
            return x_T + 1

    def versions(self):
        return {}

    def _free(self):
        self.freed = True


@pytest.fixture
def gated(monkeypatch):
    """(model, the engines it made, picked, go): every engine the Model makes is a Gated one."""
    picked, go, made = threading.Event(), threading.Event(), []

    def make(*args, **kwargs):
        made.append(Gated(picked, go))
        return made[-1]

    monkeypatch.setattr(pipeline, "open_engine", make)
    return Model(ModelConfig(), "0" * 64, None), made, picked, go


def test_model_close_in_the_window_waits_for_the_batch(gated):
    model, made, picked, go = gated
    job = pipeline.JobEngine(model, ARGS)
    held = model.engine(**ARGS)
    assert made == [held]
    out = {}
    batch = threading.Thread(target=lambda: out.setdefault("x", job.run(np.zeros(2))))
    batch.start()
    assert picked.wait(30)      # the job has picked its engine up; its batch has not started
    model.close()
    assert not held.closed      # in use: closed when the batch ends, not under it
    go.set()
    batch.join()
    assert np.array_equal(out["x"], np.ones(2)) and made == [held]   # one engine: the batch never met a closed one
    assert held.closed and held.freed
    with pytest.raises(EngineClosed):
        held.run(np.zeros(2))
    assert np.array_equal(job.run(np.zeros(2)), np.ones(2)) and len(made) == 2 and not made[1].closed


def test_model_close_without_a_batch_closes_at_once(gated):
    model, made, picked, go = gated
    go.set()
    job = pipeline.JobEngine(model, ARGS)
    model.close()
    assert made[0].closed and made[0].freed
    assert np.array_equal(job.run(np.zeros(2)), np.ones(2)) and len(made) == 2   # the next batch: a new engine
    model.close()
    model.close()
    assert made[1].closed


def test_an_engine_closed_by_its_holder_is_replaced(gated):
    """Model.engine's engine closed directly (not by the Model): the next job and the next Model.engine make a new
    one."""
    model, made, picked, go = gated
    go.set()
    model.engine(**ARGS).close()
    job = pipeline.JobEngine(model, ARGS)
    assert len(made) == 2 and np.array_equal(job.run(np.zeros(2)), np.ones(2)) and len(made) == 2
    made[1].close()
    assert np.array_equal(job.run(np.zeros(2)), np.ones(2)) and len(made) == 3


def test_making_an_engine_holds_up_no_batch(gated, monkeypatch):
    """A batch on an engine already made runs while another thread makes another engine (an export, a TensorRT
    build); close() waits for that make."""
    model, made, picked, go = gated
    go.set()
    job = pipeline.JobEngine(model, ARGS)
    building, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        building.set()
        assert release.wait(30)
        return Gated(picked, go)

    monkeypatch.setattr(pipeline, "open_engine", slow)
    other = threading.Thread(target=lambda: model.engine(**ARGS, threads=2))
    other.start()
    assert building.wait(30)
    out = {}
    batch = threading.Thread(target=lambda: out.setdefault("x", job.run(np.zeros(2))))
    batch.start()
    batch.join(10)
    closing = threading.Thread(target=model.close)
    closing.start()
    closing.join(0.2)
    assert not batch.is_alive() and np.array_equal(out["x"], np.ones(2))
    assert closing.is_alive() and not made[0].closed   # waits for the make in progress
    release.set()
    other.join()
    closing.join(10)
    assert not closing.is_alive() and made[0].closed
