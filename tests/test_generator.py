"""generator.onnx: the whole reverse loop in one ONNX model, against the runtime; the onnx-generator engine and CLI."""

import json

import numpy as np
import onnx
import pytest

from ddpm.export.generator import (GeneratorFailed, GeneratorUnsupported, add_generator, build, check_plan,
                                   generator_file, verify)
from ddpm.model.io import load_model
from ddpm.runtime.bundle import Bundle, ExportError
from ddpm.runtime.engine import EngineClosed
from ddpm.runtime.engines import make_engine
from ddpm.runtime.generate import generate, labels_for
from ddpm.runtime.generator import GeneratorEngine
from ddpm.runtime.nets import EngineUnavailable, OnnxNet
from ddpm.runtime.noise import make_noise
from ddpm.runtime.runner import RuntimeEngine
from ddpm.runtime.samplers import Plan, ddim_plan, ddpm_plan
from helpers import MNIST, invoke, slow_except


@pytest.fixture(scope="module")
def setup(tiny_exported):
    root = tiny_exported(seed=2)
    return load_model(root), root / "exp"


def multistep_plan(sched) -> Plan:
    """A deterministic plan that uses every column the generator reads: the x0_hat history of the previous two rows
    (as DPM-Solver++(2M) and UniPC do) and guidance on some rows only. Its weights are DDIM's, with w_x0 shared out
    over this row's and the two earlier predictions; the digits it makes do not matter here, only that every engine
    makes the same ones."""
    p = ddim_plan(sched, 6)
    w_x0, prev, prev2 = 0.6 * p.w_x0, 0.3 * p.w_x0, 0.1 * p.w_x0
    prev[0] = prev2[:2] = 0.0
    return Plan.make("multistep-test", p.timesteps, p.abar, p.w_x, w_x0, p.sigma, p.abar_next,
                     w_x0_prev=prev, w_x0_prev2=prev2, cfg=[True, True, False, True, False, True])


def _runtime_images(bundle, plan, x_T, labels, w):
    from ddpm.runtime.images import to_uint8

    eng = RuntimeEngine(OnnxNet(bundle.onnx_path("fp32")), bundle.null_label, bundle.image_shape)
    return to_uint8(eng.run(x_T, None, labels, plan, w))


@pytest.mark.parametrize("which, form", slow_except([("ddim", "loop"), ("ddim", "unrolled"), ("multistep", "loop"),
                                                     ("multistep", "unrolled")],
                                                    ("multistep", "loop"), ("ddim", "unrolled")))   # each once
def test_generator_matches_the_runtime(setup, tmp_path, form, which):
    """Same x_T, same digits as runtime/runner.py on the onnx engine, within 1 grey level: guided, w=0, uncond."""
    _, exp = setup
    bundle = Bundle.load(exp)
    plan = ddim_plan(bundle.schedule, 5) if which == "ddim" else multistep_plan(bundle.schedule)
    assert which == "ddim" or plan.history == 2
    model = build(onnx.load(str(exp / "model.onnx")), plan, bundle.null_label, bundle.image_shape, form=form)
    onnx.save(model, str(tmp_path / "g.onnx"))
    gen = GeneratorEngine(tmp_path / "g.onnx", {"plan": plan.name, "plan_key": _key(plan)}, bundle.null_label)
    x_T, _ = make_noise(5, 0, 7, 0, MNIST)
    for labels, w in ((np.arange(7) % 10, 2.0), (np.arange(7) % 10, 0.0), (None, 0.0)):
        ref = _runtime_images(bundle, plan, x_T, labels, w)
        got = gen.run(x_T, None, labels, plan, w)
        assert got.dtype == np.uint8 and got.shape == (7, 28, 28)
        assert ref.std() > 5                                         # not blank: the comparison means something
        assert np.abs(got.astype(int) - ref).max() <= 1, (labels, w)
    # guidance and labels are real inputs
    a = gen.run(x_T, None, np.arange(7) % 10, plan, 2.0)
    assert np.abs(a.astype(int) - gen.run(x_T, None, np.arange(7) % 10, plan, 0.0)).max() > 5
    assert np.abs(a.astype(int) - gen.run(x_T, None, (np.arange(7) + 1) % 10, plan, 2.0)).max() > 5


