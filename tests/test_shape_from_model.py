"""The image shape comes from the model: the runtime takes it as a required argument (no MNIST default that a
model of another size would silently get), and `ddpm bench` times the model's own shape."""

import dataclasses
import inspect

import pytest

from ddpm import pipeline
from ddpm.bench import speed
from ddpm.runtime import edits, generate, noise, runner
from ddpm.runtime.samplers import ddim_plan
from ddpm.runtime.schedule import Schedule
from helpers import TINY

TAKES_THE_SHAPE = [(noise.make_noise, "shape"), (noise.slots, "shape"), (generate.batch_bytes, "image_shape"),
                   (generate.check_batch_fits, "image_shape"), (generate.iter_generate, "image_shape"),
                   (generate.generate, "image_shape"), (runner.Runner, "image_shape"),
                   (runner.RuntimeEngine, "image_shape"), (edits.Projection.validate, "image_shape"),
                   (edits.half_mask, "size"), (pipeline.save, "image_shape"), (pipeline.Job, "image_shape")]


@pytest.mark.parametrize("fn, name", TAKES_THE_SHAPE, ids=lambda v: getattr(v, "__qualname__", v))
def test_the_image_shape_is_required(fn, name):
    assert inspect.signature(fn).parameters[name].default is inspect.Parameter.empty


def test_bench_times_the_models_image_shape():
    """time_run draws the noise of the model's (C, H, W) and labels among its classes."""
    cfg = dataclasses.replace(TINY, image_size=32, in_channels=3, num_classes=4)
    seen = {}

    class Recorder:
        def run(self, x_T, z, labels, plan, guidance):
            seen.update(x_T=x_T.shape, labels=labels.tolist())

    plan = ddim_plan(Schedule.make("linear", 100), 2)
    assert speed.time_run(Recorder(), 6, plan, 1.0, 0, "cpu", cfg) >= 0
    assert seen == {"x_T": (6, 3, 32, 32), "labels": [0, 1, 2, 3, 0, 1]}
