"""runtime.generate refuses what an engine declares it cannot do with an OptionError naming the option to change,
before any noise is drawn (the CLI reports it against that option, the API as a DdpmError)."""

from types import SimpleNamespace

import numpy as np
import pytest

import ddpm
from ddpm.errors import OptionError
from ddpm.runtime.engine import Supports
from ddpm.runtime.generate import generate
from helpers import MNIST


class WholeLoop:
    """An engine that runs whole plans in one call (as onnx-generator): no edits, no states, one plan."""

    name, device, dtype = "whole-loop", "cpu", "float32"

    def __init__(self, plan_key=None):
        self.supports = Supports(edits=False, states=False, plan_key=plan_key)

    def run(self, *a, **k):
        raise AssertionError("refused before any run")


@pytest.fixture(scope="module")
def plan():
    return ddpm.load().plan("ddim", 2)


def test_an_edit_is_refused_naming_engine(plan):
    job = SimpleNamespace(projection=object(), num_slots=0)   # an edit's job: only its projection is looked at
    with pytest.raises(OptionError, match="cannot project onto a known image.*row by row") as e:
        generate(WholeLoop(), 2, plan, np.array([1, 2]), 1.0, progress=False, job=job, image_shape=MNIST)
    assert e.value.option == "engine"


def test_a_watch_is_refused_naming_trajectory(plan):
    with pytest.raises(OptionError, match="cannot show every step") as e:
        generate(WholeLoop(), 2, plan, np.array([1, 2]), 1.0, progress=False, watch=lambda i, t, x, x0: None,
                 image_shape=MNIST)
    assert e.value.option == "trajectory"


def test_another_plan_is_refused_naming_engine(plan):
    with pytest.raises(OptionError, match="runs one plan, not ddim") as e:
        generate(WholeLoop(plan_key="another plan"), 2, plan, np.array([1, 2]), 1.0, progress=False, image_shape=MNIST)
    assert e.value.option == "engine"


@pytest.mark.parametrize("args, option", [
    (["--eta", "1"], "--eta"), (["--eta", "1", "--sampler", "dpm++2m"], "--eta"),
    (["--variance", "large", "--sampler", "unipc"], "--variance"), (["--variance", "large", "--sampler", "ddim"],
                                                                   "--variance"),
    (["--uncond", "--guidance-rescale", "0.7"], "--guidance-rescale"),
    (["--guidance-rescale", "0.5", "--guidance", "0"], "--guidance-rescale")])
def test_a_setting_that_would_change_nothing_is_a_usage_error(args, option, tmp_path):
    """--eta with a sampler other than DDIM, --variance large with one other than DDPM, --guidance-rescale without
    guidance (unconditional samples, or w = 0) were accepted and ignored, exit 0 (a user asking for --eta 1 got
    deterministic digits), while --spacing with DDPM was refused: each is one usage line naming the option."""
    from helpers import invoke

    r = invoke("gen", "-n", 1, *args, "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and f"Invalid value for {option}" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "x.png").exists()


def test_the_api_refuses_them_too():
    import ddpm
    from ddpm.errors import OptionError

    model = ddpm.load()
    for kw, option in ((dict(eta=1.0), "eta"), (dict(sampler="ddim", variance="large"), "variance"),
                       (dict(uncond=True, guidance_rescale=0.5), "guidance_rescale")):
        with pytest.raises(OptionError) as e:
            model.generate(1, **kw)
        assert e.value.option == option
    assert model.plan(sampler="ddim", steps=4, eta=1.0).name.startswith("ddim4-eta1")


def test_model_plan_refuses_another_samplers_setting():
    """Model.plan, the API's other way to a plan, refuses what generate refuses: eta != 0 without DDIM, variance
    large without DDPM (they were ignored); the editing commands' default eta 1 is not passed to another sampler."""
    import ddpm
    from ddpm.errors import OptionError

    model = ddpm.load()
    for kw, option in ((dict(sampler="unipc", eta=0.5), "eta"), (dict(sampler="ddim", variance="large"), "variance")):
        with pytest.raises(OptionError) as e:
            model.plan(**kw)
        assert e.value.option == option
    assert model.plan(sampler="ddpm", variance="large").name.startswith("ddpm")
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    assert model.inpaint(digit, n=1, sampler="unipc", steps=2, engine="onnx").shape[0] == 1


def test_a_students_recorded_plan_is_what_the_settings_are_checked_against(tmp_path):
    """A distilled student records DDIM and guidance 0 (options.recorded_plan): --eta is DDIM's setting and applies
    (it was refused as if the sampler were the default UniPC), and --guidance-rescale with no guidance to rescale is
    refused (it was accepted and ignored), by gen, export, bench and the API alike."""
    import ddpm
    from helpers import invoke
    from test_distill import _student_file

    path = _student_file(tmp_path / "student.safetensors")
    model = ddpm.load(path)
    assert model.generate(2, eta=0.5, engine="torch").shape == (2, 28, 28)
    with pytest.raises(ddpm.DdpmError, match="the guidance scale is 0"):
        model.generate(2, guidance_rescale=0.5)
    r = invoke("gen", "--ckpt", path, "-n", 1, "--engine", "torch", "--eta", "0.5", "--out", tmp_path / "a.png")
    assert r.exit_code == 0 and "ddim2-eta0.5-trailing" in r.output, r.output
    for args in (["gen", "-n", 1, "--out", tmp_path / "b.png"], ["export", "--generator", "--out", tmp_path / "e"],
                 ["bench", "--quick", "--engines", "torch"]):
        r = invoke(*args[:1], "--ckpt", path, *args[1:], "--guidance-rescale", "0.5")
        assert r.exit_code == 2 and "Invalid value for --guidance-rescale" in r.output, (args, r.output)
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "e").exists()
