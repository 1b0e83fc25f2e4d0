"""A distilled student's recorded plan travels with its weights: its export folder (export.json and model.onnx's
record), the generator and web page built for it, its int8 calibration, bench, and its diffusers folder. Whatever
reads the export samples the student's plan, as its model file does."""

import dataclasses
import json
import re

import numpy as np
import pytest

import ddpm
from ddpm.errors import DdpmError
from ddpm.model.io import read_model_info, save_model
from ddpm.train import distill as D
from helpers import TINY, invoke, randomised_unet

STUDENT_PLAN = "ddim2-eta0-trailing"


def _student(path, cfg=TINY, plan=True):
    info = {"plan": D.recorded_plan(2, {"guidance": 0.45, "guidance_interval": [0.28, 5.42], "teacher": "0" * 64,
                                        "teacher_steps": 4})} if plan else {}
    save_model(path, cfg, randomised_unet(cfg).state_dict(), step=1, **info)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(a student's model file, its export folder by `ddpm export --ckpt STUDENT --out DIR`)."""
    root = tmp_path_factory.mktemp("student")
    path = _student(root / "student2.safetensors")
    r = invoke("export", "--ckpt", path, "--out", root / "exp")
    assert r.exit_code == 0, r.output
    return path, root / "exp"


def test_the_export_records_the_plan_and_reads_as_the_student(student, tmp_path):
    path, exp = student
    recorded = read_model_info(path)[2]["plan"]
    assert json.loads((exp / "export.json").read_text())["plan"] == recorded
    via_file, via_export = ddpm.load(path), ddpm.load(export=exp)
    assert via_export.recorded == via_file.recorded == recorded
    assert via_export.plan().name == via_file.plan().name == STUDENT_PLAN
    a, b = via_file.generate(8, seed=3), via_export.generate(8, seed=3)
    assert np.array_equal(a, b)
    assert np.array_equal(ddpm.load(path, export=exp).generate(8, seed=3), a)
    outs = []
    for source in (["--ckpt", path], ["--export", exp]):
        out = tmp_path / f"{source[0][2:]}.npz"
        r = invoke("gen", *source, "-n", 8, "--seed", 3, "--out", out)
        assert r.exit_code == 0 and f"({STUDENT_PLAN}, guidance 0," in r.output, r.output
        outs.append(np.load(out)["images"])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], a)


def test_eval_of_the_export_scores_the_students_plan(student, tmp_path, fake_mnist):
    path, exp = student
    names = []
    for source in (["--ckpt", path], ["--export", exp]):
        out = tmp_path / f"{source[0][2:]}.json"
        r = invoke("eval", *source, "-n", 4, "--data", fake_mnist, "-q", "--json", out)
        assert r.exit_code == 0, r.output
        names.append(json.loads(out.read_text())[0]["name"])
    assert names[0] == names[1] and names[0].startswith(STUDENT_PLAN) and "w=0" in names[0], names


def test_an_export_whose_plan_is_not_its_models_is_refused(student, tmp_path):
    import shutil

    path, exp = student
    edited = tmp_path / "edited"
    shutil.copytree(exp, edited)
    meta = json.loads((edited / "export.json").read_text())
    meta["plan"]["steps"] = 4                               # export.json says DDIM-4, model.onnx's record DDIM-2
    (edited / "export.json").write_text(json.dumps(meta))
    with pytest.raises(DdpmError, match="records the plan ddim-2 trailing eta 0.0 guidance 0.0, not export.json's "
                                        "ddim-4") as e:
        ddpm.load(export=edited).generate(2)
    assert "\n" not in str(e.value)
    r = invoke("gen", "--export", edited, "-n", 2, "--out", tmp_path / "g.npz")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "records the plan" in r.output, r.output
    # the same weights in a file that records no plan: the student's export is not its export
    plain = _student(tmp_path / "plain.safetensors", plan=False)
    with pytest.raises(DdpmError, match="records the plan ddim-2 .*, but the model file .*plain.safetensors records "
                                        "none"):
        ddpm.load(plain, export=exp)


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "plan has an entry it does not know: 'bogus'"),
    ({"variance": "large"}, "plan has an entry it does not know: 'variance'"),
    ({"sampler": "ddpm"}, "its plan cannot be sampled (the DDPM sampler runs all"),
    ({"eta": 0.5, "sampler": "unipc"}, "its plan cannot be sampled (eta is DDIM's noise level"),
])
def test_an_export_plan_that_no_sampling_runs_is_the_folders_fault(student, tmp_path, change, message):
    """export.json's plan record with an entry it does not know (used by onnx-generator and the API, refused by
    onnx with two plans that read alike), or entries that no sampling runs together (DDPM with a spacing, eta
    without DDIM: a usage error naming an option the user never gave, exit 2): one line naming export.json, exit
    1, on every engine and the API."""
    import shutil

    _, exp = student
    edited = tmp_path / "edited"
    shutil.copytree(exp, edited)
    meta = json.loads((edited / "export.json").read_text())
    meta["plan"].update(change)
    (edited / "export.json").write_text(json.dumps(meta))
    with pytest.raises(DdpmError, match=re.escape(message)) as e:
        ddpm.load(export=edited).generate(2, engine="onnx-generator")
    assert "export.json" in str(e.value)
    for engine in ("onnx", "onnx-generator"):
        r = invoke("gen", "--export", edited, "-n", 2, "--engine", engine, "--out", tmp_path / "g.npz")
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and message in r.output, r.output


