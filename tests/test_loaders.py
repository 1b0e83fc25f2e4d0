"""Every loader checks what it reads against its schema and fails with one line (no traceback) naming the problem:
checkpoints (ckpt.pt, model.safetensors), export folders (export.json, ONNX I/O), TensorRT records, samples files,
MNIST, the classifier."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddpm.errors import DdpmError
from ddpm.model.io import CheckpointError, load_checkpoint, read_model_info, save_checkpoint
from ddpm.runtime.bundle import Bundle, ExportError
from ddpm.samples import SamplesError, read_samples
from ddpm.schema import Array, Int, List, Schema
from ddpm.train.data import DataError, load_mnist, write_idx
from helpers import TINY, invoke, randomised_unet, tiny_checkpoint


def one_line_error(r, code=1):
    """The CLI failed with `code` and a single 'Error: ...' line, no traceback."""
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (KeyError, TypeError, ZeroDivisionError))
    assert lines[-1].startswith("Error:"), r.output
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tiny_checkpoint(root)
    return root


def _rewrite(src, dst, meta=None, tensors=None):
    """A copy of a model.safetensors with other metadata and/or tensors."""
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        old = f.metadata()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else load_file(str(src / "model.safetensors")),
              str(dst / "model.safetensors"), metadata=old if meta is None else meta(old))
    return dst


# ------------------------------------------------------------------------------------------------------ schema
def test_schema_names_entry_and_dimension_source():
    s = Schema("thing", {"T": Int(min=2, dim="T"), "betas": List(Int(), length="T"),
                         "x": Array(("uint8",), ("N", 2)), "y": Array(("int",), ("N",), min=-1, max=9)},
               hint="make another")
    ok = {"T": 2, "betas": [1, 2], "x": np.zeros((3, 2), np.uint8), "y": np.array([-1, 0, 9])}
    assert s.check(ok, "f") == {"T": 2, "N": 3}
    bad = [({"betas": [1, 2, 3]}, "betas holds 3 items, but T = 2 (from T); make another"),
           ({"y": np.zeros(4, np.int64)}, "y has shape (4,), but N = 3 (from x)"),
           ({"y": np.zeros(3)}, "y must be any int type, got float64"),
           ({"y": np.array([0, 1, 10])}, "y must hold values in -1..9"),
           ({"T": True}, "T must be an integer >= 2, got True"),
           ({"x": np.zeros((3, 3), np.uint8)}, "x must be an array of uint8 of shape (N, 2)")]
    for change, message in bad:
        with pytest.raises(ValueError) as e:
            s.check({**ok, **change}, "f")
        assert message in str(e.value)
    with pytest.raises(ValueError, match="f: an incomplete thing: it lacks 'x'; make another"):
        s.check({k: v for k, v in ok.items() if k != "x"}, "f")
    with pytest.raises(ValueError, match="f: not a thing .*a list"):
        s.check([1, 2], "f")


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("case, message", [
    ("noconfig", "lacks 'config'"),
    ("config_not_json", "config is not JSON"),
    ("step_not_json", "step is not JSON"),
    ("groups0", "groups must be an integer >= 1, got 0"),
    ("image_size_str", "image_size must be an integer in 1..1024, got '28'"),
    ("config_list", "config must be a model config (an object), got a list"),
    ("nan_weights", "non-finite values"),
    ("missing_weight", "weights do not fit the stored config"),
])
def test_bad_model_safetensors_is_one_line(model_dir, tmp_path, case, message):
    cfg = json.loads(_meta(model_dir)["config"])
    state = load_file(str(model_dir / "model.safetensors"))
    variants = {
        "noconfig": dict(meta=lambda m: {"format": m["format"]}),
        "config_not_json": dict(meta=lambda m: dict(m, config="{groups: 4")),
        "step_not_json": dict(meta=lambda m: dict(m, step="one")),
        "groups0": dict(meta=lambda m: dict(m, config=json.dumps(dict(cfg, groups=0)))),
        "image_size_str": dict(meta=lambda m: dict(m, config=json.dumps(dict(cfg, image_size="28")))),
        "config_list": dict(meta=lambda m: dict(m, config="[1, 2]")),
        "nan_weights": dict(tensors={k: v * float("nan") for k, v in state.items()}),
        "missing_weight": dict(tensors=dict(list(state.items())[1:])),
    }
    bad = _rewrite(model_dir, tmp_path / case, **variants[case])
    for cmd in (["gen", "--ckpt", bad, "-n", 1, "--steps", 2, "--out", tmp_path / "x.png"],
                ["export", "--ckpt", bad, "--out", tmp_path / "e"]):
        line = one_line_error(invoke(*cmd))
        assert message in line and "model.safetensors" in line, line
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e").exists()


def _meta(d):
    with safe_open(str(d / "model.safetensors"), "np") as f:
        return f.metadata()


def _ckpt_state(cfg=TINY, step=3):
    m = randomised_unet(cfg)
    opt = torch.optim.Adam(m.parameters())
    return {"step": step, "model": m.state_dict(), "ema": m.state_dict(), "opt": opt.state_dict(),
            "model_config": cfg.to_dict(), "train_config": {}, "torch_rng": torch.get_rng_state()}


@pytest.mark.parametrize("drop, message", [("ema", "lacks 'ema'"), ("model_config", "lacks 'model_config'"),
                                           ("step", "lacks 'step'")])
def test_incomplete_ckpt_is_one_line_for_gen_and_resume(fake_mnist, tmp_path, drop, message):
    state = _ckpt_state()
    del state[drop]
    save_checkpoint(tmp_path / "ckpt.pt", state)
    one = one_line_error(invoke("gen", "--ckpt", tmp_path / "ckpt.pt", "-n", 1, "--steps", 2, "--out",
                                tmp_path / "x.png"))
    assert message in one and "ckpt.pt" in one
    two = one_line_error(invoke("train", "--data", fake_mnist, "--out", tmp_path, "--preset", "tiny", "--timesteps",
                                100, "--steps", 6, "--batch", 8, "--resume", "--device", "cpu"))
    assert message in two and "--resume" in two


def test_a_model_file_naming_another_network_is_one_line(fake_mnist, tmp_path):
    """`"network": "diffusers"` in a model.safetensors or ckpt.pt config skipped every check of the UNet's
    architecture and size (validate leaves a diffusers network's to its folder) while the UNet was still built from
    it: groups 3 gave a ValueError traceback, image_size 1024 tens of GB of activations. Such a file is refused."""
    import ddpm

    tiny_checkpoint(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps(dict(json.loads(meta["config"]), network="diffusers", groups=3))
    save_file(state, str(tmp_path / "model.safetensors"), metadata=meta)
    why = "its config names the network 'diffusers', but a model file of ddpm holds ddpm's UNet"
    with pytest.raises(DdpmError, match=why):
        ddpm.load(tmp_path / "model.safetensors").generate(1, steps=2, engine="torch")
    line = one_line_error(invoke("gen", "--ckpt", tmp_path / "model.safetensors", "--engine", "torch", "-n", 1,
                                 "--steps", 2, "--out", tmp_path / "x.png"))
    assert why in line, line
    ckpt = _ckpt_state()
    ckpt["model_config"] = dict(ckpt["model_config"], network="diffusers", groups=3)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "ckpt.pt", ckpt)
    for args in (["gen", "--ckpt", tmp_path / "run" / "ckpt.pt", "--engine", "torch", "-n", 1, "--steps", 2, "--out",
                  tmp_path / "x.png"],
                 ["train", "--data", fake_mnist, "--out", tmp_path / "run", "--resume", "--device", "cpu"]):
        line = one_line_error(invoke(*args))
        assert why in line, line


def test_ckpt_entries_of_the_wrong_kind(tmp_path):
    for change, message in (({"step": "3"}, "step must be an integer in 0..9223372036854775807"),
                            ({"step": 2**70}, "step must be an integer in 0..9223372036854775807, got 1180591620717"),
                            ({"opt": [1, 2]}, "opt must be an optimizer state"),
                            ({"torch_rng": torch.zeros(3)}, "torch_rng must be uint8"),
                            ({"model": {"w": torch.tensor([float("inf")])}}, "non-finite")):
        save_checkpoint(tmp_path / "ckpt.pt", {**_ckpt_state(), **change})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "ckpt.pt")
    # what inference needs is there: the model loads although the training state is damaged
    save_checkpoint(tmp_path / "ckpt.pt", {**_ckpt_state(), "opt": None})
    assert read_model_info(tmp_path / "ckpt.pt")[0] == TINY


def test_resume_from_a_checkpoint_of_another_shape_is_one_line(fake_mnist, tmp_path):
    state = _ckpt_state()
    state["model"] = {"conv_in.weight": torch.zeros(1)}      # the schema's types hold, the shapes do not
    save_checkpoint(tmp_path / "ckpt.pt", state)
    line = one_line_error(invoke("train", "--data", fake_mnist, "--out", tmp_path, "--preset", "tiny",
                                 "--timesteps", 100, "--steps", 6, "--batch", 8, "--resume", "--device", "cpu"))
    assert "does not fit this model" in line


# --------------------------------------------------------------------------------------------- export folders
@pytest.fixture(scope="module")
def export_dir(model_dir, tiny_exported):
    return tiny_exported(0) / "exp"   # the export of model_dir's model (both tiny_checkpoint's seed 0)


@pytest.mark.parametrize("change, message", [
    (lambda m: [m], "not a ddpm export metadata (export.json) (it holds a list"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "it lacks 'files'"),
    (lambda m: {k: v for k, v in m.items() if k != "checkpoint_hash"}, "it lacks 'checkpoint_hash'"),
    (lambda m: dict(m, betas=m["betas"][:-1]), "betas holds 99 items, but T = 100 (from T)"),
    (lambda m: dict(m, T=50, betas=m["betas"][:50], alphas_cumprod=m["alphas_cumprod"][:50]),
     "T is 50 but its model_config says 100"),
    (lambda m: dict(m, null_label="10"), "null_label must be an integer"),
    (lambda m: dict(m, files={"fp32": {"name": "../../etc/passwd", "sha256": "0" * 64, "bytes": 1}}),
     "must be an .onnx file name"),
    (lambda m: dict(m, model_config=dict(m["model_config"], groups=0)), "groups must be an integer >= 1"),
])
def test_bad_export_json_is_one_line(model_dir, export_dir, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    meta = json.loads((bad / "export.json").read_text())
    (bad / "export.json").write_text(json.dumps(change(meta)))
    with pytest.raises(ExportError, match="re-run `ddpm export`"):
        Bundle.load(bad)
    line = one_line_error(invoke("gen", "--export", bad, "-n", 1, "--steps", 2, "--out", tmp_path / "x.png"))
    assert message in line, line
    assert not (tmp_path / "x.png").exists()


def test_an_integer_of_thousands_of_digits_is_one_line_in_our_words(export_dir, tmp_path):
    """An export.json entry of 5000 digits gave Python's advice to call sys.set_int_max_str_digits(), which means
    nothing to a user; JSON integers longer than any bound are refused as they are read, in one line."""
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    meta = json.loads((bad / "export.json").read_text())
    (bad / "export.json").write_text(json.dumps(dict(meta, step=0)).replace('"step": 0', '"step": ' + "9" * 5000))
    line = one_line_error(invoke("gen", "--export", bad, "-n", 1, "--steps", 2, "--out", tmp_path / "x.png"))
    assert "an integer of 5000 digits (at most 1000 are read)" in line and "set_int_max_str_digits" not in line, line


def test_onnx_with_other_input_names_is_one_line(model_dir, export_dir, tmp_path):
    import onnx

    from ddpm.runtime.bundle import file_sha256

    bad = tmp_path / "renamed"
    shutil.copytree(export_dir, bad)
    m = onnx.load(str(bad / "model.onnx"))
    for node in m.graph.node:
        node.input[:] = ["image" if i == "x" else i for i in node.input]
    m.graph.input[0].name = "image"
    onnx.save(m, str(bad / "model.onnx"))
    meta = json.loads((bad / "export.json").read_text())
    meta["files"]["fp32"].update(sha256=file_sha256(bad / "model.onnx"), bytes=(bad / "model.onnx").stat().st_size)
    (bad / "export.json").write_text(json.dumps(meta))
    for args in (["--export", bad], ["--ckpt", model_dir, "--export", bad, "--engine", "onnx"]):
        line = one_line_error(invoke("gen", *args, "-n", 1, "--steps", 2, "--out", tmp_path / "x.png"))
        assert "'image'" in line and "x, t, y -> eps" in line and "re-export" in line


def test_damaged_tensorrt_record_means_rebuild(tmp_path):
    """A .plan.json that is not JSON, is a list, lacks a key or has one of the wrong type: its engine is never
    reused (it is rebuilt), and nothing raises."""
    from ddpm.runtime import trt

    onnx_path = tmp_path / "model.onnx"
    plan, info = trt.engine_file_paths(onnx_path, 1, 8)
    plan.write_bytes(b"engine")
    want = {"tensorrt": "10.0", "gpu": "GPU", "onnx_sha256": "a" * 64}
    good = dict(want, min_batch=1, max_batch=8)
    info.write_text(json.dumps(good))
    assert trt.choose_engine(trt.engine_files(onnx_path), want, 1, 8, 8)[0] == plan
    for text in ("{not json", "[1, 2]", json.dumps({k: v for k, v in good.items() if k != "gpu"}),
                 json.dumps(dict(good, onnx_sha256=3)), json.dumps(dict(good, max_batch="8"))):
        info.write_text(text)
        assert trt.choose_engine(trt.engine_files(onnx_path), want, 1, 8, 8)[0] is None, text


# ------------------------------------------------------------------------------------------------ samples files
def _two_members(path, name):
    """A samples file whose zip holds `name` twice (all zeros, then ones): numpy reads the last, unzip the first."""
    import warnings
    import zipfile

    np.savez(path, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10))
    with warnings.catch_warnings(), zipfile.ZipFile(path.with_suffix(".npz"), "a") as zf:
        warnings.simplefilter("ignore")   # zipfile's "Duplicate name" warning: the duplicate is the point
        with zf.open(name, "w") as f:
            np.lib.format.write_array(f, np.ones((10, 28, 28), np.uint8) if "images" in name else np.arange(10))


def test_fortran_order_samples_are_read(tmp_path):
    """A samples file whose images numpy saved in Fortran order (np.savez of a transposed array) is read as it is
    meant, as C-contiguous arrays."""
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5)
    np.savez(tmp_path / "s.npz", images=np.asfortranarray(images), labels=np.asfortranarray(labels))
    got, got_labels = read_samples(tmp_path / "s.npz", (28, 28))
    assert np.array_equal(got, images) and got.flags.c_contiguous and np.array_equal(got_labels, labels)
    np.savez(tmp_path / "t.npz", images=np.ascontiguousarray(images.T).T, labels=labels)   # the same, as a view
    assert np.array_equal(read_samples(tmp_path / "t.npz")[0], images)


def test_big_endian_samples_are_read(tmp_path):
    """Labels stored big-endian (numpy's '>i8', as a file written on another machine or by astype('>i8')) are ints
    like any other: read as native int64, not refused as "not an int type"."""
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, -1, 0, 9, 4])
    np.savez(tmp_path / "s.npz", images=images, labels=labels.astype(">i8"))
    got, got_labels = read_samples(tmp_path / "s.npz", (28, 28))
    assert np.array_equal(got, images) and got_labels.dtype == np.int64 and got_labels.dtype.isnative
    assert np.array_equal(got_labels, labels)
    np.savez(tmp_path / "t.npz", images=images, labels=(labels + 20).astype(">i4"))
    with pytest.raises(SamplesError, match="labels must hold values in -1..9"):
        read_samples(tmp_path / "t.npz")


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10) * 1.0),
     "labels must be any int type, got float64"),
    (lambda p: np.savez(p, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(7)),
     "labels has shape (7,), but N = 10 (from images)"),
    (lambda p: np.savez(p, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10) + 5),
     "labels must hold values in -1..9"),
    (lambda p: np.savez(p, images=np.zeros((10, 28, 28)), labels=np.arange(10)), "images must be uint8"),
    (lambda p: np.savez(p, images=np.zeros((10, 28, 28), np.uint8)), "lacks 'labels'"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((10, 28, 28), np.uint8)), "a single .npy array"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"PK\x03\x04garbage"), "numpy cannot read it"),
    (lambda p: p.with_suffix(".npz").write_text("hello"), "not a samples file (not even an .npz"),
    (lambda p: _two_members(p, "images.npy"), "two members named 'images.npy'"),
])
def test_bad_samples_file_is_one_line(tmp_path, make, message):
    make(tmp_path / "s.npz")
    path = next(tmp_path.iterdir())
    with pytest.raises(SamplesError):
        read_samples(path)
    line = one_line_error(invoke("eval", "--samples", path, "--data", tmp_path / "nodata"))
    assert message in line and "ddpm gen" in line, line


# --------------------------------------------------------------------------------------------------------- MNIST
def test_corrupted_local_mnist_says_what_to_do(fake_mnist, tmp_path):
    data = tmp_path / "mnist"
    shutil.copytree(fake_mnist, data)
    (data / "train-labels-idx1-ubyte").write_bytes((data / "train-labels-idx1-ubyte").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated.*delete it .* or point --data"):
        load_mnist(data)
    line = one_line_error(invoke("train", "--data", data, "--out", tmp_path / "r", "--preset", "tiny",
                                 "--steps", 1, "--device", "cpu"))
    assert "train-labels-idx1-ubyte" in line and "delete it" in line and "--data" in line
    write_idx(data / "train-labels-idx1-ubyte", np.full(256, 11, np.uint8))
    with pytest.raises(DataError, match="labels must hold values <= 9.*delete the damaged file"):
        load_mnist(data)


def test_bad_classifier_file_is_one_line(tmp_path):
    from ddpm.evaluation import load_classifier

    (tmp_path / "c.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="not the weights of ddpm's MNIST classifier"):
        load_classifier(tmp_path / "c.safetensors")


def test_loader_errors_are_ddpm_errors():
    """One base type: the CLI turns every one of them into one line."""
    from ddpm.export.onnx_export import ExportFailed
    from ddpm.files import OutputError
    from ddpm.model.io import TorchMissing
    from ddpm.runtime.generate import NonFiniteSamples, OutOfMemory
    from ddpm.runtime.nets import EngineUnavailable
    from ddpm.train.loop import TrainingError

    for cls in (CheckpointError, TorchMissing, ExportError, ExportFailed, EngineUnavailable, DataError, SamplesError,
                TrainingError, OutputError, NonFiniteSamples, OutOfMemory):
        assert issubclass(cls, DdpmError), cls


def test_config_validation_covers_every_field():
    for change, message in (({"groups": 0}, "groups must be an integer >= 1"),
                            ({"channel_mults": ()}, "at least 1 item"),
                            ({"dropout": float("nan")}, "dropout must be a finite number"),
                            ({"base_channels": 9, "groups": 1}, "base_channels must be even"),
                            ({"schedule": "quadratic"}, "schedule must be one of")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(TINY, **change).validate()


def test_a_missing_onnx_package_is_one_line(tmp_path, monkeypatch):
    """PyTorch without the onnx package (a partial install): exporting, the first use of a checkpoint on the onnx
    engine and building a generator each say in one line what to install, never a ModuleNotFoundError."""
    import sys

    import ddpm
    from ddpm.export.generator import add_generator
    from ddpm.runtime.samplers import make_plan
    from helpers import invoke, tiny_checkpoint

    tiny_checkpoint(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # no export of these weights from other tests
    monkeypatch.setitem(sys.modules, "onnx", None)       # `import onnx` raises ImportError
    r = invoke("export", "--ckpt", tmp_path, "--out", tmp_path / "exp")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: exporting to ONNX needs the onnx package")
    with pytest.raises(ddpm.DdpmError, match="needs the onnx package"):
        ddpm.load(tmp_path).generate(2, engine="onnx")
    with pytest.raises(ddpm.DdpmError, match="needs the onnx package"):
        add_generator(tmp_path / "exp", make_plan(ddpm.load(tmp_path).schedule, "ddim", 3), 0.0)


def test_checkpoint_with_a_member_held_twice_is_refused(tmp_path):
    """A ckpt.pt whose zip holds a member twice (which zip readers pick differently) is refused before torch reads
    it, and checkpoint_step names no step from it."""
    import zipfile

    from ddpm.model.io import checkpoint_step

    save_checkpoint(tmp_path / "ckpt.pt", {"step": 3})
    assert checkpoint_step(tmp_path / "ckpt.pt") == 3
    with zipfile.ZipFile(tmp_path / "ckpt.pt") as src, zipfile.ZipFile(tmp_path / "twice.pt", "w") as dst:
        for m in src.infolist():
            dst.writestr(m, src.read(m))
        pkl = next(m for m in src.infolist() if m.filename.endswith("/data.pkl"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            dst.writestr(pkl, src.read(pkl))
    with pytest.raises(CheckpointError, match=r"two members named '.*/data.pkl'"):
        load_checkpoint(tmp_path / "twice.pt")
    assert checkpoint_step(tmp_path / "twice.pt") is None


def _with_key_twice(src, dst, where):
    """A copy of the safetensors file `src` whose header holds one key twice: a tensor name (where="tensor", its
    entry repeated) or a metadata entry (where="metadata", "format" repeated). The data offsets count from the
    data's start, so they stay valid."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    items = [(k, json.dumps(v)) for k, v in header.items()]
    meta_items = [(k, json.dumps(v)) for k, v in meta.items()]
    if where == "tensor":
        items.append(items[0])
    else:
        meta_items.append(("format", json.dumps("ddpm-other")))
    body = lambda pairs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    text = body(items + [("__metadata__", body(meta_items))]).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_a_safetensors_header_holding_a_key_twice_is_refused(tmp_path, where):
    """A model.safetensors whose JSON header names one tensor twice, or one metadata entry twice (which JSON
    readers take differently: Python the last value, others the first), is refused in one line, by the API and
    gen; a metadata value (JSON text itself) holding a key twice too."""
    d = tmp_path / "run"
    d.mkdir()
    tiny_checkpoint(d)
    bad = tmp_path / "twice.safetensors"
    _with_key_twice(d / "model.safetensors", bad, where)
    with pytest.raises(CheckpointError, match="appears twice in one JSON object"):
        read_model_info(bad)
    line = one_line_error(invoke("gen", "--ckpt", bad, "-n", 1, "--steps", 2, "--out", tmp_path / "x.png"))
    assert "appears twice in one JSON object" in line and str(bad) in line, line
    meta = _meta(d)
    config = meta["config"]
    meta["config"] = config[:-1] + ", " + config[1:]   # every config key twice
    save_file(load_file(d / "model.safetensors"), tmp_path / "config.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="appears twice in one JSON object"):
        read_model_info(tmp_path / "config.safetensors")


@pytest.mark.parametrize("content", [b"Name:\tcat\nState:\tR (running)\n", b"", b"\x80\x02garbage"])
def test_a_file_that_is_no_checkpoint_is_named_without_torchs_internal_errors(tmp_path, content):
    """A text file (or other bytes) given as a checkpoint: one line that says what the file is not, never the name
    of an exception from inside torch's reader (IndexError: list index out of range)."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a readable ddpm checkpoint") as e:
        load_checkpoint(path)
    assert not any(name in str(e.value) for name in ("IndexError", "KeyError", "AttributeError", "TypeError",
                                                    "EOFError")), e.value


def test_a_picture_or_archive_given_as_a_model_says_what_it_is(tmp_path, fake_mnist):
    """`ddpm.load("samples.png")` said "not a PyTorch file of tensors alone: Unsupported operand 80" (the pickle
    reader's words for a PNG's first byte): a file of a kind a user may mix up (a picture, MNIST's .gz, a samples
    .npz) is named as what it is, for a checkpoint path and for a .safetensors one alike."""
    import ddpm
    from PIL import Image

    from ddpm.samples import save_samples

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "p.png")
    save_samples(tmp_path / "s.npz", np.zeros(2, np.int64), [np.zeros((2, 28, 28), np.uint8)])
    gz = next(p for p in fake_mnist.iterdir() if p.name.endswith(".gz"))
    for src, kind in ((tmp_path / "p.png", "a PNG picture"), (tmp_path / "s.npz", "a numpy .npz archive"),
                      (gz, "a gzip file")):
        for name, want in (("ckpt.pt", "not a ddpm checkpoint"), ("model.safetensors", "not a safetensors model")):
            path = tmp_path / name
            path.write_bytes(src.read_bytes())
            with pytest.raises(DdpmError, match=f"^{path} is {kind}, {want}"):
                ddpm.load(path)
        line = one_line_error(invoke("gen", "--ckpt", src, "-n", 1, "--out", tmp_path / "o.png"))
        assert f"{src} is {kind}, not a ddpm checkpoint" in line, line
