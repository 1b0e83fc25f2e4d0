"""A model without classes (num_classes 1, whose class 0 is not the digit 0) is drawn unconditionally for scoring:
decided by pipeline.eval_uncond, which `ddpm eval` calls, with options.Sampling.of's refusal of a guidance scale
given for samples without labels (options.check_guidance) and one line that says so."""

import dataclasses

import pytest

from ddpm import pipeline
from ddpm.errors import OptionError
from ddpm.options import Sampling
from helpers import TINY, invoke, tiny_checkpoint


class Classes:
    def __init__(self, n):
        self.cfg = dataclasses.replace(TINY, num_classes=n)


@pytest.mark.parametrize("cli, flag, uncond", [(False, "guidance", "uncond=True"), (True, "--guidance", "--uncond")])
def test_a_model_without_classes_is_drawn_unconditionally(cli, flag, uncond):
    said = []
    assert pipeline.eval_uncond(Classes(1), False, Sampling(), set(), cli, said.append) is True
    assert said == ["this model has no classes: its samples are drawn and scored unconditionally (class histogram), "
                    f"as with {uncond}"]
    # a guidance scale left at its default, or an explicit 0, is no fault; --uncond says nothing
    assert pipeline.eval_uncond(Classes(1), False, Sampling(guidance=0.0), {"guidance"}, cli) is True
    said.clear()
    assert pipeline.eval_uncond(Classes(1), True, Sampling(guidance=2.0), {"guidance"}, cli, said.append) is True
    assert said == []
    with pytest.raises(OptionError) as e:
        pipeline.eval_uncond(Classes(1), False, Sampling(guidance=2.0), {"guidance"}, cli, said.append)
    assert e.value.option == "guidance" and said == []
    assert str(e.value) == ("this model has no classes, so its samples are unconditional and guidance has no label "
                            f"to steer towards: leave out {flag} (or give 0)")
    # a model with classes: as asked
    for asked in (False, True):
        assert pipeline.eval_uncond(Classes(10), asked, Sampling(guidance=2.0), {"guidance"}, cli, said.append) is asked
    assert said == []


def test_eval_refuses_guidance_for_a_model_without_classes_before_any_work(tmp_path):
    """The refusal is Sampling.of's kind: a usage error naming --guidance, one line, before MNIST is looked at."""
    loaded = tiny_checkpoint(tmp_path, cfg=dataclasses.replace(TINY, num_classes=1))
    r = invoke("eval", "--ckpt", loaded.path, "--data", tmp_path / "no-mnist", "--engine", "torch", "-n", 20,
               "--guidance", 1)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: Invalid value for --guidance: this "
                                                                         "model has no classes, so"), r.output
    assert "guidance has no label to steer towards: leave out --guidance (or give 0)" in lines[0], r.output
    assert not (tmp_path / "no-mnist").exists()
