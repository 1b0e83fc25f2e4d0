import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ddpm.cli import main
from ddpm.export import onnx_export
from ddpm.export.onnx_export import ExportFailed, export, ort_session
from ddpm.model.io import load_model
from ddpm.runtime.bundle import Bundle, ExportError
from helpers import slow_except, tiny_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_exported):
    root = tiny_exported(fp16=True)
    return load_model(root), root / "exp"


def _run(sess, x, t, y, dtype=np.float32):
    return sess.run(["eps"], {"x": x.numpy().astype(dtype), "t": t.numpy(), "y": y.numpy()})[0].astype(np.float32)


@pytest.mark.slow
def test_parity_dynamic_batch_and_inputs_used(exported):
    loaded, out = exported
    b = Bundle.load(out)
    fp32, fp16 = ort_session(b.onnx_path("fp32")), ort_session(b.onnx_path("fp16"))
    for n in (1, 3, 8):
        g = torch.Generator().manual_seed(n)
        x, t, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 100, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)
        with torch.no_grad():
            ref = loaded.model(x, t, y).numpy()
        assert np.abs(_run(fp32, x, t, y) - ref).max() <= 1e-4
        assert np.abs(_run(fp16, x, t, y, np.float16) - ref).max() <= 2e-2 * ref.std()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 99]), torch.tensor([3, 10])
    base = _run(fp32, x, t, y)
    assert np.abs(_run(fp32, x, t.flip(0), y) - base).max() > 1e-3           # timestep is a real input
    assert np.abs(_run(fp32, x, t, torch.tensor([4, 10])) - base).max() > 1e-3  # and so is the label


def test_graph_inputs_and_metadata(exported):
    loaded, out = exported
    m = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["x", "t", "y"] and [o.name for o in m.graph.output] == ["eps"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.opset_import[0].version >= 17
    onnx.checker.check_model(m)
    m16 = onnx.load(str(out / "model_fp16.onnx"))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert m16.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    embedded = json.loads({p.key: p.value for p in m.metadata_props}["ddpm"])
    meta = json.loads((out / "export.json").read_text())
    assert embedded["checkpoint_hash"] == meta["checkpoint_hash"] == loaded.hash
    b = Bundle.load(out, expected_hash=loaded.hash)
    assert b.null_label == 10 and b.image_shape == (1, 28, 28) and meta["T"] == 100
    assert np.allclose(b.schedule.alphas_cumprod, meta["alphas_cumprod"])
    for f in meta["files"].values():
        assert f["parity"]["error"] <= f["parity"]["tolerance"]


# the opset case exports every precision again: in the loop, test_int8.py exports again at another opset
@pytest.mark.parametrize("opset", slow_except([None, 18], None))
def test_an_export_folder_gains_artifacts_and_never_loses_one(tiny_exported, opset):
    """`ddpm export --fp16`, then an export without --fp16 (e.g. to add a generator): the fp16 model, the generators
    and other artifacts (TensorRT engines) of the folder stay; only what is missing is exported."""
    root = tiny_exported(fp16=True)   # the session's `export --fp16` of the tiny model
    loaded, out = load_model(root), root / "exp"
    (out / "model_b1-8.plan").write_bytes(b"an engine")
    fp16 = (out / "model_fp16.onnx").read_bytes()
    lines = []
    res = export(loaded, out, log=lines.append)
    assert set(res.meta["files"]) == {"fp32", "fp16"} and (out / "model_fp16.onnx").read_bytes() == fp16
    assert (out / "model_b1-8.plan").read_bytes() == b"an engine" and all("kept" in line for line in lines)
    Bundle.load(out, expected_hash=loaded.hash).onnx_path("fp16")
    if opset is None:
        return
    res = export(loaded, out, opset=opset, log=lambda *_: None)  # another opset: every precision made again
    assert set(res.meta["files"]) == {"fp32", "fp16"} and res.meta["opset"] == 18
    assert (out / "model_b1-8.plan").is_file()


def test_hash_mismatch_refused(exported):
    _, out = exported
    with pytest.raises(ExportError, match="not from the checkpoint asked for"):
        Bundle.load(out, expected_hash="0" * 64)


def test_corrupted_and_truncated_onnx(exported, tmp_path):
    import shutil

    _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="corrupted or truncated"):
        Bundle.load(copy).onnx_path("fp32")
    (copy / "export.json").write_text("{not json")
    with pytest.raises(ExportError, match="unreadable"):
        Bundle.load(copy)
    with pytest.raises(ExportError, match="not an export folder"):
        Bundle.load(tmp_path / "nothing")
    # the folder's export.json given for the folder: said so, not "no export.json"
    with pytest.raises(ExportError, match="export.json is a file, not an export folder: give the folder"):
        Bundle.load(copy / "export.json")


@pytest.mark.slow
def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    loaded = tiny_checkpoint(tmp_path)
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", 0.0)
    monkeypatch.setattr(onnx_export, "verify", _always_fails)
    with pytest.raises(ExportFailed, match="disagrees"):
        export(loaded, tmp_path / "exp", log=lambda *_: None)
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.*"))


def _always_fails(path, *a, **k):
    raise ExportFailed(f"{path.name} (fp32) disagrees with PyTorch: max abs error 1 > 0")


