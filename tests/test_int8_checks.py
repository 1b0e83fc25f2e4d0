"""What a user of int8 (and of engines, export folders and hints in general) is told: a precision that contradicts
the engine given, which export folder is read, export options that shape nothing, export.json's int8 record checked
against its file, the repair that keeps what it remade byte for byte, the line that says no int8 row ran, and the
commands hints give."""

import json
import shlex
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import int8_calibration_patched
from helpers import invoke

from ddpm import api
from ddpm.errors import OptionError
from ddpm.export import cache
from ddpm.options import Sampling
from ddpm.runtime.bundle import Bundle, ExportError
from ddpm.samples import read_samples


@pytest.fixture(scope="module")
def int8_export(int8_exported):
    return int8_exported()


def _bar():
    bar = np.zeros((28, 28), np.uint8)
    bar[10:14, 4:24] = 255
    return bar


# ---------------------------------------------------------------------------------------- engine= and a precision
@pytest.mark.parametrize("has, asked", [("fp32", "int8"), ("fp16", "int8"), ("int8", "fp16"), ("fp32", "fp16")])
def test_a_precision_the_engine_given_does_not_run_is_refused(has, asked):
    """An engine object runs the precision it was made with: a precision asked for beside it that is another one is
    an OptionError naming that argument, found where every method's options are made (options.Sampling)."""
    engine = SimpleNamespace(name="onnx", precision=has)
    with pytest.raises(OptionError, match=f"runs {has}, not {asked}: leave out {asked}=True") as e:
        Sampling(engine=engine, **{asked: True})
    assert e.value.option == asked
    Sampling(engine=engine, **({has: True} if has != "fp32" else {}))   # its own precision, or none asked: taken


@pytest.mark.parametrize("method", ["generate", "edit", "inpaint", "upscale", "restore"])
def test_every_method_refuses_a_precision_its_engine_does_not_run(ckpt, tiny_export, method):
    model = api.load(ckpt, tiny_export)
    fp32 = model.engine("onnx")
    call = {"generate": lambda **k: model.generate(2, steps=2, **k),
            "edit": lambda **k: model.edit(_bar(), label=3, n=1, steps=2, **k),
            "inpaint": lambda **k: model.inpaint(_bar(), n=1, steps=2, **k),
            "upscale": lambda **k: model.upscale(_bar()[::2, ::2], n=1, steps=2, **k),
            "restore": lambda **k: model.restore(_bar(), sigma=0.3, n=1, steps=2, **k)}[method]
    for asked in ("int8", "fp16"):
        with pytest.raises(OptionError, match=f"is an fp32 onnx engine and runs fp32, not {asked}") as e:
            call(engine=fp32, **{asked: True})
        assert e.value.option == asked
    assert call(engine=fp32).shape[1:] == (28, 28)   # the engine's own precision runs


# ------------------------------------------------------------------------------------------ which folder is read
def test_a_folder_given_is_read_as_it_is_even_the_shipped_one(ckpt, int8_export, tiny_export, monkeypatch,
                                                               tmp_path):
    """--export DIR (ddpm.load(export=DIR)) reads DIR: without the precision asked for it is an error naming DIR,
    for the shipped folder too, whatever the cache folder holds; only the shipped model loaded by default reads the
    cache folder of its weights for what its folder does not ship. Here the tiny model stands in for the shipped
    one: its fp32 export is the "shipped" folder, and the cache folder of its weights holds its int8 model."""
    monkeypatch.setattr(cache, "shipped_dir", lambda: tiny_export)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # a cache of its own, which the test fills
    weights = api.load(ckpt)
    shutil.copytree(int8_export, cache.cache_folder(weights.hash))
    default = api.Model(weights.cfg, weights.hash, weights.path, tiny_export, weights.info)   # as load() makes it
    assert default.bundle(int8=True).root == cache.cache_folder(weights.hash)
    model = api.load(ckpt, tiny_export)
    for precision in ("int8", "fp16"):   # the two alike
        with pytest.raises(ExportError) as e:
            model.bundle(**{precision: True})
        assert str(e.value).startswith(f"{tiny_export} has no {precision} model: the shipped export folder holds "
                                       f"fp32 only and is never written; leave out --export"), e.value
        with pytest.raises(ExportError, match=f"has no {precision} model"):
            model.generate(2, steps=2, **{precision: True})