def _key(plan):
    from ddpm.runtime.runner import plan_key

    return plan_key(plan)


def test_add_generator_records_and_engine_gives_the_onnx_digits(setup, tmp_path):
    import shutil

    loaded, exp = setup
    folder = tmp_path / "exp"
    shutil.copytree(exp, folder)
    plan = ddim_plan(Bundle.load(folder).schedule, 4)
    info = add_generator(folder, plan, guidance=1.5, log=lambda *_: None)
    meta = json.loads((folder / "export.json").read_text())
    assert meta["generators"] == [info] and info["plan"] == plan.name and info["steps"] == 4
    assert info["parity"]["max_abs_grey"] <= 1 and len(info["parity"]["checks"]) == 3
    assert {c["guidance"] for c in info["parity"]["checks"]} == {1.5, 0.0}
    bundle = Bundle.load(folder, expected_hash=loaded.hash)
    assert bundle.generator_path(_key(plan)) == folder / generator_file(plan)
    with pytest.raises(ExportError, match="no generator for the plan asked for"):
        bundle.generator_path(_key(ddim_plan(bundle.schedule, 5)))
    # the engine through generate(): batches of 4 over 10 samples, same seed -> the onnx engine's digits
    labels = labels_for(10, None, False)
    eng = make_engine("onnx-generator", device="cpu", null_label=10, bundle=bundle, plan=plan)
    got = generate(eng, 10, plan, labels, 1.5, seed=3, batch=4, progress=False, image_shape=MNIST)
    onnx = make_engine("onnx", device="cpu", null_label=10, bundle=bundle)
    ref = generate(onnx, 10, plan, labels, 1.5, seed=3, batch=4,
                   progress=False, image_shape=MNIST)
    assert np.abs(got.astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="re-export"):
        eng.run(*make_noise(0, 0, 2, 0, MNIST), None, ddim_plan(bundle.schedule, 5), 0.0)
    # its lifetime: close drops the session, closing again is harmless, a closed engine refuses work in one line
    assert eng.supports.plan_key == _key(plan) and not eng.supports.states
    with eng:
        pass
    assert eng.closed and eng.sess is None
    eng.close()
    with pytest.raises(EngineClosed, match="^the onnx-generator engine is closed; make a new one"):
        eng.run(*make_noise(0, 0, 2, 0, MNIST), None, plan, 0.0)
    with pytest.raises(EngineUnavailable, match="fp32"):
        make_engine("onnx-generator", device="cpu", null_label=10, bundle=bundle, fp16=True)
    # a damaged file is refused
    path = folder / generator_file(plan)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EngineUnavailable, match="corrupted or truncated"):
        make_engine("onnx-generator", device="cpu", null_label=10, bundle=Bundle.load(folder), plan=plan)


def test_verification_fails_for_a_wrong_generator(setup, tmp_path):
    """verify() catches a generator that does not compute the plan it is checked against (here: another plan)."""
    import shutil

    _, exp = setup
    folder = tmp_path / "exp"
    shutil.copytree(exp, folder)
    bundle = Bundle.load(folder)
    wrong = build(onnx.load(str(exp / "model.onnx")), ddim_plan(bundle.schedule, 3), bundle.null_label,
                  bundle.image_shape)
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    with pytest.raises(GeneratorFailed, match="grey level"):
        verify(tmp_path / "wrong.onnx", bundle, ddim_plan(bundle.schedule, 4), 1.0)
    before = (folder / "export.json").read_text()
    import ddpm.export.generator as g

    real_verify = g.verify
    try:
        g.verify = lambda *a, **k: (_ for _ in ()).throw(GeneratorFailed("forced"))
        with pytest.raises(GeneratorFailed):
            add_generator(folder, ddim_plan(bundle.schedule, 4), 1.0, log=lambda *_: None)
    finally:
        g.verify = real_verify
    assert (folder / "export.json").read_text() == before
    assert not (folder / generator_file(ddim_plan(bundle.schedule, 4))).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]   # no temporary file left behind


