"""What is read is checked before it is trusted: export folders name only their own, unaltered files (and ONNX
external data inside them); sizes declared by a file are bounded before anything is allocated from them; MNIST's
files are recognised by their MD5, so swapped train and test files are refused and other data is named."""

import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

import ddpm.train.data as data
from ddpm.train.data import FILES, DataError, load_mnist, read_idx, write_idx
from helpers import invoke, traced_peak
from test_loaders import one_line_error

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ kind 4: MNIST
@pytest.fixture
def fresh_notices(monkeypatch):
    """Notices are said once per process: start with none said."""
    monkeypatch.setattr(data, "_noticed", set(), raising=False)


def _swapped(mnist_dir, folder, plain=("t10k-labels-idx1-ubyte",)):
    """MNIST with train and test swapped; the files named in `plain` stored uncompressed."""
    folder.mkdir()
    for name in FILES:
        other = name.replace("train", "X").replace("t10k", "train").replace("X", "t10k")
        src = mnist_dir / f"{other}.gz"
        if name in plain:
            (folder / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            (folder / f"{name}.gz").symlink_to(src)
    return folder


def test_swapped_train_and_test_are_refused(mnist_dir, tmp_path, fresh_notices, capsys):
    swapped = _swapped(mnist_dir, tmp_path / "swapped")
    for split in ("train", "test"):
        with pytest.raises(DataError, match="swapped") as e:
            load_mnist(swapped, split)
        assert "\n" not in str(e.value)
    line = one_line_error(invoke("train", "--data", swapped, "--out", tmp_path / "r", "--preset", "tiny",
                                 "--steps", 1, "--device", "cpu"))
    assert "train-images-idx3-ubyte.gz holds MNIST's test images" in line and "swapped" in line, line
    from ddpm.samples import save_samples

    save_samples(tmp_path / "s.npz", np.zeros(2, np.int64), [np.zeros((2, 28, 28), np.uint8)])
    line = one_line_error(invoke("eval", "--samples", tmp_path / "s.npz", "--data", swapped))
    assert "swapped" in line, line
    # MNIST's own files, one of them stored uncompressed: recognised by their content, no notice
    good = tmp_path / "good"
    shutil.copytree(mnist_dir, good)
    (good / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress((good / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (good / "t10k-labels-idx1-ubyte.gz").unlink()
    capsys.readouterr()
    x, y = load_mnist(good, "test")
    assert x.shape == (10000, 28, 28) and y[:3].tolist() == [7, 2, 1]
    assert capsys.readouterr().err == ""


def test_one_swapped_file_is_refused(mnist_dir, tmp_path, fresh_notices):
    """Test labels in the place of the training labels (and no other file touched) are refused too."""
    folder = tmp_path / "mixed"
    shutil.copytree(mnist_dir, folder)
    os.replace(folder / "t10k-labels-idx1-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz holds MNIST's test labels"):
        load_mnist(folder, "train")


def test_other_data_is_used_with_one_notice(fake_mnist, tmp_path, fresh_notices, capsys):
    x, y = load_mnist(fake_mnist, "train")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not MNIST's own train files" in err[0] and "using them as given" in err[0], err
    load_mnist(fake_mnist, "train")
    assert capsys.readouterr().err == ""    # said once
    # both NAME and NAME.gz: which one is read is said
    folder = tmp_path / "both"
    shutil.copytree(fake_mnist, folder)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((64, 28, 28), np.uint8))
    load_mnist(folder, "test")
    err = capsys.readouterr().err
    assert "holds both t10k-images-idx3-ubyte and t10k-images-idx3-ubyte.gz; using t10k-images-idx3-ubyte" in err


def test_md5_is_computed_once_per_file_version(fake_mnist, tmp_path, monkeypatch, fresh_notices):
    """The content check costs one MD5 pass per file, remembered by (path, size, mtime_ns) in the cache folder."""
    folder = tmp_path / "d"
    shutil.copytree(fake_mnist, folder)
    hashed = []
    real_md5 = hashlib.md5

    def counting_md5(*a):
        hashed.append(1)
        return real_md5(*a)

    monkeypatch.setattr(data.hashlib, "md5", counting_md5)
    load_mnist(folder, "train")
    assert len(hashed) == 2
    load_mnist(folder, "train")
    assert len(hashed) == 2
    labels = folder / "train-labels-idx1-ubyte"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    load_mnist(folder, "train")
    assert len(hashed) == 3
    assert (data.default_data_dir().parent / data.CHECKS_FILE).is_file()


# ---------------------------------------------------------------------------------------------- kind 2: exports
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model's export folder with the generator.onnx of `gen --sampler ddim --steps 4`."""
    from helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("exp")
    tiny_checkpoint(root, seed=3)
    r = invoke("export", "--ckpt", root / "model.safetensors", "--out", root / "exp", "--generator", "--sampler",
               "ddim", "--steps", 4)
    assert r.exit_code == 0, r.output
    return root


def _copy(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "m")
    return tmp_path / "m", tmp_path / "m" / "exp"


def _edit_meta(exp, change):
    import json

    meta = json.loads((exp / "export.json").read_text())
    change(meta)
    (exp / "export.json").write_text(json.dumps(meta))


def _gen(root, *engine):
    return invoke("gen", "--ckpt", root / "model.safetensors", "--export", root / "exp", *engine,
                  "--sampler", "ddim", "--steps", 4, "-n", 2, "--out", root / "o.npz")


def test_export_files_outside_the_folder_are_refused(exported, tmp_path):
    """A file named in export.json that lies outside the folder (by its name or through a link) is never run,
    even when its sha256 and size are recorded correctly."""
    from ddpm.runtime.bundle import Bundle, ExportError

    root, exp = _copy(exported, tmp_path)
    assert _gen(root, "--engine", "onnx-generator").exit_code == 0
    shutil.move(exp / "generator.onnx", root / "x.onnx")
    _edit_meta(exp, lambda m: m["generator"].update(name="../x.onnx"))
    line = one_line_error(_gen(root, "--engine", "onnx-generator"))
    assert "generator.name" in line and "../x.onnx" in line, line
    _edit_meta(exp, lambda m: m["generator"].update(name="generator.onnx"))
    (exp / "generator.onnx").symlink_to(root / "x.onnx")
    line = one_line_error(_gen(root, "--engine", "onnx-generator"))
    assert "leads outside its export folder" in line, line
    shutil.move(exp / "model.onnx", root / "m.onnx")
    (exp / "model.onnx").symlink_to(root / "m.onnx")
    with pytest.raises(ExportError, match="leads outside"):
        Bundle.load(exp).onnx_path("fp32")
    assert "leads outside" in one_line_error(_gen(root, "--engine", "onnx"))


@pytest.mark.parametrize("change, message", [
    (lambda g: g.pop("plan_key"), "generator lacks 'plan_key'"),
    (lambda g: g.update(form=None), "generator.form must be one of"),
    (lambda g: g.update(plan=["x"]), "generator.plan must be a string"),
    (lambda g: g.update(sha256=7), "generator.sha256 must be a sha256"),
    (lambda g: g.clear(), "generator lacks 'name'"),
])
def test_malformed_generator_entry_is_one_line(exported, tmp_path, change, message):
    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, lambda m: change(m["generator"]))
    assert message in one_line_error(_gen(root, "--engine", "onnx-generator"))


def test_onnx_external_data_outside_the_folder(exported, tmp_path):
    """model.onnx whose weights are stored in a file outside the folder: refused when the folder is read (every
    engine and the generator export read their ONNX files through it), and by onnxruntime itself."""
    import onnx

    from ddpm.export.generator import add_generator
    from ddpm.runtime.bundle import Bundle, ExportError, file_sha256
    from ddpm.runtime.samplers import ddim_plan

    root, exp = _copy(exported, tmp_path)

    def externalise(name, entry):   # weights moved to ../NAME.bin, the file's sha256 and size recorded anew
        path = exp / name
        onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location=f"{name}.bin",
                  size_threshold=0)
        shutil.move(exp / f"{name}.bin", root / f"{name}.bin")
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = f"../{name}.bin"
        onnx.save(model, str(path))
        _edit_meta(exp, lambda m: entry(m).update(sha256=file_sha256(path), bytes=path.stat().st_size))

    externalise("model.onnx", lambda m: m["files"]["fp32"])
    with pytest.raises(ExportError, match="not a file inside the export folder"):
        Bundle.load(exp).onnx_path("fp32")
    with pytest.raises(ExportError, match="not a file inside the export folder"):
        add_generator(exp, ddim_plan(Bundle.load(exp).schedule, 5), 2.0, log=lambda *_: None)
    assert "model.onnx" in one_line_error(_gen(root, "--engine", "onnx"))
    externalise("generator.onnx", lambda m: m["generator"])
    with pytest.raises(ExportError, match="not a file inside the export folder"):
        Bundle.load(exp).generator_path()
    assert "generator.onnx" in one_line_error(_gen(root, "--engine", "onnx-generator"))