def test_a_copy_of_a_folder_is_read_as_the_folder(ckpt, tiny_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    for precision in ("int8", "fp16"):
        with pytest.raises(ExportError) as e:
            api.load(ckpt, copy).bundle(**{precision: True})
        assert str(e.value).startswith(f"{copy} has no {precision} model (exported: fp32); add it with "
                                       f"`ddpm export --ckpt {ckpt / 'model.safetensors'} --out {copy} --{precision}`")


def test_the_shipped_folder_given_gets_no_generator_built_for_it(tmp_path):
    shipped = api.default_export_dir()
    r = invoke("gen", "--export", shipped, "--engine", "onnx-generator", "--steps", 5, "-n", 1, "--out",
               tmp_path / "a.png")
    [line] = r.output.strip().splitlines()
    assert r.exit_code == 1 and line.startswith(f"Error: {shipped} has generators for ") and \
        "the shipped export folder is never written; leave out --export" in line, r.output


# ------------------------------------------------------------------------------------ export options without use
@pytest.mark.parametrize("given, shaped, needs", [
    (["--int8", "--sampler", "ddim", "--steps", 50], "--sampler, --steps shape the generator only", "--generator"),
    (["--spacing", "linspace"], "--spacing shapes the generator only", "--generator"),
    (["--guidance-interval", "all"], "--guidance-interval shapes the generator only", "--generator"),
    (["--guidance-rescale", 0.5], "--guidance-rescale shapes the generator only", "--generator"),
    (["--form", "unrolled"], "--form shapes the generator only", "--generator"),
    (["--batch", "1-8"], "--batch shapes the TensorRT engines only", "--trt"),
    (["--ort-web", __file__], "--ort-web shapes the web page only", "--web"),
    (["--data", "."], "--data shapes the int8 model's calibration only", "--int8"),
])
def test_export_options_that_shape_nothing_are_refused(tmp_path, given, shaped, needs):
    r = invoke("export", "--out", tmp_path / "exp", *given)
    [line] = r.output.strip().splitlines()
    assert r.exit_code == 2 and shaped in line and f"add {needs}" in line, r.output
    assert ("--int8 calibrates at the timesteps of gen's default plan (unipc, 8 steps; a distilled student's recorded "
            "plan) whatever they say" in line) == \
        ("--int8" in given), line
    assert not (tmp_path / "exp").exists()


def test_export_help_says_which_plan_int8_calibrates_at():
    text = " ".join(invoke("export", "--help").output.split())
    assert ("noised to the timesteps of the plan gen samples the model with by default (UniPC-8 trailing, or the "
            "plan a distilled student records; whatever --sampler and --steps say)") in text, text


# ------------------------------------------------------------------------------------- export.json's int8 record
def _edited(int8_export, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    meta = json.loads((copy / "export.json").read_text())
    edit(meta["files"]["int8"])
    (copy / "export.json").write_text(json.dumps(meta))
    return copy


def _q(**changes):
    return lambda f: f["quantization"].update(changes)


# (edit, what the folder's reader says); each is export.json's fault: the folder is refused when read
REFUSED = {
    "record deleted": (lambda f: f.pop("quantization"), "files.int8 records no quantization"),
    "timesteps [5000]": (_q(timesteps=[5000]), "files.int8.quantization.timesteps holds 5000, beyond the model's "
                                               "t = 0..99"),
    "a timestep twice": (_q(timesteps=[50, 50]), "files.int8.quantization.timesteps names an entry twice"),
    "tolerance raised": (lambda f: f["parity"].update(error=0.5, tolerance=10), "files.int8.parity.tolerance is 10, "
                                                                                "above its bound 0.09"),
    "bound raised": (_q(max_eps_error=0.5), "files.int8.quantization.max_eps_error must be"),
    "held-out over the bound": (_q(eps_error_held_out=0.081), "a held-out eps error of 0.081, over its bound 0.08"),
    "every Conv kept": (_q(kept_fp32=[f"c{i}" for i in range(27)]), "keeps 27 of its 27 Convs fp32"),
    "a Conv kept twice": (_q(kept_fp32=["/conv_in/Conv", "/conv_in/Conv"]), "kept_fp32 names an entry twice"),
    "sensitivity not numbers": (_q(sensitivity={"/up.0/Conv": "high"}), "quantization.sensitivity['/up.0/Conv'] must"),
}
# ... and the file's fault: the record does not describe model_int8.onnx's graph, whose int8 model is refused
MISMATCHED = {
    "kept_fp32 []": (_q(kept_fp32=[]), "files.int8.quantization.kept_fp32 is [], but model_int8.onnx keeps "
                                       "['/conv_in/Conv', '/conv_out/Conv'] fp32"),
    "another Conv kept": (_q(kept_fp32=["/conv_in/Conv", "/up.0/conv1/Conv"]), "but model_int8.onnx keeps"),
    "convs 26": (_q(convs=26), "files.int8.quantization records 26 Convs, but model_int8.onnx has 27"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_int8_record_out_of_bounds_refuses_the_folder(int8_export, tmp_path, case):
    edit, said = REFUSED[case]
    copy = _edited(int8_export, tmp_path, edit)
    with pytest.raises(ExportError) as e:
        Bundle.load(copy)
    assert said in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_an_int8_record_that_is_not_of_its_file_refuses_the_int8_model(int8_export, tmp_path, case):
    edit, said = MISMATCHED[case]
    copy = _edited(int8_export, tmp_path, edit)
    bundle = Bundle.load(copy)
    assert bundle.onnx_path("fp32")   # the fp32 model still runs
    with pytest.raises(ExportError, match="the record is not of this file") as e:
        bundle.onnx_path("int8")
    assert said in str(e.value), e.value


def test_gen_refuses_an_edited_int8_record(ckpt, int8_export, tmp_path):
    for k, (edit, said) in enumerate([REFUSED["tolerance raised"], MISMATCHED["kept_fp32 []"]]):
        copy = _edited(int8_export, tmp_path / str(k), edit)
        r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--int8", "--out",
                   tmp_path / "a.png")
        [line] = r.output.strip().splitlines()
        assert r.exit_code == 1 and said in line, r.output
        assert line.endswith(f"re-run `ddpm export --ckpt {ckpt / 'model.safetensors'} --out {copy} --int8`"), line


def _gen_records(folder):
    return [(g["name"], g.get("precision", "fp32")) for g in json.loads((folder / "export.json").read_text())
            ["generators"]]


@pytest.mark.parametrize("case", ["kept_fp32 []", pytest.param("record deleted", marks=pytest.mark.slow)])
def test_export_int8_repairs_an_edited_record_and_keeps_the_generators_of_the_same_file(ckpt, int8_export,
                                                                                       fake_mnist, tmp_path, case):
    """`export --int8` over a record that fails (MISMATCHED: the file's check; REFUSED: export.json's) says it
    repairs it, calibrates again and writes the record again; the remade model_int8.onnx is the same file (the
    calibration is deterministic), so the int8 generator that holds it is kept."""
    folder = tmp_path / "with-generators"
    shutil.copytree(int8_export, folder)
    with int8_calibration_patched():   # the generators added; the int8 model kept, not calibrated again
        r = invoke("export", "--ckpt", ckpt, "--out", folder, "--int8", "--data", fake_mnist, "--generator",
                   "--steps", 4)
    assert r.exit_code == 0, r.output
    before = json.loads((folder / "export.json").read_text())
    gens = _gen_records(folder)
    assert [p for _, p in gens] == ["fp32", "int8"]
    edit, said = {**REFUSED, **MISMATCHED}[case]
    copy = _edited(folder, tmp_path, edit)
    with int8_calibration_patched():
        r = invoke("export", "--ckpt", ckpt, "--out", copy, "--int8", "--data", fake_mnist)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [s for s in lines if s.startswith(f"repairing {copy} (") and said in s], r.output
    assert not [s for s in lines if s.startswith("model_int8.onnx: kept") or "no longer holds" in s], r.output
    after = json.loads((copy / "export.json").read_text())
    assert after["files"]["int8"] == before["files"]["int8"]   # the record again, of the same file
    assert _gen_records(copy) == gens and Bundle.load(copy).generator_path(precision="int8")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in folder.iterdir())
    if case == "kept_fp32 []":   # before the repair, the int8 generator was refused as the onnx engine's int8 is
        broken = _edited(folder, tmp_path / "broken", edit)
        with pytest.raises(ExportError, match="the record is not of this file"):
            Bundle.load(broken).generator_path(precision="int8")
        assert Bundle.load(broken).generator_path()   # the fp32 generator still runs
        r = invoke("gen", "--ckpt", ckpt, "--export", broken, "-n", 2, "--steps", 4, "--int8", "--engine",
                   "onnx-generator", "--out", tmp_path / "g.png")
        assert r.exit_code == 1 and said in r.output and not (tmp_path / "g.png").exists(), r.output


# --------------------------------------------------------------------------------------- the line: no int8 row ran
def test_the_last_line_says_when_every_row_ran_fp32(ckpt, int8_export, tmp_path):
    def line(*args):
        r = invoke(*args, "--ckpt", ckpt, "--export", int8_export, "--int8", "-q")
        assert r.exit_code == 0, r.output
        return r.output.strip().splitlines()[-1]

    assert "guidance 0.45, onnx int8) in" in line("gen", "-n", 2, "--steps", 4, "--out", tmp_path / "a.png")
    one = line("gen", "-n", 2, "--steps", 1, "--out", tmp_path / "b.npz")
    assert "onnx int8, every row fp32 at this plan) in" in one, one
    fp32 = invoke("gen", "--ckpt", ckpt, "--export", int8_export, "-n", 2, "--steps", 1, "--out", tmp_path / "c.npz")
    assert fp32.exit_code == 0, fp32.output
    assert np.array_equal(read_samples(tmp_path / "b.npz")[0], read_samples(tmp_path / "c.npz")[0])   # fp32's digits
    from PIL import Image

    Image.fromarray(_bar()).save(tmp_path / "bar.png")
    restored = line("restore", "--image", tmp_path / "bar.png", "--sigma", 0.3, "-n", 1, "--steps", 10, "--out",
                    tmp_path / "r.png")
    assert "onnx int8, every row fp32 at this plan) in" in restored, restored


# ------------------------------------------------------------------------------------------------ export hints
def test_hints_for_the_shipped_weights_name_no_checkpoint(tmp_path, monkeypatch):
    """Whether the shipped model is the default or given by its path, the command that makes its int8 model is
    the same: `ddpm export --int8` (the command's default model and folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # no int8 model of the shipped weights in it
    shipped = api.default_export_dir().parent / "default.safetensors"
    for ckpt in ([], ["--ckpt", shipped]):
        r = invoke("gen", *ckpt, "-n", 1, "--int8", "--out", tmp_path / "a.png")
        [line] = r.output.strip().splitlines()
        assert r.exit_code == 1 and line.endswith("make it with `ddpm export --int8` (calibrated on MNIST)"), line


def test_hints_name_the_checkpoint_given_and_ckpt_only_when_it_is_unknown(ckpt, int8_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    (copy / "model_int8.onnx").unlink()
    known = f"`ddpm export --ckpt {shlex.quote(str(ckpt / 'model.safetensors'))} --out {copy} --int8"
    for engine in ("onnx", "onnx-generator"):
        r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 1, "--steps", 2, "--int8", "--engine", engine,
                   "--out", tmp_path / "a.png")
        [line] = r.output.strip().splitlines()
        assert r.exit_code == 1 and known in line and "CKPT" not in line, line
    with pytest.raises(ExportError) as e:   # a reader that knows no checkpoint: CKPT, and what it stands for
        Bundle.load(copy).onnx_path("fp16")
    assert f"`ddpm export --ckpt CKPT --out {copy} --fp16`, CKPT the checkpoint this folder was exported from " \
           f"(model.safetensors, checkpoint_hash" in str(e.value), e.value


# ------------------------------------------------------------------------------------------- the generator's plan
@pytest.mark.parametrize("options, option", [(["--sampler", "ddim", "--eta", 1], "--eta"),
                                             (["--sampler", "ddpm"], "--sampler"),
                                             (["--fp16"], "--fp16"), (["--device", "cuda"], "--device")])
def test_the_generator_refuses_options_as_usage_errors(ckpt, tmp_path, options, option):
    r = invoke("gen", "--ckpt", ckpt, "--engine", "onnx-generator", *options, "-n", 1, "--out", tmp_path / "a.png")
    [line] = r.output.strip().splitlines()
    assert r.exit_code == 2 and line.startswith(f"Error: Invalid value for {option}: the onnx-generator engine"), \
        r.output


def test_the_api_names_the_argument_the_generator_refuses(ckpt):
    model = api.load(ckpt)
    for kw, option in ((dict(sampler="ddim", eta=1.0), "eta"), (dict(fp16=True), "fp16")):
        with pytest.raises(OptionError) as e:
            model.generate(1, engine="onnx-generator", **kw)
        assert e.value.option == option, e.value


# --------------------------------------------------------------------------------------------- the class cycle
def test_the_class_cycle_follows_the_sample_index(ckpt, tiny_export):
    """Sample k of a seed is the same digit whatever n and start: without labels its class is k % classes."""
    model = api.load(ckpt, tiny_export)
    whole = model.generate(32, seed=5, steps=2)
    assert np.array_equal(model.generate(16, seed=5, steps=2, start=16), whole[16:])
    assert np.array_equal(model.generate(5, seed=5, steps=2, start=13, batch=2), whole[13:18])


@pytest.mark.parametrize("has", ["fp16", "int8"])
def test_a_precision_refused_explicitly_beside_an_engine_of_it_is_refused(has):
    """fp16=False (or int8=False) given beside an fp16 (int8) engine object ran that engine's precision silently:
    a precision given explicitly must be the engine's, whichever way it is given. Left out, the engine's runs."""
    engine = SimpleNamespace(name="onnx", precision=has)
    with pytest.raises(OptionError, match=f"is an {has} onnx engine and runs {has}: leave out {has}=False") as e:
        Sampling.of({"engine": engine, has: False}, given={has})
    assert e.value.option == has
    Sampling.of({"engine": engine}, given=set())
    Sampling.of({"engine": engine, "fp16": False, "int8": False}, given={"fp16" if has == "int8" else "int8"})