@pytest.mark.slow
def test_cli_export_and_trt_without_tensorrt(tmp_path):
    tiny_checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "e"), "--fp16"])
    assert r.exit_code == 0, r.output
    assert "model_fp16.onnx" in r.output and (tmp_path / "e" / "export.json").is_file()
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path), "--batch", "5-2"])
    assert r.exit_code == 2 and "--batch" in r.output
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "t"), "--trt"])
        assert r.exit_code == 1 and "TensorRT is not installed" in r.output and "pip install" in r.output
        assert not (tmp_path / "t").exists()


@pytest.mark.gpu
def test_trt_engine_build(exported):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from ddpm.export.trt import ensure_engine

    _, out = exported
    b = Bundle.load(out)
    plan = ensure_engine(b, "fp32", 1, 8, log=lambda *_: None)
    assert plan.is_file() and plan.with_suffix(".plan.json").is_file()
    built = []
    assert ensure_engine(b, "fp32", 1, 4, opt_batch=4, log=built.append) == plan and not built   # covered: reused


@pytest.mark.slow
def test_a_first_use_export_makes_only_what_the_call_needs(tmp_path, monkeypatch):
    """The first use of a checkpoint on the onnx engine exports fp32 alone: an fp16 model the call did not ask for
    can neither fail it (its verification failing, as it did for a barely trained network) nor slow it. The first
    call with fp16 adds model_fp16.onnx to the same folder, model.onnx kept."""
    import ddpm

    tiny_checkpoint(tmp_path, seed=22)
    model = ddpm.load(tmp_path)
    verify = onnx_export.verify

    def fp16_fails(path, reference, precision, *a, **k):
        if precision == "fp16" and fails:
            raise ExportFailed(f"{path.name} (fp16) disagrees with PyTorch")
        return verify(path, reference, precision, *a, **k)

    fails = True
    monkeypatch.setattr(onnx_export, "verify", fp16_fails)
    b = model.bundle()
    assert set(b.meta["files"]) == {"fp32"} and not (b.root / "model_fp16.onnx").exists()
    fp32 = (b.root / "model.onnx").read_bytes()
    with pytest.raises(ddpm.DdpmError, match=r"^export failed: model_fp16\.onnx \(fp16\) disagrees"):
        model.bundle(fp16=True)
    assert set(model.bundle().meta["files"]) == {"fp32"}        # the fp32 export is still there, untouched
    fails = False
    b16 = model.bundle(fp16=True)
    assert b16.root == b.root and set(b16.meta["files"]) == {"fp32", "fp16"}
    assert (b.root / "model.onnx").read_bytes() == fp32


@pytest.mark.parametrize("scale", slow_except([1e-5, 1e-6, 1e-7], 1e-7))
def test_fp16_verification_holds_for_a_network_whose_eps_is_near_0(tmp_path, scale):
    """fp16's tolerance is relative to eps's std, floored at fp16's smallest normal number 2^-14: below it fp16
    rounds to a fixed step of 2^-24, so a network whose eps is near 0 (a barely trained one: its output layer starts
    at zero) is exported; a wrong fp16 model of a network with eps at its usual scale is still refused."""
    from helpers import TINY, randomised_unet

    def net(out_scale):
        m = randomised_unet(TINY, seed=0)
        with torch.no_grad():
            m.conv_out.weight.mul_(out_scale)
            m.conv_out.bias.mul_(out_scale)
        return m.eval()

    onnx_export.to_onnx(net(scale), tmp_path / "small.onnx", "fp16")
    res = onnx_export.verify(tmp_path / "small.onnx", net(scale), "fp16", TINY.timesteps)
    assert res["eps_std"] < 2.0**-14 and res["error"] <= onnx_export.TOLERANCE["fp16"]
    onnx_export.to_onnx(net(1.05), tmp_path / "wrong.onnx", "fp16")   # eps 5% off at eps std about 0.3
    with pytest.raises(ExportFailed, match="disagrees"):
        onnx_export.verify(tmp_path / "wrong.onnx", net(1.0), "fp16", TINY.timesteps)


def test_exports_into_one_folder_take_turns(tiny_exported):
    """Two exports into one folder: the second waits for the first (export/cache.py locked, the lock gen's first-use
    builds hold), saying so, instead of having the temporaries it writes inside the folder swept away when the
    other publishes it (a FileNotFoundError traceback from add_generator). Here this test holds the lock."""
    import threading

    from ddpm import api
    from ddpm.export.cache import locked
    from ddpm.export.chain import export_folder

    root = tiny_exported()
    model, out = api.load(root / "model.safetensors"), root / "exp"
    before = (out / "export.json").read_bytes()
    said, done = [], []
    with locked(out):
        t = threading.Thread(target=lambda: done.append(export_folder(model, out, log=said.append)))
        t.start()
        for _ in range(600):   # the first line it says, at most 60 s
            if said or not t.is_alive():
                break
            t.join(0.1)
        assert t.is_alive() and not done and said == [f"waiting for another export into {out} to end"], said
        assert (out / "export.json").read_bytes() == before
    t.join(120)
    assert done and done[0].root == out and "model.onnx: kept (made and verified before)" in said, said
