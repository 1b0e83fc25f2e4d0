"""`ddpm export --int8` and the int8 precision of gen, the editing commands and the API (export/int8.py)."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import int8_calibration_patched
from helpers import invoke

from ddpm import api
from ddpm.export import int8
from ddpm.runtime import engines
from ddpm.samples import read_samples


@pytest.fixture(scope="module")
def int8_export(int8_exported):
    """The tiny model exported with --int8 (conftest.int8_exported), one copy per module."""
    return int8_exported()


def _export_int8(ckpt, out, fake_mnist, *extra):
    """`ddpm export --ckpt ckpt --out out --int8 [extra]` at int8_export's cost (its digits and bound)."""
    with int8_calibration_patched():
        return invoke("export", "--ckpt", ckpt, "--out", out, "--int8", "--data", fake_mnist, *extra)


def test_export_records_the_int8_model(int8_export):
    meta = json.loads((int8_export / "export.json").read_text())
    f = meta["files"]["int8"]
    assert f["name"] == "model_int8.onnx" and (int8_export / f["name"]).stat().st_size == f["bytes"]
    q = f["quantization"]
    assert q["data"] == "MNIST train" and q["timesteps"] and q["convs"] > 0
    assert q["kept_fp32"] == ["/conv_in/Conv", "/conv_out/Conv"] and q["convs"] > 2   # the image's Convs
    assert q["eps_error_held_out"] <= q["max_eps_error"]
    assert 0 < f["parity"]["error"] <= f["parity"]["tolerance"]   # int8 differs from fp32, within the tolerance
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_export / f["name"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_gen_and_api_run_int8_close_to_fp32(ckpt, int8_export, tmp_path):
    r = invoke("gen", "--ckpt", ckpt, "--export", int8_export, "-n", 8, "--steps", 4, "--int8",
               "--out", tmp_path / "q.npz", "-q")
    assert r.exit_code == 0, r.output
    q = read_samples(tmp_path / "q.npz")[0]
    model = api.load(ckpt, int8_export)
    fp32 = model.generate(8, steps=4, engine="onnx")
    assert np.array_equal(model.generate(8, steps=4, engine="onnx", int8=True), q)
    # the tiny random model's digits are noise, the int8 ones not its copy: on 8 digits measured mean difference
    # 1.0 grey level (an unquantized model would give 0)
    diff = np.abs(q.astype(int) - fp32).mean()
    assert 0 < diff < 8
    bar = np.zeros((28, 28), np.uint8)
    bar[10:14, 4:24] = 255
    edited = model.edit(bar, label=3, strength=0.5, n=2, steps=4, int8=True)
    assert edited.shape == (2, 28, 28)


def test_last_rows_run_fp32(ckpt, int8_export, monkeypatch):
    """Rows at sigma <= INT8_FP32_SIGMA run model.onnx: with every row there, int8 gives fp32's digits exactly."""
    model = api.load(ckpt, int8_export)
    fp32 = model.generate(4, steps=4, engine="onnx")
    monkeypatch.setattr(engines, "INT8_FP32_SIGMA", float("inf"))
    assert np.array_equal(api.load(ckpt, int8_export).generate(4, steps=4, engine="onnx", int8=True), fp32)


@pytest.mark.parametrize("steps, rows", [(1, "f"), (3, "iif"), (8, "iiiiiiff")])
def test_last_row_runs_fp32_whatever_its_sigma(ckpt, int8_export, monkeypatch, steps, rows):
    """Under int8 the rows at sigma <= INT8_FP32_SIGMA run model.onnx (the last two of UniPC-8 trailing: t = 249,
    124), and so does the plan's last network row whatever its sigma, since its x0_hat is the output: UniPC-3
    trailing (t = 999, 666, 333, sigma 1.46 at 333) runs its last row fp32, UniPC-1 its only one. rows: the model each
    network call ran, i(nt8) or f(p32)."""
    import onnxruntime as ort

    from ddpm.runtime import nets

    ran, kind = [], {}   # kind: id of each session made -> f(p32) or i(nt8), from the file it was made of
    run, make = ort.InferenceSession.run_with_iobinding, nets.ort_session

    def made(ort_, path, *a, **kw):
        sess = make(ort_, path, *a, **kw)
        kind[id(sess)] = "f" if os.path.basename(path) == "model.onnx" else "i"
        return sess

    def spy(sess, *a, **kw):
        ran.append(kind[id(sess)])
        return run(sess, *a, **kw)

    monkeypatch.setattr(nets, "ort_session", made)
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", spy)
    api.load(ckpt, int8_export).generate(2, steps=steps, engine="onnx", int8=True)
    assert "".join(ran) == rows


def test_the_last_line_and_eval_name_the_precision(ckpt, int8_export, fake_mnist, tmp_path):
    """gen and the editing commands say "onnx int8" in their last line (plain "onnx" at fp32); eval names its row
    with int8 and its JSON records precision, engine and seed (null for --samples files: not known)."""
    common = ["--ckpt", ckpt, "--export", int8_export, "-n", 2, "--steps", 2, "-q"]
    last = lambda r: r.stdout.strip().splitlines()[-1]
    for cmd in (["gen"], ["upscale", "--factor", 2, "--image", _digit(tmp_path)]):
        r = invoke(*cmd, *common, "--int8", "--out", tmp_path / "a.png")
        assert r.exit_code == 0 and "guidance 0.45, onnx int8) in" in last(r), r.output
        r = invoke(*cmd, *common, "--out", tmp_path / "a.png")
        assert r.exit_code == 0 and "guidance 0.45, onnx) in" in last(r), r.output
    r = invoke("eval", *common, "--int8", "--seed", 5, "--data", fake_mnist, "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "e.json").read_text())[0]
    assert row["name"].endswith(" w=0.45 int8") and row["name"] in r.output, r.output
    assert (row["precision"], row["engine"], row["seed"]) == ("int8", "onnx", 5)
    invoke("gen", *common, "--out", tmp_path / "s.npz")
    r = invoke("eval", "--samples", tmp_path / "s.npz", "--data", fake_mnist, "-q", "--json", tmp_path / "s.json")
    row = json.loads((tmp_path / "s.json").read_text())[0]
    assert r.exit_code == 0
    assert (row["name"], row["precision"], row["engine"], row["seed"]) == ("s.npz", None, None, None)


def _digit(tmp_path):
    """A 28x28 picture with a bar: an input for the editing commands."""
    from PIL import Image

    bar = np.zeros((28, 28), np.uint8)
    bar[10:14, 4:24] = 255
    Image.fromarray(bar).save(tmp_path / "bar.png")
    return tmp_path / "bar.png"


def test_tampered_int8_file_refused(ckpt, int8_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    data = bytearray((copy / "model_int8.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "model_int8.onnx").write_bytes(bytes(data))
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--int8", "--out", tmp_path / "a.png")
    assert r.exit_code == 1 and "sha256 differs" in r.output and "Traceback" not in r.output, r.output
    # the hint writes the file into the folder given (--out), not into the cache folder a plain export writes, from
    # the checkpoint given (--ckpt): its path, not a placeholder
    redo = f"`ddpm export --ckpt {ckpt / 'model.safetensors'} --out {copy} --int8`"
    assert f"re-run {redo}" in " ".join(r.output.split()), r.output
    (copy / "model_int8.onnx").unlink()
    for said in ("is missing", "is a folder, not a file"):
        r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--int8", "--out",
                   tmp_path / "a.png")
        line = " ".join(r.output.split())
        assert r.exit_code == 1 and said in line and redo in line, line
        (copy / "model_int8.onnx").mkdir(exist_ok=True)


def _damaged(int8_export, tmp_path, edit):
    """A copy of the int8 export whose export.json `edit(meta)` changed."""
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    meta = json.loads((copy / "export.json").read_text())
    edit(meta)
    (copy / "export.json").write_text(json.dumps(meta))
    return copy


def test_repairing_export_says_what_the_folder_lost(ckpt, int8_export, tmp_path):
    """A damaged int8 entry makes export.json refused as a whole (fp32 too), in a message naming the entry; the
    repairing `ddpm export` keeps what passes every check on its own (model.onnx, not made again) and names what the
    folder no longer holds with the command that adds it back. A damaged model.onnx entry takes int8 with it (int8
    was verified against that model)."""
    copy = _damaged(int8_export, tmp_path, lambda m: m["files"].update(int8=None))
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--out", tmp_path / "a.png")
    assert r.exit_code == 1 and "files['int8'] must be an object" in r.output, r.output
    r = invoke("export", "--ckpt", ckpt, "--out", copy)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "model.onnx: kept (made and verified before)" in said, r.output
    assert f"{copy} no longer holds model_int8.onnx (its export.json was refused: " in said, r.output
    assert "add it back with `ddpm export --ckpt " in said and f" --out {copy} --int8`" in said, r.output
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    shutil.rmtree(copy)
    copy = _damaged(int8_export, tmp_path, lambda m: m["files"]["fp32"]["parity"].update(error=1.0))
    r = invoke("export", "--ckpt", ckpt, "--out", copy)
    assert r.exit_code == 0 and "no longer holds model_int8.onnx" in r.output and "--int8`" in r.output, r.output


def test_repairing_export_keeps_the_entries_that_pass(ckpt, int8_export, tmp_path):
    """An export.json refused for one entry (here an fp16 record over its tolerance, of a file that is not there):
    the repairing `ddpm export` keeps model.onnx and model_int8.onnx, whose records and files pass every check, so
    that --int8 runs again without a new calibration, and says nothing was lost."""
    def bad_fp16(meta):
        meta["files"]["fp16"] = {**meta["files"]["fp32"], "name": "model_fp16.onnx",
                                 "parity": {**meta["files"]["fp32"]["parity"], "error": 1.0, "tolerance": 0.02}}
    copy = _damaged(int8_export, tmp_path, bad_fp16)
    sha = (copy / "model_int8.onnx").read_bytes()
    r = invoke("export", "--ckpt", ckpt, "--out", copy)
    assert r.exit_code == 0 and "model_int8.onnx: kept" in r.output and "no longer holds" not in r.output, r.output
    assert (copy / "model_int8.onnx").read_bytes() == sha
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--int8", "--out", tmp_path / "a.png")
    assert r.exit_code == 0 and "onnx int8" in r.output, r.output


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


# Each case repairs and calibrates int8 again: in the loop, repairing runs in test_repairing_export_says_what_the_folder_lost
# and test_repairing_export_keeps_the_entries_that_pass, int8 calibration in the module's int8_export
@pytest.mark.slow
@pytest.mark.parametrize("damage, member", [("missing", "model.onnx"), ("flipped", "model.onnx"),
                                            ("missing", "model_int8.onnx"), ("flipped", "model_int8.onnx")])
def test_repairing_export_remakes_a_missing_or_damaged_file(ckpt, int8_export, fake_mnist, tmp_path, member, damage):
    """export.json intact, a file it names missing or with a byte flipped: `ddpm export` into the folder says so,
    keeps what passes the readers' check (Bundle.onnx_path) and makes the rest again: a plain export remakes
    model.onnx and names model_int8.onnx as lost when it was damaged or verified against a model.onnx that was
    (with the command that adds it back); `--int8` remakes it. gen, then gen --int8, run again."""
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    if damage == "missing":
        (copy / member).unlink()
    else:
        _flip(copy / member)
    gen = lambda *a: invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, *a,
                            "--out", tmp_path / "a.png")
    r = gen("--int8")
    assert r.exit_code == 1 and ("is missing" if damage == "missing" else "sha256 differs") in r.output, r.output
    if member == "model_int8.onnx" and damage == "flipped":   # --int8 at once: model.onnx kept, int8 made again
        r = _export_int8(ckpt, copy, fake_mnist)
        said = " ".join(r.output.split())
        assert r.exit_code == 0 and f"repairing {copy} ({copy / member} is corrupted or truncated" in said, said
        assert "model.onnx: kept" in said and "model_int8.onnx: kept" not in said and "no longer" not in said, said
    else:
        r = invoke("export", "--ckpt", ckpt, "--out", copy)
        said = " ".join(r.output.split())
        assert r.exit_code == 0 and f"repairing {copy} ({copy / member} " in said, said
        assert ("model.onnx: kept" in said) == (member == "model_int8.onnx"), said
        assert f"{copy} no longer holds model_int8.onnx ({copy / member} " in said, said
        assert f" --out {copy} --int8`" in said and not (copy / "model_int8.onnx").exists(), said
        assert gen().exit_code == 0
        assert "has no int8 model" in gen("--int8").output
        r = _export_int8(ckpt, copy, fake_mnist)
        assert r.exit_code == 0 and f"repairing {copy}" not in " ".join(r.output.split()), r.output
    assert gen().exit_code == 0
    r = gen("--int8")
    assert r.exit_code == 0 and "onnx int8" in r.output, r.output


def test_export_at_another_opset_names_the_int8_model_it_drops(ckpt, int8_export, tmp_path):
    """At another --opset the folder's fp32 model is made again, its int8 model not (no calibration data): the line
    names the loss with the command that adds it back, and the old model_int8.onnx does not stay, listed nowhere."""
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    r = invoke("export", "--ckpt", ckpt, "--out", copy, "--opset", 18)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"{copy} no longer holds model_int8.onnx (made at opset 17; " in said, said
    assert f" --out {copy} --int8`" in said and not (copy / "model_int8.onnx").exists(), said
    meta = json.loads((copy / "export.json").read_text())
    assert meta["opset"] == 18 and list(meta["files"]) == ["fp32"]


def test_int8_where_it_cannot_run(ckpt, tiny_export, int8_export, tmp_path):
    # a missing file: exit 1; options that contradict each other (options.precision_refusal): a usage error, exit 2
    cases = [(["--export", tiny_export], "no int8 model", 1),             # an export folder without one
             (["--engine", "torch"], "int8 runs on the onnx engine", 2),
             (["--export", int8_export, "--engine", "onnx-generator"], "has no int8 generator", 1),
             (["--export", int8_export, "--fp16"], "choose one precision", 2)]
    for extra, message, code in cases:
        r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--int8", "--out", tmp_path / "a.png", *extra)
        assert r.exit_code == code and message in r.output and "Traceback" not in r.output, (extra, r.output)
    # the hint makes the int8 model in the folder given, not in the cache, from the checkpoint given
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--int8", "--export", tiny_export, "--out", tmp_path / "a.png")
    line = " ".join(r.output.split())
    assert f"ddpm export --ckpt {ckpt / 'model.safetensors'} --out {tiny_export} --int8`" in line, r.output


@pytest.mark.slow
def test_sensitivity_keeps_the_costliest_convs(tiny_export, fake_mnist, tmp_path):
    """Under a bound the all-int8 model misses, Convs are kept fp32 most sensitive first until it is met."""
    from ddpm.runtime.bundle import Bundle
    from ddpm.train.data import load_mnist

    b = Bundle.load(tiny_export)
    images, labels = load_mnist(fake_mnist)
    out = tmp_path / "q.onnx"
    rec = int8.make_int8(b.onnx_path(), out, images, labels, b.schedule.alphas_cumprod, [99, 50, 10],
                         b.null_label, max_error=0.04, digits=(16, 16), log=lambda *_: None)
    q = rec["quantization"]
    alone = q["sensitivity"]
    convs = int8.conv_nodes(b.onnx_path())
    image_convs = [convs[0], convs[-1]]   # fp32 by rule (int8.IMAGE_CONVS_FP32)
    kept = q["kept_fp32"]
    assert len(alone) == q["convs"] - 2 and kept[:2] == image_convs and len(kept) > 2
    assert kept[2:] == sorted(alone, key=lambda c: -alone[c])[:len(kept) - 2]
    assert q["eps_error_held_out"] <= 0.04 and rec["parity"]["error"] <= rec["parity"]["tolerance"] == 0.05
    assert out.is_file()


def test_editing_benchmark_runs_each_precision_side_by_side(ckpt, int8_export, fake_mnist):
    """python -m ddpm.bench.editing --precisions fp32,int8: one row per precision, same seed, the int8 row with its
    grey-level difference from the fp32 digits and each row's border haze. sigma 3: above INT8_FP32_SIGMA, so that
    the first rows run int8 (a restoration from sigma <= 0.95 runs every row fp32 and gives fp32's digits)."""
    from ddpm.bench.editing import inpainting, restoration, upscaling
    from ddpm.evaluation import load_classifier
    from ddpm.train.data import load_mnist

    x, y = load_mnist(fake_mnist, "test")
    model = api.load(ckpt, int8_export)
    rows = restoration(model, load_classifier(), x[:6], y[:6], [3.0],
                       {"engine": "onnx", "batch": 8, "precisions": ["fp32", "int8"]})
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert "diff_mean_vs_fp32" not in rows[0] and all(0 <= r["border"] <= 1 for r in rows)
    assert 0 < rows[1]["diff_mean_vs_fp32"] <= rows[1]["diff_max_vs_fp32"] <= 255
    # every editing mode runs with the unconditional model ("none") and the label read from its input
    run = {"engine": "onnx", "batch": 8, "precisions": ["fp32"]}
    clf = load_classifier()
    for rows in (upscaling(model, clf, x[:2], y[:2], [2], [("ilvr", 1.0)], run, sources=("none", "read")),
                 inpainting(model, clf, x[:2], y[:2], [{"steps": 4}], run, sources=("none", "read"))):
        assert {r.get("label_source") for r in rows} >= {"none", "read"}


def test_bench_times_int8_beside_fp32(ckpt, int8_export, tiny_export):
    """ddpm bench --int8: the onnx engine timed at fp32 ("onnx") and int8 ("onnx int8") in one run, alternating; a
    model without an int8 export skips that row with the reason and times the rest."""
    from ddpm.bench.speed import run_bench

    model = api.load(ckpt, int8_export)
    plan = model.plan("ddim", 2)
    res = run_bench(model, ["onnx"], [2], plan, repeat=1, int8=True, log=lambda m: None)
    assert [c["engine"] for c in res["results"]] == ["onnx", "onnx int8"] and not res["skipped"]
    res = run_bench(api.load(ckpt, tiny_export), ["onnx"], [2], plan, repeat=1, int8=True, log=lambda m: None)
    assert [c["engine"] for c in res["results"]] == ["onnx"] and "no int8 model" in res["skipped"]["onnx int8"]


def test_int8_calibration_needs_only_the_training_files(fake_mnist, tmp_path, monkeypatch):
    """`export --int8 --data DIR` calibrates on the training split: a folder holding only its two files is enough (no
    download of the test files is tried)."""
    import ddpm.train.data as data
    from ddpm.cli_tools import _int8_data

    for name in data.SPLITS["train"]:
        [f] = fake_mnist.glob(name + "*")
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))   # nothing listens there
    images, labels, name = _int8_data(tmp_path, (1, 28, 28))
    assert images.shape[1:] == (28, 28) and len(images) == len(labels) and name == "MNIST train"


@pytest.fixture(scope="module")
def int8_generator(ckpt, int8_export, fake_mnist, tmp_path_factory):
    """int8_export with the fp32 and the int8 generator of the default sampler at 4 steps (`export --int8
    --generator`: the folder's model_int8.onnx is kept, not calibrated again)."""
    out = tmp_path_factory.mktemp("int8gen") / "exp"
    shutil.copytree(int8_export, out)
    r = _export_int8(ckpt, out, fake_mnist, "--generator", "--steps", 4)
    assert r.exit_code == 0, r.output
    assert "generator int8: " in r.output, r.output
    return out


def test_int8_generator_gives_the_int8_engine_digits(ckpt, int8_generator, tmp_path):
    """`gen --engine onnx-generator --int8` and the API run generator.onnx's int8 form: model_int8.onnx on the rows
    the int8 engine runs int8, model.onnx on its fp32 rows (runtime.engines.int8_fp32_rows), so the digits are the
    int8 onnx engine's within the generator's tolerance, and not the fp32 generator's."""
    from ddpm.export.generator import TOLERANCE_GREY

    r = invoke("gen", "--ckpt", ckpt, "--export", int8_generator, "-n", 8, "--steps", 4, "--int8",
               "--engine", "onnx-generator", "--out", tmp_path / "g.npz")
    assert r.exit_code == 0, r.output
    assert "onnx-generator int8" in r.output.strip().splitlines()[-1], r.output
    got = read_samples(tmp_path / "g.npz")[0]
    model = api.load(ckpt, int8_generator)
    assert np.array_equal(model.generate(8, steps=4, engine="onnx-generator", int8=True), got)
    ref = model.generate(8, steps=4, engine="onnx", int8=True)
    assert np.abs(got.astype(int) - ref).max() <= TOLERANCE_GREY
    fp32 = model.generate(8, steps=4, engine="onnx-generator")
    assert np.abs(got.astype(int) - fp32).max() > TOLERANCE_GREY   # the int8 network ran


def test_export_json_records_both_generators(ckpt, int8_generator):
    """export.json holds the plan's fp32 and int8 generators side by side (a precision each), the int8 one naming
    its fp32 rows and the model_int8.onnx it holds; both load back from the folder, sha256-checked."""
    from ddpm.runtime.bundle import Bundle
    from ddpm.runtime.runner import plan_key

    meta = json.loads((int8_generator / "export.json").read_text())
    gens = meta["generators"]
    assert sorted(g["precision"] for g in gens) == ["fp32", "int8"] and len({g["plan_key"] for g in gens}) == 1
    g8 = next(g for g in gens if g["precision"] == "int8")
    plan = api.load(ckpt, int8_generator).plan(steps=4)
    fp32_rows = engines.int8_fp32_rows(plan, meta["alphas_cumprod"])
    assert 0 < fp32_rows.sum() < plan.steps   # both networks run: the test means something
    assert g8["fp32_timesteps"] == [int(t) for t in plan.timesteps[fp32_rows]]
    assert g8["int8_sha256"] == meta["files"]["int8"]["sha256"]
    assert g8["parity"]["max_abs_grey"] <= g8["parity"]["tolerance_grey"]
    b = Bundle.load(int8_generator)
    paths = {p: b.generator_path(plan_key(plan), precision=p) for p in ("fp32", "int8")}
    assert paths["fp32"] != paths["int8"] and all(p.is_file() for p in paths.values())


def test_bench_times_the_int8_generator_beside_fp32(ckpt, int8_generator):
    """ddpm bench --int8 with onnx-generator: the fp32 and the int8 generator timed in one run, alternating."""
    from ddpm.bench.speed import run_bench

    model = api.load(ckpt, int8_generator)
    res = run_bench(model, ["onnx-generator"], [2], model.plan(steps=4), repeat=1, int8=True, log=lambda m: None)
    assert [c["engine"] for c in res["results"]] == ["onnx-generator", "onnx-generator int8"], res["skipped"]
    assert res["versions"]["onnx-generator int8"]["precision"] == "int8"



def test_int8_generator_in_the_loop_form_only(ckpt, int8_generator, fake_mnist):
    """Unrolled, the int8 generator's digits differed from the int8 engine's (export/generator.py check_form):
    `export --int8 --generator --form unrolled` is refused in one line, the folder left as it was."""
    before = (int8_generator / "export.json").read_text()
    r = _export_int8(ckpt, int8_generator, fake_mnist, "--generator", "--steps", 4, "--form", "unrolled")
    assert r.exit_code == 2 and "the int8 generator is written in the loop form only" in r.output, r.output
    assert "Traceback" not in r.output and (int8_generator / "export.json").read_text() == before


def test_the_docs_generator_snippet_picks_the_fp32_generator(ckpt, int8_generator, tmp_path):
    """docs/export.md's Python snippet, run on a folder whose int8 record comes first (as when gen built the int8
    generator on first use before `ddpm export --generator`): it opens the plan's fp32 generator, whose digits the
    docs promise, not the int8 one."""
    import re
    from pathlib import Path

    from ddpm.runtime.bundle import Bundle

    copy = tmp_path / "copy"
    shutil.copytree(int8_generator, copy)
    meta = json.loads((copy / "export.json").read_text())
    meta["generators"].sort(key=lambda g: g["precision"] != "int8")
    (copy / "export.json").write_text(json.dumps(meta))
    doc = (Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    snippet = next(b for b in re.findall(r"^```python\n(.*?)^```", doc, re.M | re.S) if "export.json" in b)
    plan = api.load(ckpt, copy).plan(steps=4)
    ns = {}
    exec(snippet.replace("EXPORT_FOLDER", str(copy)).replace("unipc8-trailing-gi0.28-5.42", plan.name), ns)
    assert meta["generators"][0]["precision"] == "int8"   # first: the test means something
    assert ns["name"] == Bundle.load(copy).generator(precision="fp32")["name"] and ns["images"].shape == (8, 28, 28)


def test_export_at_another_opset_drops_and_names_the_int8_generators(ckpt, int8_generator, tmp_path):
    """At another --opset model_int8.onnx goes (no calibration data), and the int8 generators that hold it go with
    it, named beside it with a command that adds them back (--int8 --generator): the folder left is one every reader
    accepts, and the next export says nothing is to repair. The fp32 generator, self-contained, stays."""
    copy = tmp_path / "copy"
    shutil.copytree(int8_generator, copy)
    meta = json.loads((copy / "export.json").read_text())
    g8, g32 = (next(g for g in meta["generators"] if g["precision"] == p) for p in ("int8", "fp32"))
    r = invoke("export", "--ckpt", ckpt, "--out", copy, "--opset", 18)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"{copy} no longer holds {g8['name']}, model_int8.onnx (made at opset 17" in said, said
    assert f" --out {copy} --int8 --generator`" in said and not (copy / g8["name"]).exists(), said
    assert [g["name"] for g in json.loads((copy / "export.json").read_text())["generators"]] == [g32["name"]]
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 4, "--engine", "onnx-generator",
               "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    r = invoke("export", "--ckpt", ckpt, "--out", copy, "--opset", 18)
    assert r.exit_code == 0 and "repairing" not in r.output and "no longer holds" not in r.output, r.output


def test_a_lost_int8_generator_is_named_alone_with_int8_in_its_hint(ckpt, int8_generator, tmp_path):
    """A damaged int8 generator file: the repairing export names it alone, with a command that makes it (--int8
    --generator), and keeps the sound fp32 generator, at this opset and at another one (its models made again, the
    fp32 generator self-contained)."""
    meta = json.loads((int8_generator / "export.json").read_text())
    g8, g32 = (next(g for g in meta["generators"] if g["precision"] == p) for p in ("int8", "fp32"))
    for opset in (17, 18):
        copy = tmp_path / f"copy{opset}"
        shutil.copytree(int8_generator, copy)
        _flip(copy / g8["name"])
        r = invoke("export", "--ckpt", ckpt, "--out", copy, "--opset", opset)
        said = " ".join(r.output.split())
        assert r.exit_code == 0 and f"repairing {copy} ({copy / g8['name']} " in said, said
        lost = g8["name"] if opset == 17 else f"{g8['name']}, model_int8.onnx"
        assert f"{copy} no longer holds {lost} (" in said and f" --out {copy} --int8 --generator`" in said, said
        assert [g["name"] for g in json.loads((copy / "export.json").read_text())["generators"]] == [g32["name"]]


def test_repairing_export_carries_the_users_file_over(ckpt, int8_export, tmp_path):
    """A damaged export.json of these weights in a folder that also holds a user's file: gen's message names the
    command that repairs this folder (--ckpt, --out), and that export repairs it as it does a folder without the
    file (the loss named), carrying the user's file over, not refusing the folder as one of other weights."""
    copy = _damaged(int8_export, tmp_path, lambda m: m["files"].update(int8=None))
    (copy / "NOTES.txt").write_text("mine")
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--out", tmp_path / "a.png")
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and f"re-run `ddpm export --ckpt {ckpt / 'model.safetensors'} --out {copy}`" in said, said
    r = invoke("export", "--ckpt", ckpt, "--out", copy)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"{copy} no longer holds model_int8.onnx (its export.json was refused" in said, said
    assert (copy / "NOTES.txt").read_text() == "mine"
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 2, "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output


def _gen_records(folder):
    meta = json.loads((folder / "export.json").read_text())
    return meta, *(next(g for g in meta["generators"] if g["precision"] == p) for p in ("int8", "fp32"))


@pytest.mark.parametrize("edit", ["int8 relabelled fp32", "fp32_timesteps []", "fp32_timesteps removed",
                                  "int8 record twice"])
def test_an_edited_generator_record_is_refused_and_repaired(ckpt, int8_generator, tmp_path, edit):
    """export.json's int8 generator record hand-edited: its precision against the file's own record, its fp32 rows
    against the rows the file records, a second record of one file. Each is refused by the readers in one line
    (here the int8 generator engine), and `ddpm export` repairs the folder, checking every record as itself (not
    only the first of its plan and precision): what it keeps is one record per file, each true."""
    copy = tmp_path / "copy"
    shutil.copytree(int8_generator, copy)
    meta, g8, g32 = _gen_records(copy)
    if edit == "int8 relabelled fp32":   # after the true fp32 record: a lookup by plan and precision never reaches it
        meta["generators"] = [g32, {**g8, "precision": "fp32"}]
    elif edit == "fp32_timesteps []":
        assert g8["fp32_timesteps"]   # the file runs rows at fp32: the edit states a false fact
        g8["fp32_timesteps"] = []
    elif edit == "fp32_timesteps removed":
        del g8["fp32_timesteps"]
    else:
        meta["generators"].append(dict(g8))
    (copy / "export.json").write_text(json.dumps(meta))
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 4, "--engine", "onnx-generator",
               "--int8", "--out", tmp_path / "a.png")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    r = invoke("export", "--ckpt", ckpt, "--out", copy)
    said = " ".join(r.output.split())
    assert r.exit_code == 0, said
    names = [g["name"] for g in json.loads((copy / "export.json").read_text())["generators"]]
    assert len(names) == len(set(names)) and g32["name"] in names, names
    if edit == "int8 record twice":   # both records true: one kept, nothing lost
        assert sorted(names) == sorted([g8["name"], g32["name"]]) and "no longer holds" not in said, said
    else:
        assert names == [g32["name"]] and f"no longer holds {g8['name']} (" in said and "--int8 --generator`" in said
    r = invoke("gen", "--ckpt", ckpt, "--export", copy, "-n", 2, "--steps", 4, "--engine", "onnx-generator",
               "--out", tmp_path / "a.png")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_adding_int8_to_a_folder_writes_nothing_beside_its_files(ckpt, tiny_export, fake_mnist, tmp_path,
                                                                monkeypatch):
    """`ddpm export --int8` into a folder whose model.onnx is kept: onnxruntime's quantize_static writes a
    shape-inferred copy beside its input (NAME-inferred.onnx), which was the user's folder: a kill or a file-size
    limit then left model-inferred.onnx there. Every file it writes goes to the build's own folder: at no moment
    does the export folder hold anything but its files."""
    import onnx.shape_inference as shape_inference

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    (folder / "model_int8.onnx").unlink(missing_ok=True)
    listed = sorted(p.name for p in folder.iterdir())
    seen = []
    infer = shape_inference.infer_shapes_path

    def watched(*a, **k):
        out = infer(*a, **k)
        seen.append(sorted(p.name for p in folder.iterdir()))
        return out

    monkeypatch.setattr(shape_inference, "infer_shapes_path", watched)
    r = _export_int8(ckpt, folder, fake_mnist)
    assert r.exit_code == 0, r.output
    assert seen and all(names == listed for names in seen), seen
    assert sorted(p.name for p in folder.iterdir()) == sorted(listed + ["model_int8.onnx"])


def test_a_cut_file_of_the_int8_pass_is_named_as_the_file_size_limit(tiny_export, fake_mnist, tmp_path):
    """Under ulimit -f, onnx's C++ shape inference (inside quantize_static) cuts its copy of the model at the limit
    without a word, and parsing it then raised protobuf's DecodeError: a traceback. The cut file is reported as the
    limit it is: OSError EFBIG, which the CLI names as the limit in one line."""
    import errno
    import resource
    import signal

    from ddpm.errors import limit_message
    from ddpm.runtime.bundle import Bundle
    from ddpm.train.data import load_mnist

    b = Bundle.load(tiny_export)
    images, labels = load_mnist(fake_mnist)
    size = b.onnx_path().stat().st_size
    previous = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, previous[0][1]))
    try:
        with pytest.raises(OSError) as e:
            int8.make_int8(b.onnx_path(), tmp_path / "q.onnx", images, labels, b.schedule.alphas_cumprod, [99, 50],
                           b.null_label, max_error=0.08, digits=(16, 8), log=lambda *_: None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous[0])
        signal.signal(signal.SIGXFSZ, previous[1])
    assert e.value.errno == errno.EFBIG and "file-size limit" in limit_message(e.value)
    assert list(tmp_path.iterdir()) == []