def test_stochastic_plans_are_refused(setup):
    sched = Bundle.load(setup[1]).schedule
    for plan in (ddpm_plan(sched), ddim_plan(sched, 5, eta=1.0)):
        with pytest.raises(GeneratorUnsupported, match="deterministic plans only"):
            check_plan(plan)
    check_plan(ddim_plan(sched, 5))


@pytest.mark.slow
def test_cli_gen_and_export(setup, tmp_path):
    loaded, _ = setup
    ckpt = loaded.path
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    common = ("--ckpt", ckpt, "-n", 6, "--steps", 4, "--batch", 4, "--seed", 9, "-w", 1.0, "-q")
    r = invoke("gen", *common, "--engine", "onnx", "--out", tmp_path / "a.npz", env=env)
    assert r.exit_code == 0, r.output
    r = invoke("gen", *common[:-1], "--engine", "onnx-generator", "--out", tmp_path / "b.npz", env=env)
    assert r.exit_code == 0, r.output
    assert "onnx-generator" in r.output and "building generator.onnx" in r.output   # built once, in the cache
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert np.abs(a.astype(int) - b).max() <= 1
    r = invoke("gen", *common[:-1], "--engine", "onnx-generator", "--out", tmp_path / "c.npz", env=env)
    assert r.exit_code == 0 and "building" not in r.output                            # reused
    # bad input: one clear message, no traceback; a usage error naming the option, as export's
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--sampler", "ddpm", "--engine", "onnx-generator", env=env)
    assert r.exit_code == 2 and "deterministic plans only" in r.output and "Traceback" not in r.output
    assert "Invalid value for --sampler" in r.output, r.output
    r = invoke("export", "--ckpt", ckpt, "--out", tmp_path / "e", "--generator", "--sampler", "ddpm")
    assert r.exit_code == 2 and "deterministic plans only" in r.output and not (tmp_path / "e").exists()
    # export --generator into a folder; gen against that folder with another plan is refused
    r = invoke("export", "--ckpt", ckpt, "--out", tmp_path / "e", "--generator", "--steps", 3)
    assert r.exit_code == 0, r.output
    assert [g["steps"] for g in json.loads((tmp_path / "e" / "export.json").read_text())["generators"]] == [3]
    r = invoke("gen", *common, "--engine", "onnx-generator", "--export", tmp_path / "e", "--out", tmp_path / "d.npz",
               env=env)
    assert r.exit_code == 1 and "not one for unipc4-trailing" in r.output
    # another plan's generator in the same folder: both kept, side by side, and the fp16 model too
    r = invoke("export", "--ckpt", ckpt, "--out", tmp_path / "e", "--fp16", "--generator", "--steps", 4)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "e" / "export.json").read_text())
    assert sorted(g["steps"] for g in meta["generators"]) == [3, 4] and set(meta["files"]) == {"fp32", "fp16"}
    r = invoke("gen", *common, "--engine", "onnx-generator", "--export", tmp_path / "e", "--out", tmp_path / "d.npz",
               env=env)
    assert r.exit_code == 0 and "building" not in r.output, r.output


def _builds(model, plan) -> int:
    """How many times generator_bundle(plan) built a generator (its log says so once per build)."""
    lines = []
    model.generator_bundle(plan, log=lines.append)
    return sum("building generator.onnx" in line for line in lines)


