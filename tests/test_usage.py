"""Options and requests that cannot give a right answer are refused before any work, in one line: non-finite
numbers, seeds beyond 2^64-1, unknown devices, --uncond with --guidance, impossible memory or image sizes; results
that come out NaN are never saved; a model with T < 50 runs with the defaults; -n streams into an .npz."""

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
import torch

from ddpm.runtime import generate as gen_mod
from ddpm.runtime.engine import Supports
from ddpm.runtime.generate import OutOfMemory, iter_generate
from ddpm.runtime.samplers import ddim_plan, ddpm_plan
from ddpm.runtime.schedule import Schedule
from ddpm.samples import read_samples, save_samples
from helpers import MNIST, TINY, invoke, tiny_checkpoint

BIG_SEED = 2 ** 70


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A model with T = 10 < 50, the default number of DDIM steps."""
    root = tmp_path_factory.mktemp("ck10")
    tiny_checkpoint(root, cfg=dataclasses.replace(TINY, timesteps=10))
    return root


def usage_error(r, option):
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert option in r.output, r.output


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255   # a "1": a picture without a digit is refused
    Image.fromarray(digit).save(tmp_path / "d.png")
    return tmp_path / "d.png"


def _commands(ckpt, png, tmp_path):
    return {"gen": ["gen", "--ckpt", ckpt, "-n", 1, "--out", tmp_path / "x.png"],
            "inpaint": ["inpaint", "--ckpt", ckpt, "--image", png, "-n", 1, "--out", tmp_path / "y.png"],
            "edit": ["edit", "--ckpt", ckpt, "--image", png, "-n", 1, "--out", tmp_path / "e.png"],
            "upscale": ["upscale", "--ckpt", ckpt, "--image", png, "--factor", 2, "-n", 1, "--out", tmp_path / "u.png"],
            "restore": ["restore", "--ckpt", ckpt, "--image", png, "--sigma", 0.3, "-n", 1, "--out",
                        tmp_path / "r.png"],
            "eval": ["eval", "--ckpt", ckpt, "-n", 2],
            "bench": ["bench", "--ckpt", ckpt, "--quick", "--out", tmp_path / "b"],
            "train": ["train", "--out", tmp_path / "r", "--preset", "tiny", "--steps", 1]}


@pytest.mark.parametrize("cmd, args, option", [
    ("gen", ["--guidance", "nan"], "--guidance"), ("gen", ["--guidance", "inf"], "--guidance"),
    ("gen", ["--eta", "nan"], "--eta"), ("inpaint", ["-w", "nan"], "--guidance"),
    ("eval", ["--eta", "nan"], "--eta"), ("bench", ["--guidance", "inf"], "--guidance"),
    ("train", ["--lr", "nan"], "--lr"), ("train", ["--lr", "inf"], "--lr"), ("train", ["--ema", "nan"], "--ema"),
    ("train", ["--p-uncond", "nan"], "--p-uncond"),
    ("edit", ["--strength", "nan"], "--strength"), ("edit", ["--label", 3, "-w", "inf"], "--guidance"),
    ("upscale", ["--eta", "nan"], "--eta"), ("restore", ["--sigma", "nan"], "--sigma"),
    ("restore", ["--sigma", "inf"], "--sigma"), ("inpaint", ["--eta", "inf"], "--eta"),
] + [(c, ["--seed", BIG_SEED], "--seed") for c in ("gen", "inpaint", "edit", "upscale", "eval", "train")]
  + [(c, ["--device", d], "--device") for c in ("gen", "inpaint", "edit", "restore", "eval", "bench", "train")
     for d in ("tpu", "meta", "mps")])
def test_bad_options_are_usage_errors(ckpt, png, tmp_path, cmd, args, option):
    usage_error(invoke(*_commands(ckpt, png, tmp_path)[cmd], *args), option)


@pytest.mark.slow
def test_largest_seed_works(ckpt, tmp_path):
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--seed", 2 ** 64 - 1, "--out", tmp_path / "x.npz", "-q")
    assert r.exit_code == 0, r.output


def test_uncond_with_explicit_guidance_is_refused(ckpt, tmp_path):
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--uncond", "--guidance", 2, "--out", tmp_path / "x.npz")
    assert r.exit_code == 2 and "--uncond samples have none" in r.output
    r = invoke("eval", "--ckpt", ckpt, "-n", 2, "--uncond", "-w", 1)
    assert r.exit_code == 2 and "--uncond samples have none" in r.output
    for extra in ([], ["--guidance", 0]):   # the default, or an explicit 0, is fine
        r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--uncond", *extra, "--out", tmp_path / "x.npz", "-q")
        assert r.exit_code == 0, r.output
    assert "refused with it" in " ".join(invoke("gen", "--help").output.split())


def test_edit_without_label_and_explicit_guidance_is_refused(ckpt, png, tmp_path, monkeypatch):
    """`edit`, `restore` and `inpaint` without --label, and `upscale` with --uncond, use the unconditional model,
    which guidance would silently not touch."""
    monkeypatch.setattr(gen_mod, "iter_generate", None)      # refused before any work
    for cmd in ("edit", "upscale", "restore", "inpaint"):
        r = invoke(*_commands(ckpt, png, tmp_path)[cmd], *(["--uncond"] if cmd == "upscale" else []), "--guidance", 2)
        assert r.exit_code == 2 and "give --label, or leave out --guidance" in r.output, r.output


@pytest.mark.slow
def test_short_model_runs_with_default_steps(short_ckpt, png, tmp_path):
    r = invoke("gen", "--ckpt", short_ckpt, "-n", 3, "--out", tmp_path / "x.npz", "-q")
    assert r.exit_code == 0 and "unipc8-trailing" in r.output, r.output   # 8 <= T = 10 steps
    r = invoke("inpaint", "--ckpt", short_ckpt, "--image", png, "-n", 2, "--out", tmp_path / "i.png")
    assert r.exit_code == 0 and "ddim10" in r.output, r.output           # the edits' DDIM: 50 capped at T
    r = invoke("bench", "--ckpt", short_ckpt, "--engines", "onnx", "--batch", 1, "--repeat", 1, "--out", tmp_path / "b")
    assert r.exit_code == 0 and json.loads((tmp_path / "b" / "bench.json").read_text())["steps"] == 8, r.output


def test_grid_of_too_many_digits_is_refused_before_work(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(gen_mod, "iter_generate", None)
    r = invoke("gen", "--ckpt", ckpt, "-n", 10001, "--out", tmp_path / "x.png")
    usage_error(r, "-n")
    assert "use --out x.npz" in r.output


def test_batch_that_cannot_fit_fails_before_allocating(ckpt, tmp_path, monkeypatch):
    plan = ddpm_plan(Schedule.make("linear", 1000))
    host, eng = gen_mod.batch_bytes(plan, 4096, MNIST, guided=True)
    # DDPM-1000 at batch 4096: the noise table alone is 4096 x 999 x 784 float32 (12.2 GiB), twice (host + runner)
    assert host == 4096 * 1000 * 784 * 4 and eng > 4096 * 999 * 784 * 4
    monkeypatch.setattr(gen_mod, "available_memory", lambda device="cpu", cuda=None: 8 * 2 ** 30)
    with pytest.raises(OutOfMemory, match=r"batch 4096 of ddpm-small .* needs 24\.\d GiB of host memory, more than "
                                          r"the 8\.0 GiB available; lower --batch \(at most \d+ fit\)"):
        gen_mod.check_batch_fits(plan, 4096, MNIST)

    class NoAlloc:
        name, device, supports = "never", "cpu", Supports(edits=False, states=False)

        def run(self, *a, **k):
            raise AssertionError("allocated and ran")

    monkeypatch.setattr(gen_mod, "make_noise", lambda *a, **k: pytest.fail("noise allocated"))
    with pytest.raises(OutOfMemory):
        next(iter_generate(NoAlloc(), 4096, plan, np.zeros(4096, np.int64), 1.0, batch=4096, progress=False,
                           image_shape=MNIST))
    monkeypatch.setattr(gen_mod, "available_memory", lambda device="cpu", cuda=None: 2 ** 20)   # 1 MiB left
    r = invoke("gen", "--ckpt", ckpt, "-n", 64, "--sampler", "ddpm", "--batch", 64, "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "lower --batch" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.npz").exists()


def test_evaluate_and_eval_share_one_limit_on_n(ckpt, tmp_path, monkeypatch):
    """ddpm.evaluate of a broadcast view of one digit (784 bytes that declare 10**8 digits), `ddpm eval -n` and
    `ddpm eval --samples` meet one limit, with one line, before the data, the classifier or the model is read."""
    import ddpm
    from ddpm.samples import save_samples

    monkeypatch.setattr(gen_mod, "available_memory", lambda device="cpu", cuda=None: 2 ** 28)
    n = 10 ** 8
    with pytest.raises(OutOfMemory) as e:
        ddpm.evaluate(np.broadcast_to(np.zeros((28, 28), np.uint8), (n, 28, 28)), np.broadcast_to(np.int64(0), (n,)),
                      data=tmp_path / "nodata", download=False)
    line = str(e.value)
    assert line.startswith(f"evaluating {n} samples needs ") and "evaluate fewer samples (at most" in line, line
    r = invoke("eval", "--ckpt", ckpt, "-n", n, "--data", tmp_path / "nodata")
    assert r.exit_code == 1 and r.output.strip() == f"Error: {line}", r.output
    k = 150_000   # more than fit in 256 MiB at evaluation.SAMPLE_BYTES each; a 118 MB file read, not scored
    save_samples(tmp_path / "s.npz", np.zeros(k, np.int64), [np.zeros((10_000, 28, 28), np.uint8)] * 15)
    r = invoke("eval", "--samples", tmp_path / "s.npz", "--data", tmp_path / "nodata")
    assert r.exit_code == 1 and f"Error: evaluating {k} samples needs " in r.output, r.output


class NoScan(np.ndarray):
    """An array whose values must not be looked at: min, max and all raise."""

    def min(self, *a, **k):
        raise AssertionError("a value scan ran")

    max = all = min


def test_shape_limits_come_before_any_value_scan(monkeypatch):
    """A np.broadcast_to view declaring 2**40 digits is refused from the shapes alone: ddpm.evaluate's N limit, and a
    sequence of labels longer than any call's results, before any array's values are scanned (NoScan: numpy's
    asarray keeps it)."""
    import ddpm
    from ddpm.arguments import checked

    real = np.asarray
    monkeypatch.setattr(np, "asarray", lambda v, *a, **k: real(v, *a, **k).view(NoScan) if isinstance(v, NoScan)
                        else real(v, *a, **k))
    n = 2 ** 40
    labels = np.broadcast_to(np.int64(0), (n,)).view(NoScan)
    with pytest.raises(OutOfMemory, match=f"^evaluating {n} samples needs "):
        ddpm.evaluate(np.broadcast_to(np.zeros((28, 28), np.uint8), (n, 28, 28)), labels, download=False)

    @checked
    def draw(n=1, label=None):
        return n

    with pytest.raises(ddpm.DdpmError, match=f"label holds {n} labels, more than the "):
        draw(2, label=labels)
    with pytest.raises(AssertionError, match="a value scan ran"):   # the scans still run once the limits pass
        ddpm.evaluate(np.zeros((2, 28, 28), np.uint8), labels[:2], download=False)
    with pytest.raises(AssertionError, match="a value scan ran"):
        draw(2, label=labels[:2])


def test_editing_stacks_are_refused_from_their_shape(ckpt, monkeypatch):
    """A broadcast view declaring 2**30 pictures (or masks), given to any editing method, is refused at once from its
    shape (the memory its pictures and results need, or more than one call's results), before any picture is read:
    no loop over its pictures."""
    import ddpm
    from ddpm.runtime import images

    monkeypatch.setattr(gen_mod, "available_memory", lambda device="cpu", cuda=None: 2 ** 28)

    def unread(a, where, option="image"):
        raise AssertionError(f"{where} was read")

    real = images.picture
    monkeypatch.setattr(images, "check_dark_background", unread)
    monkeypatch.setattr(images, "picture", lambda image, option="image", **k: unread(image, option) if
                        option == "mask" else real(image, option, **k))
    model = ddpm.load(ckpt)
    H, W = model.image_shape[1:]
    digit = np.zeros((H, W), np.uint8)
    stack = np.broadcast_to(digit, (2 ** 30, H, W))
    for method, kw in (("restore", dict(sigma=0.3)), ("inpaint", {}), ("edit", dict(label=1)), ("upscale", {}),
                       ("inpaint_input", dict(mask="bottom"))):
        with pytest.raises(OutOfMemory, match=f"^a stack of {2 ** 30} pictures \\(image\\) needs .*give fewer "
                                              f"image pictures \\(at most"):
            getattr(model, method)(stack, steps=2, **kw) if method != "inpaint_input" else model.inpaint_input(stack, **kw)
        with pytest.raises(ddpm.DdpmError, match=f"^image is a stack of {2 ** 33} pictures, more than the "):
            getattr(model, method)(np.broadcast_to(digit, (2 ** 33, H, W)), **dict(kw, sigma=0.3) if method ==
                                   "restore" else kw)
    monkeypatch.setattr(images, "check_dark_background", lambda a, where, option="image": a)
    with pytest.raises(ddpm.DdpmError, match=f"^{2 ** 30} masks for 1 pictures"):
        model.inpaint(digit, mask=np.broadcast_to(digit > 0, (2 ** 30, H, W)), steps=2)
    with pytest.raises(OutOfMemory, match=f"^holding {2 ** 32} samples needs "):   # before the label is read
        model.upscale(digit, n=2 ** 32, steps=2)


class ZeroEngine:
    """A stand-in engine: returns its starting noise scaled to the data range (fast, finite)."""

    name, device, supports = "zero", "cpu", Supports(edits=False, states=False)

    def run(self, x_T, z, labels, plan, guidance, callback=None):
        return np.tanh(x_T)


@pytest.mark.slow
def test_npz_output_streams_instead_of_holding_everything(tmp_path):
    from ddpm.runtime.images import to_uint8
    from ddpm.runtime.noise import slots

    n, batch = 6000, 40
    plan = ddim_plan(Schedule.make("linear", 10), 1)
    by_range = lambda lo, hi: np.arange(lo, hi) % 10        # labels too are made per batch
    stream = lambda k, path: save_samples(path, by_range, iter_generate(ZeroEngine(), k, plan, by_range, batch=batch,
                                                                        progress=False, image_shape=MNIST), n=k)
    stream(3, tmp_path / "warm.npz")                         # imports and first-use allocations
    tracemalloc.start()
    stream(n, tmp_path / "s.npz")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * 28 * 28 / 4      # far below the 4.7 MB that holding the images takes
    images, labels = read_samples(tmp_path / "s.npz")
    assert images.shape == (n, 28, 28) and np.array_equal(labels, np.arange(n) % 10)
    for k in (0, 39, 40, n - 1):       # sample k is the engine's output for its own noise, wherever its batch
        assert np.array_equal(images[k], to_uint8(np.tanh(slots(0, k, 0, 1, MNIST)))[0])


def test_nan_samples_are_never_saved(ckpt, tmp_path, monkeypatch):
    from ddpm.runtime import runner

    monkeypatch.setattr(runner.RuntimeEngine, "run", lambda self, x_T, *a, **k: x_T * np.nan)
    out = tmp_path / "x.png"
    r = invoke("gen", "--ckpt", ckpt, "-n", 4, "--steps", 2, "--out", out, "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "came out NaN or inf" in r.output and "nothing was saved" in r.output and "likely cause" in r.output
    assert not out.exists()


@pytest.mark.slow
def test_export_verification_fails_on_non_finite_outputs(ckpt, tmp_path):
    """A NaN model agrees with its NaN ONNX export 'to 0' (max() over NaN differences): refused instead."""
    from ddpm.export.onnx_export import ExportFailed, to_onnx, verify
    from ddpm.model.io import load_model

    model = load_model(ckpt).model
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    to_onnx(model, tmp_path / "m.onnx", "fp32")
    with pytest.raises(ExportFailed, match="not finite"):
        verify(tmp_path / "m.onnx", model, "fp32", 100)


def test_eval_samples_refuses_every_option_that_makes_samples(tmp_path, monkeypatch):
    """`eval --samples F` scores F as it is: each of eval's options that makes samples (-n, --uncond, the model, the
    sampler, the seed, the engine, ...: every one but those that score, say where the scores go or how the command
    runs) given with it is a usage error naming it, before anything is read; the scoring options are taken."""
    import ddpm.evaluation as evaluation
    from ddpm.cli_tools import _SCORING, eval_cmd

    monkeypatch.setattr(evaluation, "evaluate_sets", lambda *a, **k: [{"name": "s", "n": 2}])
    monkeypatch.setattr(evaluation, "format_table", lambda rows: "table")
    save_samples(tmp_path / "s.npz", np.zeros(2, np.int64), [np.zeros((2, 28, 28), np.uint8)])
    (tmp_path / "w.safetensors").write_bytes(b"x")
    (tmp_path / "exp").mkdir()   # an input that exists: a missing one is refused as such first
    given = {"steps": 3, "spacing": "trailing", "ckpt": tmp_path / "w.safetensors", "export_dir": tmp_path / "exp",
             "guidance": 1.0, "num": 5}
    making = [p for p in eval_cmd.params if p.name not in _SCORING]
    assert {p.name for p in making} >= {"num", "uncond", "sampler", "steps", "seed", "guidance", "engine", "ckpt"}
    for p in making:
        value = [] if p.is_flag else [given.get(p.name, p.default)]
        r = invoke("eval", "--samples", tmp_path / "s.npz", p.opts[0], *value)
        [line] = r.output.strip().splitlines()
        flag = max(p.opts, key=len)
        assert r.exit_code == 2 and line.startswith(f"Error: {flag} makes the samples"), (p.name, r.output)
    r = invoke("eval", "--samples", tmp_path / "s.npz", "-n", 3, "--uncond", "--seed", 1)
    assert r.exit_code == 2 and "-n" in r.output and "--uncond, --seed" in r.output, r.output
    r = invoke("eval", "--samples", tmp_path / "s.npz", "--threads", 1, "-q", "--json", tmp_path / "q.json")
    assert r.exit_code == 0 and (tmp_path / "q.json").is_file(), r.output


def test_eval_of_one_sample_is_the_same_usage_error_as_n_1(tmp_path):
    """Fewer than two samples, as a file or as -n: exit 2 and an "Invalid value" line naming the option, before any
    work."""
    save_samples(tmp_path / "one.npz", np.zeros(1, np.int64), [np.zeros((1, 28, 28), np.uint8)])
    for args, option in ((("--samples", tmp_path / "one.npz"), "--samples"), (("-n", 1), "-n")):
        r = invoke("eval", *args)
        [line] = r.output.strip().splitlines()
        assert r.exit_code == 2 and line.startswith("Error: Invalid value for") and option in line, r.output


def test_bench_int8_without_an_int8_model_is_one_line_not_an_empty_table(ckpt, tmp_path):
    """`bench --int8` measures the onnx engine's int8 model: with none made (`ddpm export --int8`), one line and exit
    1 before any engine is timed, no results written; without onnx among --engines, a usage error."""
    r = invoke("bench", "--ckpt", ckpt, "--int8", "--engines", "onnx", "--quick", "--out", tmp_path / "b")
    [line] = r.output.strip().splitlines()
    assert r.exit_code == 1 and line.startswith("Error: no int8 model"), r.output
    assert f"`ddpm export --ckpt {ckpt / 'model.safetensors'} --int8`" in line, r.output   # the cache folder's
    assert not (tmp_path / "b" / "bench.json").exists()
    r = invoke("bench", "--ckpt", ckpt, "--int8", "--engines", "torch", "--quick", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "add onnx to --engines" in r.output, r.output
    r = invoke("bench", "--ckpt", ckpt, "--int8", "--fp16", "--engines", "onnx", "--quick", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "choose one precision" in r.output, r.output   # as gen, edit and eval refuse it


def test_an_error_after_a_progress_bar_starts_its_own_line(ckpt, tmp_path, monkeypatch):
    """A command stopped while its progress bar is drawn (here the npz write fails after the first batch, as on a full
    disk): the bar's last `\\r` line is ended, so the error line begins a line (`grep '^Error'` finds it in a log)."""
    import ddpm.samples
    from ddpm.files import OutputError

    def failing(out, labels, batches, **kw):
        next(iter(batches))
        raise OutputError(f"cannot write {out}: no space left on the device")

    monkeypatch.setattr(ddpm.samples, "save_samples", failing)
    r = invoke("gen", "--ckpt", ckpt, "-n", 4, "--batch", 2, "--steps", 2, "--engine", "torch", "--out",
               tmp_path / "x.npz")
    assert r.exit_code == 1 and "step" in r.output, r.output                       # the bar was drawn
    assert [line for line in r.output.splitlines() if "Error" in line] == \
        [f"Error: cannot write {tmp_path / 'x.npz'}: no space left on the device"], repr(r.output)