def test_generator_and_bench_of_a_student_take_its_plan(student, tmp_path):
    path, _ = student
    r = invoke("export", "--ckpt", path, "--out", tmp_path / "exp", "--generator")
    assert r.exit_code == 0, r.output
    [gen] = json.loads((tmp_path / "exp" / "export.json").read_text())["generators"]
    assert gen["plan"] == STUDENT_PLAN and gen["steps"] == 2
    # an option given overrides its part of the plan
    r = invoke("export", "--ckpt", path, "--out", tmp_path / "exp4", "--generator", "--steps", 4)
    assert r.exit_code == 0, r.output
    [gen] = json.loads((tmp_path / "exp4" / "export.json").read_text())["generators"]
    assert gen["plan"] == "ddim4-eta0-trailing"
    r = invoke("bench", "--ckpt", path, "--engines", "onnx", "--batch", 1, "--repeat", 1, "--no-baseline",
               "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert res["sampler"] == STUDENT_PLAN and res["steps"] == 2 and res["guidance"] == 0, res


@pytest.mark.slow
def test_web_page_of_a_student_starts_at_its_plan(student, tmp_path):
    from ddpm.export.web import WebExportError, ort_web_tarball

    try:
        tarball = ort_web_tarball(log=lambda *_: None)
    except WebExportError as e:
        pytest.skip(f"onnxruntime-web is not available here: {e}")
    path, _ = student
    r = invoke("export", "--ckpt", path, "--out", tmp_path / "exp", "--web", tmp_path / "page", "--ort-web", tarball)
    assert r.exit_code == 0, r.output
    model = json.loads((tmp_path / "page" / "model.json").read_text())
    assert model["plan"] == STUDENT_PLAN and model["guidance"] == 0, model


@pytest.mark.slow
def test_int8_of_a_student_calibrates_at_its_plans_timesteps(student, tmp_path, fake_mnist):
    path, _ = student
    r = invoke("export", "--ckpt", path, "--out", tmp_path / "exp", "--int8", "--data", fake_mnist)
    if r.exit_code != 0 and "calibrat" in r.output:
        pytest.skip(f"int8 calibration of a random tiny model: {r.output.strip()}")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "exp" / "export.json").read_text())["files"]["int8"]["quantization"]
    plan = ddpm.load(path).plan()
    assert q["timesteps"] == [int(t) for t in plan.timesteps[plan.calls_net]], q["timesteps"]


def test_a_diffusers_folder_of_a_student_keeps_its_plan(tmp_path):
    block = dataclasses.replace(TINY, block="diffusers")
    path = _student(tmp_path / "student2.safetensors", block)
    r = invoke("export", "--ckpt", path, "--diffusers", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    model = ddpm.load(tmp_path / "pipe")
    assert model.recorded == ddpm.load(path).recorded and model.plan().name == STUDENT_PLAN
    try:
        import diffusers  # noqa: F401
    except ImportError:
        pytest.skip("the digits of a diffusers folder need the diffusers package (not installed)")
    assert np.array_equal(model.generate(4, seed=3, engine="torch"), ddpm.load(path).generate(4, seed=3,
                                                                                              engine="torch"))
