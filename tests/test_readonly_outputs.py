"""A file of a run, export or page folder that its owner made read-only (no write bit) is refused before any work
in one line, never replaced (files.check_writable's rule, docs/reliability.md)."""

import json
import os

import pytest

from ddpm.export.onnx_export import export
from ddpm.export.web import claim_page
from ddpm.files import OutputError
from ddpm.model.io import load_model
from ddpm.train.loop import TrainConfig, TrainingError, train
from helpers import invoke


def test_train_resume_refuses_a_read_only_run_file(fake_mnist, tmp_path, small_sample_grids):
    cfg = dict(data=str(fake_mnist), out=str(tmp_path / "run"), preset="tiny", batch_size=4, ckpt_every=2,
               log_every=2, warmup=1, timesteps=50, device="cpu")
    train(TrainConfig(**cfg, steps=2), progress=False, log=lambda *_: None)
    for name in ("model.safetensors", "samples.png", "options.json"):
        path = tmp_path / "run" / name
        before = path.read_bytes()
        os.chmod(path, 0o444)
        with pytest.raises(TrainingError, match=f"--out: cannot write {path}: it is read-only \\(mode 444\\)"):
            train(TrainConfig(**cfg, steps=4), resume=True, progress=False, log=lambda *_: None)
        assert path.read_bytes() == before and oct(os.stat(path).st_mode & 0o777) == "0o444"
        os.chmod(path, 0o644)


def test_export_refuses_a_read_only_export_json(tiny_exported):
    root = tiny_exported(0)
    exp = root / "exp"
    meta = exp / "export.json"
    before = meta.read_bytes()
    os.chmod(meta, 0o444)
    with pytest.raises(OutputError, match="it is read-only"):
        export(load_model(root), exp, fp16=True, log=lambda *_: None)
    r = invoke("export", "--ckpt", root, "--out", exp, "--fp16")
    assert r.exit_code == 1 and r.output == f"Error: cannot write {meta}: it is read-only (mode 444); make it " \
                                            f"writable (chmod u+w) to replace it, or give another path\n", r.output
    assert meta.read_bytes() == before and not (exp / "model_fp16.onnx").exists()
    assert oct(os.stat(meta).st_mode & 0o777) == "0o444"


def test_a_page_with_a_read_only_model_json_is_refused(tiny_exported, tmp_path):
    from ddpm.export.web import MARKER_KEYS

    weights = load_model(tiny_exported(0)).hash
    page = tmp_path / "site"
    page.mkdir()
    (page / "model.json").write_text(json.dumps({**{k: 0 for k in MARKER_KEYS}, "checkpoint_hash": weights}))
    claim_page(page, weights)   # a page of these weights: it may be replaced
    os.chmod(page / "model.json", 0o444)
    with pytest.raises(OutputError, match="it is read-only"):
        claim_page(page, weights)


def test_export_keeps_the_mode_of_the_export_json_it_replaces(tiny_exported):
    root = tiny_exported(0)
    meta = root / "exp" / "export.json"
    os.chmod(meta, 0o600)
    export(load_model(root), root / "exp", fp16=True, log=lambda *_: None)
    assert "model_fp16.onnx" in meta.read_text() and oct(os.stat(meta).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name, plant", [("bench.json", "read-only"), ("bench.md", "read-only"),
                                         ("bench.png", "read-only"), ("bench.md", "folder"),
                                         ("bench.json", "pipe"), ("bench.json", "dangling link")])
def test_bench_checks_every_file_it_writes_before_any_work(ckpt, tmp_path, monkeypatch, name, plant):
    """`bench --out DIR` checked the folder alone: a read-only bench.json or bench.md was replaced, and a folder, a
    pipe or a dangling link at one of them was found after the timing runs, with bench.json already written."""
    import sys
    import types

    from ddpm.bench import speed

    if name == "bench.png":   # written when matplotlib can be imported: so checked then too
        monkeypatch.setitem(sys.modules, "matplotlib", sys.modules.get("matplotlib") or types.ModuleType("matplotlib"))

    def timed(*args, **kwargs):
        raise RuntimeError("the benchmark ran before its outputs were checked")

    monkeypatch.setattr(speed, "run_bench", timed)
    out = tmp_path / "b"
    out.mkdir()
    target = out / name
    if plant == "read-only":
        target.write_text("mine")
        os.chmod(target, 0o444)
    elif plant == "folder":
        target.mkdir()
    elif plant == "pipe":
        os.mkfifo(target)
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = sorted((p.name, p.is_dir()) for p in out.iterdir())
    r = invoke("bench", "--quick", "--engines", "torch", "--no-baseline", "--ckpt", ckpt, "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Invalid value for --out: cannot write {target}" in r.output, r.output
    if plant == "read-only":
        assert "it is read-only (mode 444)" in r.output and target.read_text() == "mine"
        assert oct(os.stat(target).st_mode & 0o777) == "0o444"
    assert sorted((p.name, p.is_dir()) for p in out.iterdir()) == before
