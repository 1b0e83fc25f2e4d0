"""The browser page of `ddpm export --web`: its JS noise stream against numpy (node), the export's checks, and the page
itself in headless Chromium against `ddpm gen` for the same seed."""

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm.cli import main
from ddpm.export import web
from ddpm.export.web import WebExportError, ort_web_tarball, write_page
from ddpm.model.io import load_model
from ddpm.runtime.bundle import Bundle
from ddpm.runtime.noise import normals

HERE = Path(__file__).resolve().parent
NOISE_JS = HERE.parent / "export" / "page" / "noise.mjs"
DUMP_JS = HERE / "js" / "noise_dump.mjs"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed: export/page/noise.mjs is not tested")


def _js_normals(*cases) -> np.ndarray:
    args = [str(v) for case in cases for v in case]
    out = subprocess.run([NODE, str(DUMP_JS), str(NOISE_JS), *args], capture_output=True, check=True, timeout=120)
    return np.frombuffer(out.stdout, dtype=np.float32)


@needs_node
def test_js_noise_is_the_numpy_stream_bit_for_bit():
    """Philox4x32-10 with the 64-bit seed/index split, Box-Muller in float64, float32: every value identical."""
    big = 2**64 - 1
    cases = [(s, k, first, 784) for s in (0, 1, 2**32 - 1, 2**32 + 7, 2**40 + 5, big)
             for k in (0, 1, 5, 2**32 + 3, big) for first in (0, 784 * 3)]
    cases += [(123, k, 0, 784) for k in range(200)]          # 156,800 values of one seed
    cases += [(9, 2, 8, 6)]                                   # a count that is not a multiple of 4
    js = _js_normals(*cases)
    ref = np.concatenate([normals(*c) for c in cases])
    assert js.shape == ref.shape
    assert np.array_equal(js.view(np.uint32), ref.view(np.uint32))   # bit for bit, signed zeros included


@needs_node
@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_js_noise_refuses_bad_seeds(seed):
    code = (f"import('{NOISE_JS.as_uri()}').then(m => m.normals('{seed}', 0n, 0, 4))"
            ".catch(e => { console.error(e.name + ': ' + e.message); process.exit(3); })")
    r = subprocess.run([NODE, "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "RangeError: seed must be an integer in 0..2^64-1" in r.stderr


@pytest.fixture(scope="module")
def exported(tiny_generator_exported):
    """A tiny model exported with a 4-step generator (shared with test_folder_outputs.py)."""
    root = tiny_generator_exported(3, "--steps", 4)
    return load_model(root), root


@pytest.mark.slow
def test_web_export_refuses_what_it_must(exported, tmp_path):
    _, root = exported
    bundle = Bundle.load(root / "exp")
    fake = tmp_path / "onnxruntime-web-1.30.0.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(web.PAGE_SRC / "app.mjs", arcname="package/dist/ort.wasm.min.mjs")
    with pytest.raises(WebExportError, match="is not onnxruntime-web"):
        ort_web_tarball(fake)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(WebExportError, match="not a page written by"):
        write_page(bundle, foreign, 0.3, ort_tarball=fake)
    assert (foreign / "notes.txt").read_text() == "keep me"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(exported[0].path), "--out", str(tmp_path / "e"),
                                  "--web", str(tmp_path / "page"), "--steps", "2", "--ort-web", str(fake)])
    assert r.exit_code == 1 and "is not onnxruntime-web" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "page").exists()


@pytest.fixture(scope="module")
def site(exported, tmp_path_factory):
    """The page of the tiny model's 4-step generator (onnxruntime-web fetched with npm, or skipped saying why)."""
    loaded, root = exported
    try:
        tarball = ort_web_tarball(log=lambda *_: None)
    except WebExportError as e:
        pytest.skip(f"onnxruntime-web is not available here: {e}")
    page = root / "site"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(loaded.path), "--out", str(root / "exp"), "--generator",
                                  "--steps", "4", "--web", str(page), "--ort-web", str(tarball)])
    assert r.exit_code == 0, r.output
    return loaded, root / "exp", page


@pytest.mark.slow
def test_page_files(site):
    _, exp, page = site
    names = {p.relative_to(page).as_posix() for p in page.rglob("*") if p.is_file()}
    assert names == {"index.html", "app.mjs", "labels.mjs", "noise.mjs", "generator.onnx", "model.json",
                     "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.wasm",
                     "ort/package.json"}
    meta = json.loads((page / "model.json").read_text())
    assert meta["generator_sha256"] == Bundle.load(exp).generator()["sha256"] and meta["steps"] == 4
    assert json.loads((page / "ort" / "package.json").read_text())["version"] == web.ORT_WEB["version"]


def _gen_png(loaded, exp, tmp_path, *args) -> np.ndarray:
    out = tmp_path / "gen.png"
    r = CliRunner().invoke(main, ["gen", "--ckpt", str(loaded.path), "--engine", "onnx", "--export", str(exp),
                                  "--steps", "4", "-q", "--out", str(out), *map(str, args)])
    assert r.exit_code == 0, r.output
    return np.array(Image.open(out))