@pytest.mark.slow
def test_a_generator_is_built_once_per_plan(setup, tmp_path, monkeypatch):
    """The generator of a plan is built on its first use and reused by every later call and process (a fresh
    Model), for the shipped model (whose installed export stays as it is) and for a checkpoint, also when plans
    alternate; two threads asking at once build it once."""
    import threading

    import ddpm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shipped = ddpm.load()
    installed = sorted(p.name for p in ddpm.api.default_export_dir().iterdir())
    plan = shipped.plan("unipc", 2)
    assert [_builds(ddpm.load(), plan) for _ in range(2)] == [1, 0]
    assert _builds(shipped, plan) == 0 and shipped.export_dir == ddpm.api.default_export_dir()
    assert sorted(p.name for p in ddpm.api.default_export_dir().iterdir()) == installed
    loaded = setup[0]
    a, b = (ddpm.load(loaded.path).plan("ddim", k) for k in (3, 4))
    assert [_builds(ddpm.load(loaded.path), p) for p in (a, b, a, b)] == [1, 1, 0, 0]
    model, c, counts = ddpm.load(loaded.path), ddpm.load(loaded.path).plan("ddim", 5), []
    pool = [threading.Thread(target=lambda: counts.append(_builds(model, c))) for _ in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sorted(counts) == [0, 1]
    # two Models (as two processes have) asking at once: the lock on the cache folder makes one build it
    d, counts = ddpm.load(loaded.path).plan("ddim", 6), []
    pool = [threading.Thread(target=lambda: counts.append(_builds(ddpm.load(loaded.path), d))) for _ in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sorted(counts) == [0, 1]
    # every plan's generator is kept, side by side, in the one cache folder of the weights
    b = ddpm.load(loaded.path).generator_bundle(a)
    assert sorted(g["steps"] for g in b.generators) == [3, 4, 5, 6]


@pytest.mark.slow
def test_quiet_gen_says_nothing_about_building(setup, tmp_path):
    ckpt = setup[0].path
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 3, "--engine", "onnx-generator", "-q",
               "--out", tmp_path / "a.png", env=env)
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines() == [r.output.strip()] and "building" not in r.output   # the summary alone


@pytest.mark.slow
def test_export_keeps_an_intact_generator_and_rebuilds_a_damaged_one(ckpt, tmp_path):
    """`ddpm export --generator` (and so `--web`) run again on the same folder keeps the verified generator of the
    plan as it keeps model.onnx; a generator that no longer matches its sha256 is built again."""
    out = tmp_path / "exp"
    args = ("export", "--ckpt", ckpt, "--out", out, "--generator", "--sampler", "ddim", "--steps", 3)
    first = invoke(*args)
    assert first.exit_code == 0 and "building generator.onnx" in first.output, first.output
    gen = out / Bundle.load(out).generator()["name"]
    before = gen.stat()
    again = invoke(*args)
    assert again.exit_code == 0 and "building generator.onnx" not in again.output, again.output
    assert "kept (made and verified before)" in again.output
    assert (gen.stat().st_ino, gen.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with open(gen, "ab") as f:
        f.write(b"\0")
    third = invoke(*args)
    assert third.exit_code == 0 and "building generator.onnx" in third.output, third.output
    Bundle.load(out).generator_path(Bundle.load(out).generator()["plan_key"])   # intact again


@pytest.mark.parametrize("whole_loop", [True, False])
def test_the_progress_bar_counts_what_the_engine_reports_as_it_happens(capsys, whole_loop):
    """A row-by-row engine moves the bar once per row as it runs it; a whole-loop engine (onnx-generator, whose
    rows are known only when its one call returns) moves it once per call, in batches: no bar of rows that jumps
    from 1 to the end after the work."""
    from ddpm.runtime.engine import Supports
    from ddpm.runtime.generate import iter_generate
    from ddpm.runtime.schedule import Schedule

    plan = ddim_plan(Schedule.make("linear", 100), 4)

    class Stub:
        name, device = ("onnx-generator" if whole_loop else "onnx"), "cpu"
        supports = Supports(edits=False, states=not whole_loop)

        def run(self, x_T, z, labels, plan, guidance, callback=None, **_):
            for i in range(plan.steps):   # the generator reports its rows after its one call, as GeneratorEngine
                if callback is not None:
                    callback(i, int(plan.timesteps[i]), None, None)
            return np.zeros((len(x_T), 28, 28), np.uint8)

    parts = list(iter_generate(Stub(), 5, plan, labels_for(5, None, True), seed=0, batch=2, progress=True,
                               image_shape=MNIST))
    assert sum(len(p) for p in parts) == 5
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    if whole_loop:
        assert "3/3" in final and "batch" in final and "whole loop per call" in final, final
    else:
        assert "12/12" in final and "step" in final, final
