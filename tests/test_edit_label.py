"""The editing commands' default label: the class the shipped classifier's ONNX copy reads from the input (upscale),
the unconditional model when it is unsure or on --uncond / uncond=True (and for inpaint, restore and edit)."""

import subprocess
from dataclasses import replace
import sys

import numpy as np
import pytest
from PIL import Image

import ddpm
from ddpm import pipeline
from ddpm.options import EDITING, Sampling
from ddpm.runtime.classifier import (CLASSIFIER_ONNX, MIN_PROB, ClassifierError, OnnxClassifier, read_labels)
from ddpm.runtime.edits import downsample, half_mask, inpaint_job, restore_job, upscale_job
from helpers import invoke


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """The first 256 real MNIST test digits and their labels (digit 0 is a clear 7)."""
    from ddpm.train.data import load_mnist

    x, y = load_mnist(mnist_dir, "test")
    return x[:256], y[:256]


@pytest.fixture(scope="module")
def tiny(ckpt):
    return ddpm.load(ckpt)


BLANK = np.zeros((28, 28), np.uint8)   # no digit: the classifier reads a 1 with p = 0.35


def test_onnx_classifier_matches_torch(digits):
    """The shipped ONNX file (sha256 as recorded) gives PyTorch's logits on real digits and on random pictures."""
    from ddpm.evaluation import load_classifier
    from ddpm.evaluation.export_classifier import TOLERANCE, compare

    pictures = np.concatenate([digits[0], np.random.default_rng(0).integers(0, 256, (16, 28, 28), np.uint8),
                               BLANK[None]])
    figures = compare(load_classifier(), CLASSIFIER_ONNX, pictures)
    assert figures["max_abs_logit_diff"] <= TOLERANCE and figures["argmax_agree"] == 1.0, figures
    assert np.array_equal(OnnxClassifier().logits(pictures), OnnxClassifier(sha256=None).logits(pictures))
    assert (read_labels(digits[0]).classes == digits[1]).mean() > 0.97


def test_damaged_classifier_file_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "classifier.onnx"
    bad.write_bytes(CLASSIFIER_ONNX.read_bytes()[:-10])
    with pytest.raises(ClassifierError, match="damaged .*reinstall the package") as e:
        OnnxClassifier(bad)
    assert "\n" not in str(e.value)