@pytest.mark.slow
def test_page_in_chromium_draws_the_digits_of_ddpm_gen(site, tmp_path):
    """Headless Chromium loads the page from 127.0.0.1, generates, and its canvas is `ddpm gen`'s PNG for the same
    seed, class and guidance (within 2 grey levels)."""
    pytest.importorskip("playwright", reason="the python package playwright is not installed (pip install "
                                             "playwright): the page is not tested in a browser")
    import browser

    chromium = browser.find_chromium()
    if chromium is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium; or set DDPM_CHROMIUM): the page is not "
                    "tested in a browser")
    loaded, exp, page_dir = site
    # the first run at the guidance the page loads (gen's default, 0.45), then scales the browser's own number
    # validation (step, max) blocked without a word: Generate did nothing
    runs = [("turn", 4, None, 3, ()), ("turn", 12, 1.0, 2**40 + 5, ()), ("3", 5, 0.45, 7, ("--label", 3)),
            ("2", 3, 25, 5, ("--label", 2)), ("none", 3, 0.0, 11, ("--uncond",))]
    with browser.open_page(page_dir, chromium) as page:
        for label, count, w, seed, flags in runs:
            res = browser.generate(page, label, count, w, seed, timeout_s=300)
            assert res["state"] == "done", res["status"]
            ref = _gen_png(loaded, exp, tmp_path, "-n", count, *(() if w is None else ("-w", w)), "--seed", seed,
                           *flags)
            canvas = res["canvas"]
            assert canvas.shape[:2] == ref.shape and (canvas[..., 3] == 255).all()
            assert (canvas[..., 0] == canvas[..., 1]).all() and (canvas[..., 0] == canvas[..., 2]).all()
            assert ref.std() > 5                                            # digits, not a blank grid
            assert np.abs(canvas[..., 0].astype(int) - ref).max() <= 2, (label, seed)
            assert f"--seed {seed}" in res["cli"] and res["ms"] > 0
        res = browser.generate(page, "turn", 2, 0.3, "-3")
        assert res["state"] == "error" and "seed must be an integer" in res["status"]
        for w in ("", 101):   # an empty field is no guidance 0; over model.json's max_guidance (gen's)
            res = browser.generate(page, "turn", 2, w, 0)
            assert res["state"] == "error" and "guidance must be a number in 0..100" in res["status"], res["status"]


def test_what_export_and_the_page_write_holds_no_local_path(exported, tmp_path, monkeypatch):
    """Every file `ddpm export` (with --fp16 and a generator) and `--web` write is free of the builder's local paths
    (the folders given, the checkpoint's, the home and working folders, the Python environment): a published page
    or export folder says nothing about the machine that made it. The page's command names the export folder DIR,
    which the page explains by the weights' hash (model.json checkpoint_hash)."""
    import os
    import sys

    loaded, root = exported
    fake = tmp_path / "onnxruntime-web-1.30.0.tgz"   # a stand-in tarball with the files taken from it, pinned here
    with tarfile.open(fake, "w:gz") as tar:
        for rel in web.ORT_FILES:
            tar.add(web.PAGE_SRC / "app.mjs", arcname=f"package/{rel}")
    monkeypatch.setitem(web.ORT_WEB, "integrity", web.integrity(fake))
    out, page = tmp_path / "exp", tmp_path / "site"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(loaded.path), "--out", str(out), "--fp16", "--generator",
                                  "--steps", "2", "--web", str(page), "--ort-web", str(fake)])
    assert r.exit_code == 0, r.output
    local = {str(p) for p in (tmp_path, root, Path(loaded.path).resolve().parent, Path.home(), Path.cwd(),
                              Path(sys.prefix), HERE.parent) if len(str(p)) > 4}
    written = [p for folder in (out, page) for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"export.json", "model.onnx", "model_fp16.onnx", "model.json", "index.html"}
    for path in written:
        data = path.read_bytes()
        found = [p for p in local if os.fsencode(p) in data]
        assert not found, f"{path.relative_to(tmp_path)} holds {found}"
    meta = json.loads((page / "model.json").read_text())
    assert meta["gen_options"].endswith(" --export DIR") and len(meta["checkpoint_hash"]) == 64
    # the page's form holds w to gen's range, from model.json (a page's w of 150 showed a command gen refuses)
    from ddpm.options import MAX_GUIDANCE

    assert meta["max_guidance"] == MAX_GUIDANCE
    assert "guidance > meta.max_guidance" in (page / "app.mjs").read_text()


def test_web_page_with_int8_refused_in_one_line(exported, tmp_path):
    """`export --int8 --web` is refused before any work (export/web.py INT8_REFUSAL: onnxruntime-web runs the int8
    generator, but its digits are not `ddpm gen --int8`'s for the same seed); nothing is written."""
    loaded, _ = exported
    r = CliRunner().invoke(main, ["export", "--ckpt", str(loaded.path), "--out", str(tmp_path / "e"), "--int8",
                                  "--web", str(tmp_path / "page")])
    assert r.exit_code == 2 and "--web writes the fp32 page only" in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("Error")]) == 1, r.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "page").exists()