def test_reading_a_label_imports_no_torch():
    code = ("import sys, numpy as np, ddpm; from ddpm.runtime.classifier import read_labels; "
            "r = read_labels(np.zeros((2, 28, 28), np.uint8)); assert r.probs.shape == (2,); "
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _small(picture):
    """The picture's 14x14 box average, rounded: upscale's input."""
    return np.clip(np.rint(downsample(picture[None], 2)[0]), 0, 255).astype(np.uint8)


def _jobs(model, picture):
    """(plan, EditJob) of each edit of one picture, as the CLI builds them: upscale reads a label, the others none."""
    plans = pipeline.plans(model, Sampling(sampler="ddim", steps=2))
    return {"upscale": upscale_job(plans, _small(picture)[None], 2),
            "inpaint": inpaint_job(plans, picture[None], half_mask("bottom", 28)[None]),
            "restore": restore_job(plans, model.schedule, picture[None], 0.3)}


def test_default_label_is_the_class_read_from_a_clear_digit(tiny, digits):
    seven = digits[0][0]
    assert digits[1][0] == 7
    opts = Sampling(sampler="ddim", steps=2)
    jobs = _jobs(tiny, seven)
    plan, edit = jobs.pop("upscale")
    job = pipeline.Job.of(tiny, 3, plan, None, False, opts, edit=edit)
    assert job.labels(0, 3).tolist() == [7, 7, 7] and job.guided and job.reading.probs[0] >= MIN_PROB
    off = pipeline.Job.of(tiny, 3, plan, None, True, opts, edit=edit)               # uncond: the null label
    assert off.labels(0, 3).tolist() == [-1] * 3 and not off.guided and off.reading is None
    for mode, (plan, edit) in jobs.items():                                        # inpaint, restore: none read
        job = pipeline.Job.of(tiny, 3, plan, None, False, opts, edit=edit)
        assert job.labels(0, 3).tolist() == [-1] * 3 and not job.guided and job.reading is None, mode


def _ambiguous(digits):
    """Test digit 92 (a 9) box-averaged to 7x7 and enlarged to 28x28 by pixel repetition: the classifier reads a 3
    with p = 0.25, the least probability of the first 200 such inputs."""
    small = np.clip(np.rint(downsample(digits[0][92:93], 4)), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(small[0], 4, axis=0), 4, axis=1)


def test_ambiguous_input_falls_back_to_the_unconditional_model(tiny, digits):
    assert read_labels(_ambiguous(digits)[None]).probs[0] < MIN_PROB
    plan, edit = _jobs(tiny, _ambiguous(digits))["upscale"]
    job = pipeline.Job.of(tiny, 2, plan, None, False, Sampling(sampler="ddim", steps=2), edit=edit)
    assert job.labels(0, 2).tolist() == [-1, -1] and not job.guided
    assert "ambiguous" in job.reading.describe() and "unconditional" in job.reading.describe()


def _cli(ckpt, picture, tmp_path, name, *extra):
    """`ddpm upscale --factor 2` of the picture's 14x14 average: (its output, the npz)."""
    Image.fromarray(_small(picture)).save(tmp_path / "in.png")
    r = invoke("upscale", "--ckpt", ckpt, "--image", tmp_path / "in.png", "--factor", 2, "-n", 2, "--steps", 3,
               "--seed", 4, "--engine", "torch", "--out", tmp_path / f"{name}.npz", *extra)
    assert r.exit_code == 0, r.output
    return r.output, np.load(tmp_path / f"{name}.npz")


def test_cli_says_which_label_it_read_and_uses_it_as_label_would(ckpt, digits, tmp_path):
    out, read = _cli(ckpt, digits[0][0], tmp_path, "read")
    assert "label 7 read from the input by the classifier (p=1.00)" in out and "; label 7, guidance 0.45" in out
    assert read["labels"].tolist() == [7, 7]
    _, given = _cli(ckpt, digits[0][0], tmp_path, "given", "--label", 7)
    assert np.array_equal(read["images"], given["images"])                 # the read label is --label's
    out, quiet = _cli(ckpt, digits[0][0], tmp_path, "quiet", "-q")
    assert "read from the input" not in out and np.array_equal(quiet["images"], read["images"])


def test_cli_uncond_gives_the_unconditional_models_digits(ckpt, tiny, digits, tmp_path):
    """--uncond: every result from the null label, unguided: the digits of the runtime's own unconditional run."""
    from ddpm.runtime.generate import generate

    out, off = _cli(ckpt, digits[0][0], tmp_path, "off", "--uncond")
    assert "read from the input" not in out and "; unconditional, torch" in out and off["labels"].tolist() == [-1] * 2
    opts = replace(EDITING, steps=3, seed=4, eta=1.0)   # upscale's defaults
    plan, edit = upscale_job(pipeline.plans(tiny, opts), _small(digits[0][0])[None], 2)
    ref = generate(tiny.engine("torch"), 2, plan, np.full(2, -1), 0.45, seed=4, image_shape=tiny.image_shape,
                   job=edit, progress=False)
    ref = edit.finish(ref, 0, 2)                        # fitted to the block means, as saved
    assert np.array_equal(off["images"], ref)
    _, read = _cli(ckpt, digits[0][0], tmp_path, "read")
    assert not np.array_equal(off["images"], read["images"])
    r = invoke("upscale", "--ckpt", ckpt, "--image", tmp_path / "in.png", "--factor", 2, "--uncond", "--label", 3)
    assert r.exit_code == 2 and "--label and --uncond exclude each other" in r.output


def test_cli_ambiguous_input_says_so_and_runs_unconditionally(ckpt, digits, tmp_path):
    out, amb = _cli(ckpt, _ambiguous(digits), tmp_path, "amb")
    assert "the input is ambiguous (the classifier reads 3 with p=0.25 < 0.3)" in out and "; unconditional" in out
    _, off = _cli(ckpt, _ambiguous(digits), tmp_path, "off", "--uncond")
    assert amb["labels"].tolist() == [-1, -1] and np.array_equal(amb["images"], off["images"])


def test_api_reads_one_label_per_picture_and_says_which(tiny, digits):
    stack = np.stack([_small(digits[0][0]), _small(_ambiguous(digits)), _small(digits[0][1])])   # a 7, ?, a 2
    out = tiny.upscale(stack, 2, steps=3, engine="torch")
    assert out.labels.tolist() == [7, -1, 2] and out.reading.classes.tolist() == [7, 3, 2]
    given = tiny.upscale(stack, 2, steps=3, engine="torch", label=[7, 7, 2])
    assert np.array_equal(out[[0, 2]], given[[0, 2]])                     # the read pictures: their labels
    off = tiny.upscale(stack, 2, steps=3, engine="torch", uncond=True)   # the unsure one: the null label's eps
    assert off.labels.tolist() == [-1] * 3 and off.reading is None
    assert np.abs(out[1].astype(int) - off[1]).max() <= 1
    for other in (tiny.edit(digits[0][0], n=1, steps=2, engine="torch"),             # SDEdit, restoration and
                  tiny.restore(digits[0][0], 0.3, n=1, steps=2, engine="torch"),     # inpainting read none
                  tiny.inpaint(digits[0][0], n=1, steps=2, resample=1, engine="torch")):
        assert other.labels.tolist() == [-1] and other.reading is None


def test_a_model_whose_classes_are_not_mnists_digits_is_not_read(tmp_path, digits):
    """The classifier reads MNIST's ten digits: a model of other classes (5 here, or a diffusers model, whose classes
    need not be digits) gets the unconditional model, never the classifier's class as its label (a read 8 was an
    out-of-range label for a model of one class)."""
    import dataclasses

    from helpers import TINY, tiny_checkpoint

    five = ddpm.load(tiny_checkpoint(tmp_path, seed=1, cfg=dataclasses.replace(TINY, num_classes=5)).path)
    assert not pipeline.reads_digits(five)
    plan, edit = _jobs(five, digits[0][0])["upscale"]
    job = pipeline.Job.of(five, 2, plan, None, False, Sampling(sampler="ddim", steps=2), edit=edit)
    assert job.labels(0, 2).tolist() == [-1, -1] and not job.guided and job.reading is None
    # on the torch engine: the label is the same input to every engine, and the default one would export first (~3 s)
    assert five.upscale(_small(digits[0][0]), 2, n=1, steps=2, engine="torch").labels.tolist() == [-1]
