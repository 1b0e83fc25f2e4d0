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
    # the test files are copies of the training files: the line does not claim a swap it cannot see
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in FILES:
        (copied / f"{name}.gz").symlink_to(mnist_dir / f"{name.replace('t10k', 'train')}.gz")
    line = one_line_error(invoke("eval", "--samples", tmp_path / "s.npz", "--data", copied))
    assert "holds MNIST's training images" in line and "or one is a copy of the other" in line, line
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
    """The content check costs one MD5 pass per file, remembered by path and IDENTITY in the cache folder."""
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


def test_a_file_rewritten_with_its_size_and_mtime_is_hashed_again(fake_mnist, tmp_path, monkeypatch, fresh_notices):
    """A file relabelled in place (same size) with its mtime put back (os.utime; cp -p, rsync -t and tar keep mtimes
    too) was taken for the file hashed before: its inode and ctime_ns are part of the key (utime sets the ctime). A
    record of an older cache, without them, is a miss, not an error."""
    import json

    folder = tmp_path / "d"
    shutil.copytree(fake_mnist, folder)
    hashed = []
    real_md5 = hashlib.md5
    monkeypatch.setattr(data.hashlib, "md5", lambda *a: hashed.append(1) or real_md5(*a))
    load_mnist(folder, "train")
    assert len(hashed) == 2
    labels = folder / "train-labels-idx1-ubyte"
    st = labels.stat()
    raw = bytearray(labels.read_bytes())
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(bytes(raw))
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (labels.stat().st_size, labels.stat().st_mtime_ns, labels.stat().st_ino) == \
           (st.st_size, st.st_mtime_ns, st.st_ino)
    assert load_mnist(folder, "train")[1][-1] == raw[-1] and len(hashed) == 3
    checks = data.default_data_dir().parent / data.CHECKS_FILE
    recs = json.loads(checks.read_text())
    for rec in recs.values():   # as an older version wrote them
        del rec["ino"], rec["ctime_ns"]
    checks.write_text(json.dumps(recs))
    load_mnist(folder, "train")
    assert len(hashed) == 5
    mine = {k: rec for k, rec in json.loads(checks.read_text()).items() if k.startswith(str(folder.resolve()))}
    assert len(mine) == 2 and all({"ino", "ctime_ns"} <= set(rec) for rec in mine.values()), mine


# ---------------------------------------------------------------------------------------------- kind 2: exports
@pytest.fixture(scope="module")
def exported(tiny_generator_exported):
    """A tiny model's export folder with the generator.onnx of `gen --sampler ddim --steps 4`."""
    return tiny_generator_exported(3, "--sampler", "ddim", "--steps", 4)


def _copy(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "m")
    return tmp_path / "m", tmp_path / "m" / "exp"


def _edit_meta(exp, change):
    import json

    meta = json.loads((exp / "export.json").read_text())
    change(meta)
    (exp / "export.json").write_text(json.dumps(meta))


def _generator(exp) -> dict:
    """The export folder's one generator record (export.json "generators")."""
    import json

    (gen,) = json.loads((exp / "export.json").read_text())["generators"]
    return gen


def _gen(root, *engine):
    return invoke("gen", "--ckpt", root / "model.safetensors", "--export", root / "exp", *engine,
                  "--sampler", "ddim", "--steps", 4, "-n", 2, "--out", root / "o.npz")


def test_export_files_outside_the_folder_are_refused(exported, tmp_path):
    """A file named in export.json that lies outside the folder (by its name or through a link) is never run,
    even when its sha256 and size are recorded correctly."""
    from ddpm.runtime.bundle import Bundle, ExportError

    root, exp = _copy(exported, tmp_path)
    assert _gen(root, "--engine", "onnx-generator").exit_code == 0
    name = _generator(exp)["name"]
    shutil.move(exp / name, root / "x.onnx")
    _edit_meta(exp, lambda m: m["generators"][0].update(name="../x.onnx"))
    line = one_line_error(_gen(root, "--engine", "onnx-generator"))
    assert "generators[0].name" in line and "../x.onnx" in line, line
    _edit_meta(exp, lambda m: m["generators"][0].update(name=name))
    (exp / name).symlink_to(root / "x.onnx")
    line = one_line_error(_gen(root, "--engine", "onnx-generator"))
    assert "leads outside its export folder" in line, line
    shutil.move(exp / "model.onnx", root / "m.onnx")
    (exp / "model.onnx").symlink_to(root / "m.onnx")
    with pytest.raises(ExportError, match="leads outside"):
        Bundle.load(exp).onnx_path("fp32")
    assert "leads outside" in one_line_error(_gen(root, "--engine", "onnx"))


@pytest.mark.parametrize("change, message", [
    (lambda g: g.pop("plan_key"), "generators[0] lacks 'plan_key'"),
    (lambda g: g.update(form=None), "generators[0].form must be one of"),
    (lambda g: g.update(plan=["x"]), "generators[0].plan must be a string"),
    (lambda g: g.update(sha256=7), "generators[0].sha256 must be a sha256"),
    (lambda g: g.clear(), "generators[0] lacks 'name'"),
])
def test_malformed_generator_entry_is_one_line(exported, tmp_path, change, message):
    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, lambda m: change(m["generators"][0]))
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
    with pytest.raises(ExportError, match="stored outside the file"):
        Bundle.load(exp).onnx_path("fp32")
    with pytest.raises(ExportError, match="stored outside the file"):
        add_generator(exp, ddim_plan(Bundle.load(exp).schedule, 5), 2.0, log=lambda *_: None)
    assert "model.onnx" in one_line_error(_gen(root, "--engine", "onnx"))
    name = _generator(exp)["name"]
    externalise(name, lambda m: m["generators"][0])
    with pytest.raises(ExportError, match="stored outside the file"):
        Bundle.load(exp).generator_path()
    assert name in one_line_error(_gen(root, "--engine", "onnx-generator"))


def test_onnx_external_data_inside_the_folder(exported, tmp_path):
    """model.onnx whose weights are moved to w.bin inside the folder, its sha256 and size recorded anew: the sha256
    does not cover w.bin, so altered weights would give other digits unnoticed. Refused: `ddpm export` writes
    self-contained ONNX files."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from ddpm.runtime.bundle import Bundle, ExportError, file_sha256

    root, exp = _copy(exported, tmp_path)
    path = exp / "model.onnx"
    model = onnx.load(str(path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    onnx.save(model, str(path))
    assert (exp / "w.bin").is_file()
    _edit_meta(exp, lambda m: m["files"]["fp32"].update(sha256=file_sha256(path), bytes=path.stat().st_size))
    with pytest.raises(ExportError, match="w.bin.*never does"):
        Bundle.load(exp).onnx_path("fp32")
    assert "model.onnx" in one_line_error(_gen(root, "--engine", "onnx"))


# ------------------------------------------------------------------------------------------------- kind 3: sizes
def never_built(monkeypatch):
    """From now on building a UNet (or a schedule) fails the test: what a file declares must be refused before that."""
    import ddpm.model.unet as unet
    from ddpm.runtime.schedule import Schedule

    def refuse(*a, **k):
        raise AssertionError("a network or schedule was built from a file that should have been refused")

    monkeypatch.setattr(unet.UNet, "__init__", refuse)
    monkeypatch.setattr(Schedule, "make", classmethod(refuse))


@pytest.mark.parametrize("change, message", [
    (dict(base_channels=16384), "base_channels must be an integer in 2..4096"),
    (dict(base_channels=2048, groups=8), "more than the 268 M a model may have"),
    (dict(base_channels=512), "weights do not fit the stored config"),
    (dict(image_size=1024, channel_mults=[1]), "MiB of activations per image"),
    (dict(timesteps=10**9), "timesteps must be an integer in 2..100000"),
    (dict(num_classes=10**9), "num_classes must be an integer in 1..100000"),
    # betas in (0, 1) and T in range whose abar_T underflows: the plans' coefficients would be inf
    (dict(timesteps=100000, beta_range=[1e-4, 0.02]), "below 1e-30: its last noise level sigma_T"),
    (dict(schedule="table", timesteps=3000, betas=[0.3] * 3000), "below 1e-30: its last noise level sigma_T"),
])
def test_model_sizes_are_checked_before_building(tmp_path, monkeypatch, change, message):
    """A 177 KB model.safetensors whose config describes a huge network (or schedule) is refused from its config and
    its weights' shapes, before anything is built or allocated from them: one line."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ddpm.model.io import CheckpointError, load_model, read_model_info
    from helpers import TINY, randomised_unet
    from ddpm.model.io import save_model

    save_model(tmp_path / "t.safetensors", TINY, randomised_unet().state_dict())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        meta = f.metadata()
    cfg = dict(json.loads(meta["config"]), **change)
    (tmp_path / "m").mkdir()
    save_file(load_file(str(tmp_path / "t.safetensors")), str(tmp_path / "m" / "model.safetensors"),
              metadata=dict(meta, config=json.dumps(cfg)))
    never_built(monkeypatch)
    for load in (load_model, read_model_info):
        with pytest.raises(CheckpointError, match=message):
            load(tmp_path / "m")
    line = one_line_error(invoke("gen", "--ckpt", tmp_path / "m", "--engine", "torch", "-n", 1, "--steps", 2,
                                 "--out", tmp_path / "x.png"))
    assert message in line, line


def test_param_count_is_the_networks(tmp_path):
    """model.config.param_count (what the size check uses) counts exactly the parameters of the network built."""
    import dataclasses

    from ddpm.model import PRESETS, UNet
    from ddpm.model.config import param_count

    cfgs = list(PRESETS.values()) + [dataclasses.replace(PRESETS["tiny"], channel_mults=(1, 3, 2), num_res_blocks=0,
                                                         attention=False, num_classes=3, in_channels=2)]
    for cfg in cfgs:
        assert param_count(cfg) == sum(p.numel() for p in UNet(cfg).parameters()), cfg


@pytest.mark.slow
def test_compressed_checkpoint_member_is_refused(tmp_path):
    """torch.save writes a ckpt.pt uncompressed: a deflated member (which could inflate far beyond the file) is
    refused from the archive's directory before torch reads it."""
    import zipfile

    from ddpm.model.io import CheckpointError, load_checkpoint
    from ddpm.train.loop import TrainConfig, train

    train(TrainConfig(data=str(make_fake(tmp_path)), out=str(tmp_path / "r"), preset="tiny", steps=1, device="cpu",
                      batch_size=8), progress=False, log=lambda *_: None)
    ckpt = tmp_path / "r" / "ckpt.pt"
    load_checkpoint(ckpt)
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for m in src.infolist():
            dst.writestr(m.filename, src.read(m))
    with pytest.raises(CheckpointError, match="compressed"):
        load_checkpoint(tmp_path / "z.pt")


def make_fake(tmp_path):
    from conftest import make_fake_mnist

    return make_fake_mnist(tmp_path / "fake", n=64)


def _npz(path, members):
    """A zip holding .npy members written from (header dict, data bytes)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (header, payload) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for lo in range(0, len(payload), 1 << 24):
                    f.write(payload[lo:lo + (1 << 24)])


@pytest.mark.parametrize("n_declared, n_held, message", [
    (10**9, 10, "images declares"),          # a header that declares a billion images over ten
    (64, 20_000, "images declares"),         # a member that inflates to far more than its header declares
    (20_000, 20_000, "more than the 1 MiB"),  # as declared, but more than a samples file may hold (limit lowered)
])
@pytest.mark.parametrize("fortran", [False, True])
def test_samples_file_sizes_are_checked_before_reading(tmp_path, monkeypatch, n_declared, n_held, message, fortran):
    """A samples file's members are checked from their headers and the zip's directory (declared shape, the bytes it
    implies, the member's size, the limit) before anything is inflated or allocated: one line, a few KB. The same
    for images in Fortran order (read, then made C-contiguous)."""
    import ddpm.samples as samples

    monkeypatch.setattr(samples, "MAX_SAMPLES_BYTES", 1 << 20, raising=False)
    path = tmp_path / "s.npz"
    _npz(path, {"labels": ({"descr": "<i8", "fortran_order": False, "shape": (n_declared,)}, bytes(8 * n_held)),
                "images": ({"descr": "|u1", "fortran_order": fortran, "shape": (n_declared, 28, 28)},
                           bytes(784 * n_held))})
    assert path.stat().st_size < 200_000

    def read():
        with pytest.raises(samples.SamplesError, match=message):
            samples.read_samples(path)

    assert traced_peak(read) < 1 << 20
    assert message in one_line_error(invoke("eval", "--samples", path, "--data", tmp_path / "nodata"))


@pytest.mark.parametrize("dims, body, message", [
    ((10**6, 10**4, 10**4), 0, "more than the 2048 MiB"),      # a header that declares 100 TB
    ((1, 28, 28), 64 * MiB, "trailing garbage"),               # 60 KB of gzip that inflates to 64 MB
])
def test_idx_sizes_are_checked_before_inflating(tmp_path, dims, body, message):
    """An IDX file's header is checked against the limit before anything is inflated, and no more is inflated than
    it declares: one line, a few MB at most, however much the file would inflate to."""
    header = bytes([0, 0, 8, len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    path = tmp_path / "train-images-idx3-ubyte.gz"
    z = gzip.GzipFile(path, "wb")
    z.write(header + bytes(784))
    for _ in range(body // MiB):
        z.write(bytes(MiB))
    z.close()
    assert path.stat().st_size < 200_000

    def read():
        with pytest.raises(DataError, match=message):
            read_idx(path)

    assert traced_peak(read) < 4 * MiB


def test_external_data_reader_agrees_with_onnx(exported, tmp_path):
    """runtime.bundle.external_data (protobuf read without the onnx package) finds what onnx finds, in the graph
    and in a Loop's body (generator.onnx)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    from ddpm.runtime.bundle import external_data

    for name in ("model.onnx", _generator(exported / "exp")["name"]):
        path = tmp_path / name
        shutil.copy(exported / "exp" / name, path)
        assert external_data(path.read_bytes()) == []
        onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
        want = [(t.name, "w.bin") for t in _get_all_tensors(onnx.load(str(path), load_external_data=False))
                if t.data_location == onnx.TensorProto.EXTERNAL]
        assert want and sorted(external_data(path.read_bytes())) == sorted(want)


# --------------------------------------------------------------------- export.json entries and embedded records
def test_a_bool_is_never_an_integer():
    """Python's bool is an int (True == 1): every spec of an integer, a number or a constant refuses one."""
    import numpy as np

    from ddpm.arguments import Level
    from ddpm.schema import Const, Int, Num, check_value

    for spec in (Const(1), Const(0), Int(), Num(), Level()):
        for value in (True, False, np.bool_(True)):
            with pytest.raises(ValueError, match="must be"):
                check_value(spec, value, "x")
    check_value(Const(True), True, "x")
    with pytest.raises(ValueError, match="must be True"):
        check_value(Const(True), 1, "x")
    for value in (1.0, np.float32(1.0)):   # nor is a float: 1.0 is not 1, as Int refuses it
        with pytest.raises(ValueError, match="must be 1"):
            check_value(Const(1), value, "x")
    check_value(Const(1), np.int64(1), "x")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(version=2), "version must be 1"),
    (lambda m: m.update(version="1"), "version must be 1"),
    (lambda m: m.update(version=True), "version must be 1"),   # Python's True == 1: a bool is never an integer
    (lambda m: m.update(version=1.0), "version must be 1"),    # a float is never an integer, here as for T
    (lambda m: m["files"]["fp32"].pop("parity"), "files.fp32 records no parity"),
    (lambda m: m["generators"][0].pop("parity"), "generators[0] records no parity"),
    (lambda m: m.update(step="2000"), "step must be an integer in 0..9223372036854775807"),
    (lambda m: m["files"]["fp32"].update(parity="verified"), "files['fp32'].parity must be a parity record"),
    (lambda m: m["files"]["fp32"]["parity"].update(error=None), "files['fp32'].parity.error must be a finite"),
    (lambda m: m["files"]["fp32"]["parity"].update(error=0.5), "failed its verification"),
    (lambda m: m["generators"][0].update(parity=[]), "generators[0].parity must be a parity record"),
    (lambda m: m["generators"][0]["parity"].update(max_abs_grey=9), "failed its verification"),
    # a tolerance looser than the export's own lets any error through: the records' tolerances are the export's
    (lambda m: m["files"]["fp32"]["parity"].update(error=0.5, tolerance=1e300),
     "files.fp32.parity.tolerance is 1e+300, above the 0.0001 that `ddpm export` verifies with"),
    (lambda m: m["generators"][0]["parity"].update(max_abs_grey=200, tolerance_grey=255),
     "generators[0].parity.tolerance_grey is 255, above the 1 that `ddpm export` verifies with"),
    (lambda m: m["generators"][0].update(plan_key="x"), "generators[0].plan_key must be a plan key"),
    (lambda m: m["generators"][0].update(steps=10**9), "generators[0].steps must be an integer in 1..100000"),
])
def test_every_export_entry_is_checked(exported, tmp_path, change, message):
    """Every entry of export.json that an engine or an export reads (or copies into a new folder) is checked
    against the schema when the folder is loaded: one line, never a traceback or a silently accepted value. Every
    ONNX file it names (eps models and generators alike) must record a parity within its tolerance."""
    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, change)
    for engine in ("onnx", "onnx-generator"):
        line = one_line_error(_gen(root, "--engine", engine))
        assert message in line and "export.json" in line, line


def _reembed(exp, name, key, entry, **change):
    """Change the record that the ONNX file `name` embeds under `key` (its metadata_props), and record the file's
    new sha256 and size in export.json: a file of another export, copied in with its own record."""
    import json

    import onnx

    from ddpm.runtime.bundle import file_sha256

    path = exp / name
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(dict(json.loads(prop.value), **change))
    onnx.save(model, str(path))
    _edit_meta(exp, lambda m: entry(m).update(sha256=file_sha256(path), bytes=path.stat().st_size))


@pytest.mark.parametrize("name, key, entry, change, engine", [
    ("generator", "ddpm_generator", lambda m: m["generators"][0], {"checkpoint_hash": "0" * 64}, "onnx-generator"),
    ("generator", "ddpm_generator", lambda m: m["generators"][0], {"plan_key": "0" * 40}, "onnx-generator"),
    ("model.onnx", "ddpm", lambda m: m["files"]["fp32"], {"checkpoint_hash": "0" * 64}, "onnx"),
])
def test_onnx_files_of_other_weights_are_refused(exported, tmp_path, name, key, entry, change, engine):
    """An ONNX file whose own record names other weights (or another plan) than export.json is refused, even with
    its sha256 and size recorded anew: the generator engine checks what the step engines check."""
    from ddpm.runtime.bundle import Bundle, ExportError

    root, exp = _copy(exported, tmp_path)
    kind, name = name, _generator(exp)["name"] if name == "generator" else name
    _reembed(exp, name, key, entry, **change)
    field = next(iter(change))
    with pytest.raises(ExportError, match=f"records {field} '0+', not export.json's"):
        Bundle.load(exp).generator_path() if kind == "generator" else Bundle.load(exp).onnx_path()
    line = one_line_error(_gen(root, "--engine", engine))
    assert name in line and f"records {field}" in line, line


def _same_everywhere(m, **change):
    """Change model_config fields and the top-level entries export.json derives from them, consistently."""
    m["model_config"].update(change)
    c = m["model_config"]
    m.update(num_classes=c["num_classes"], null_label=c["num_classes"], schedule=c["schedule"],
             image_shape=[c["in_channels"], c["image_size"], c["image_size"]])


def _schedule(m, name):
    from ddpm.runtime.schedule import make_betas

    betas = make_betas(name, m["T"])
    m.update(betas=betas.tolist(), alphas_cumprod=np.cumprod(1 - betas).tolist())
    _same_everywhere(m, schedule=name)


# the generator engine reads the classes and the image shape from export.json, the model's config and schedule from
# its own file only; the step engines all of them
@pytest.mark.parametrize("change, message", [
    (lambda m: m["model_config"].update(prediction="v"), "records model_config.prediction 'eps', not export.json's 'v'"),
    (lambda m: _same_everywhere(m, num_classes=5), "records (num_classes|null_label) 10, not export.json's 5"),
    (lambda m: _same_everywhere(m, num_classes=11), "records (num_classes|null_label) 10, not export.json's 11"),
    (lambda m: _same_everywhere(m, image_size=32), "records image_shape [1, 28, 28], not export.json's [1, 32, 32]"),
    (lambda m: _same_everywhere(m, in_channels=3), "records image_shape [1, 28, 28], not export.json's [3, 28, 28]"),
    (lambda m: _schedule(m, "cosine"), "records schedule 'linear', not export.json's 'cosine'"),
    (lambda m: _same_everywhere(m, schedule="cosine"), "betas is not the cosine schedule's of T = 100"),
    (lambda m: m.update(betas=[b * 2 for b in m["betas"]]), "betas is not the linear schedule's"),
    (lambda m: m.update(alphas_cumprod=[a * 0.01 for a in m["alphas_cumprod"]]), "alphas_cumprod is not the linear"),
])
def test_export_json_agrees_with_its_onnx_files(exported, tmp_path, change, message):
    """What the runtime takes from export.json (the model config with its prediction, classes, the reserved label,
    the image shape, the schedule and its tables) must be what the sha256-checked model.onnx records, and the tables
    those of the config's schedule: an edited entry is one line, never wrong digits with exit 0 or a traceback."""
    import re

    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, change)
    engines = ("onnx", "onnx-generator") if "model_config" not in message and "schedule 'linear'" not in message \
        else ("onnx",)
    for engine in engines:
        line = one_line_error(_gen(root, "--engine", engine))
        assert re.search(re.escape(message).replace(r"\(num_classes\|null_label\)", "(num_classes|null_label)"),
                         line), line


# a recipe export.json's schema takes (runtime.bundle.QUANTIZATION), so that an int8 entry gets to its file's checks
RECIPE = {"method": "quantize_static", "states": "noised digits", "data": "MNIST train", "timesteps": [99, 50],
          "seed": 0, "calibration_digits": 16, "held_out_digits": 8, "max_eps_error": 0.03,
          "eps_error_held_out": 0.02, "convs": 27, "kept_fp32": ["/conv_in/Conv", "/conv_out/Conv"], "sensitivity": {}}


@pytest.mark.parametrize("precision, entry, message", [
    ("fp16", lambda m: m["files"].update(fp16=m["files"]["fp32"]), "files.fp16 names model.onnx, which is an fp32 "
                                                                     "model, not an fp16 one"),
    ("int8", lambda m: m["files"].update(int8={**m["files"]["fp32"], "quantization": RECIPE}),
     "files.int8 names model.onnx, which is an fp32 "
                                                                     "model, not an int8 one"),
    ("fp32", lambda m: m["files"]["fp32"].update({k: m["generators"][0][k] for k in ("name", "sha256", "bytes")}),
     "which is a generator, not a model"),
    ("generator", lambda m: m["generators"][0].update({k: m["files"]["fp32"][k] for k in ("name", "sha256", "bytes")}),
     "generators[0] names model.onnx, which is a model, not a generator"),
])
def test_onnx_files_of_another_kind_or_precision_are_refused(exported, tmp_path, precision, entry, message):
    """An export.json entry naming an ONNX file of the folder (with its right sha256 and size) of another kind (a
    model where a generator belongs, or the other way) or another precision (model.onnx as files.fp16) is one line:
    never onnxruntime's error, nor fp32 run as fp16 with exit 0."""
    import re

    from ddpm.runtime.bundle import Bundle, ExportError

    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, entry)
    with pytest.raises(ExportError, match=re.escape(message)):
        Bundle.load(exp).generator_path() if precision == "generator" else Bundle.load(exp).onnx_path(precision)
    args = {"fp16": ["--fp16"], "int8": ["--int8"], "fp32": ["--engine", "onnx"],
            "generator": ["--engine", "onnx-generator"]}[precision]
    line = one_line_error(_gen(root, *args))
    assert message in line, line
    assert f"{exp / 'export.json'}'s " in line, line   # which folder: a line in a log says it


def test_generators_of_one_name_are_told_apart(exported, tmp_path):
    """Two plans of one name (a generator of another plan_key): the message gives each its key."""
    root, exp = _copy(exported, tmp_path)
    key = _generator(exp)["plan_key"]
    _edit_meta(exp, lambda m: m["generators"][0].update(plan_key="0" * 40))
    line = one_line_error(_gen(root, "--engine", "onnx-generator"))
    assert "(key 00000000), not one for" in line and f"(key {key[:8]})" in line, line


@pytest.mark.parametrize("text, message", [
    (lambda t: t.replace('"tolerance": ', '"tolerance": 1' + "0" * 400 + ", \"x\": ", 1), "beyond a float's range"),
    (lambda t: '{"x": [' + "{}," * 200_000 + "{}]}", "JSON objects and arrays"),
    (lambda t: "[" * 200_000 + "]" * 200_000, "JSON objects and arrays"),
    (lambda t: "[" * 50_000 + "]" * 50_000, "is unreadable (maximum recursion depth"),
])
def test_export_json_values_and_nesting_are_bounded(exported, tmp_path, text, message):
    """A 401-digit integer where a number belongs, and a file of very many (or deeply nested) objects, are one line
    each, refused before the many objects are built."""
    root, exp = _copy(exported, tmp_path)
    meta = exp / "export.json"
    meta.write_text(text(meta.read_text()))
    line = one_line_error(_gen(root, "--engine", "onnx"))
    assert message in line, line


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(opset=10**30), "opset must be an integer in 1..1000"),
    (lambda m: m.update(step=10**30), "step must be an integer in 0..9223372036854775807"),
    (lambda m: m["generators"][0].update(opset=10**30), "generators[0].opset must be an integer in 1..1000"),
    (lambda m: m["generators"][0].update(fp32_timesteps=[10**30]), "fp32_timesteps[0] must be an integer in 0..99999"),
    (lambda m: m["files"]["fp32"]["parity"].update(batches=[10**30]), "batches[0] must be an integer in 1..4294967296"),
])
def test_export_json_integers_are_bounded(exported, tmp_path, change, message):
    """Every integer export.json holds has a bound far beyond any export's (an opset, a training step, a timestep
    below runtime.schedule.MAX_T, a batch size): a huge one is refused in one line as the others are."""
    root, exp = _copy(exported, tmp_path)
    _edit_meta(exp, change)
    line = one_line_error(_gen(root, "--engine", "onnx"))
    assert message in line, line


def test_export_json_holding_a_key_twice_is_refused(exported, tmp_path):
    """An export.json object that holds one key twice (`"files"` twice: Python's reader keeps the last, a browser's
    may keep the first) is one line, not the last value used silently."""
    root, exp = _copy(exported, tmp_path)
    meta = exp / "export.json"
    text = meta.read_text()
    meta.write_text(text.replace('"files": ', '"files": {}, "files": ', 1))
    line = one_line_error(_gen(root, "--engine", "onnx"))
    assert "the key 'files' appears twice in one JSON object" in line and "export.json" in line, line


def test_export_json_limits_hold_the_largest_export():
    """MAX_META_BYTES and MAX_META_CONTAINERS are above an export.json at the largest T (runtime.schedule.MAX_T)."""
    import json

    from ddpm.runtime.bundle import MAX_META_BYTES, MAX_META_CONTAINERS
    from ddpm.runtime.schedule import MAX_T, make_betas

    betas = make_betas("linear", MAX_T)
    text = json.dumps({"betas": betas.tolist(), "alphas_cumprod": np.cumprod(1 - betas).tolist()}, indent=1)
    assert len(text) < MAX_META_BYTES - (2 << 20)
    assert text.count("{") + text.count("[") < MAX_META_CONTAINERS


def test_json_and_numbers_of_any_size_are_one_line():
    """schema.Num refuses an integer beyond a float's range, schema.Json too deeply nested JSON: Invalid, one line."""
    from ddpm.schema import Json, Num, Any, check_value

    with pytest.raises(ValueError, match="beyond a float's range"):
        check_value(Num(min=0), 10 ** 400, "tolerance")
    with pytest.raises(ValueError, match="nested too deep"):
        check_value(Json(Any()), "[" * 100_000 + "]" * 100_000, "metadata")


@pytest.mark.parametrize("mults", [[1.9, 2.5, 2.1], "122", [True, 2, 2], [1, 2.0]])
def test_channel_mults_are_checked_before_conversion(mults):
    """ModelConfig.from_dict keeps what the file holds, so validate() refuses floats, strings and booleans."""
    from ddpm.model.config import ModelConfig

    with pytest.raises(ValueError, match="channel_mults"):
        ModelConfig.from_dict({"channel_mults": mults}).validate()


def test_a_file_of_another_size_is_not_read(exported, tmp_path):
    """export.json's recorded size is checked before a file is read (a planted large file is never loaded)."""
    root, exp = _copy(exported, tmp_path)
    with open(exp / _generator(exp)["name"], "ab") as f:
        f.write(b"\0")
    assert "its size differs from export.json" in one_line_error(_gen(root, "--engine", "onnx-generator"))


# ------------------------------------------------------------------------ messages built from file contents
MAX_LINE = 400   # a message names the file (a tmp path here) and what to do: far below this however large the file


def test_idx_header_of_255_dimensions_is_a_short_line(tmp_path):
    """An IDX header may declare 255 sizes: the message summarises them; a header of more dimensions than numpy
    arrays have is one line too (never numpy's ValueError)."""
    path = tmp_path / "x-idx3-ubyte"
    for dims, body, message in (([60000, 28, 28] + [2**32 - 1] * 252, b"", "255 dimensions"),
                                ([1] * 255, b"\0", "255 dimensions"),
                                ([60000, 28, 28] + [2**32 - 1] * 13, b"", "truncated")):
        path.write_bytes(bytes([0, 0, 8, len(dims)]) + np.array(dims, dtype=">u4").tobytes() + body)
        with pytest.raises(DataError, match=message) as e:
            read_idx(path)
        assert len(str(e.value)) < MAX_LINE and "\n" not in str(e.value), str(e.value)


def test_messages_quoting_a_file_are_bounded(exported, tmp_path):
    """Values a file declares (lists, strings, keys, shapes) appear in a message as a short summary."""
    from ddpm.model.io import CheckpointError, read_model_info
    from ddpm.runtime.bundle import Bundle, ExportError
    from ddpm.schema import Array, List, Map, Schema, Str

    long = "x" * 5000
    root, exp = _copy(exported, tmp_path)
    for change in (lambda m: m.update(image_shape=[1] * 5000, T=[1] * 5000),
                   lambda m: m["model_config"].update({f"k{i}": 1 for i in range(2000)}),
                   lambda m: m["generators"][0].update(plan=long),
                   lambda m: m["files"].update({long: m["files"]["fp32"]})):
        shutil.rmtree(exp)
        shutil.copytree(exported / "exp", exp)
        _edit_meta(exp, change)
        with pytest.raises(ExportError) as e:
            Bundle.load(exp)
        assert len(str(e.value)) < MAX_LINE, str(e.value)
    # safetensors metadata: a key that is not JSON
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    src = root / "model.safetensors"
    with safe_open(str(src), "np") as f:
        meta = f.metadata()
    save_file(load_file(str(src)), str(tmp_path / "model.safetensors"), metadata=dict(meta, **{long: "{"}))
    with pytest.raises(CheckpointError) as e:
        read_model_info(tmp_path / "model.safetensors")
    assert len(str(e.value)) < MAX_LINE, str(e.value)
    # every schema message: map keys, shapes and dimension names
    schema = Schema("test file", {"m": Map(List(Str(), length="N")), "a": Array(("uint8",), ("N",))})
    for bad in ({"m": {long: 3}, "a": np.zeros(1, np.uint8)},
                {"m": {long: ["a"] * 3}, "a": np.zeros([1] * 60, np.uint8)}):
        with pytest.raises(ValueError) as e:
            schema.check(bad, "f")
        assert len(str(e.value)) < MAX_LINE, str(e.value)


# ------------------------------------------------------------------------------- kind 2: what was checked is what runs
@pytest.mark.parametrize("engine", ["onnx", "onnx-generator"])
def test_an_export_file_replaced_after_its_check_never_runs(tiny_generator_exported, tmp_path, monkeypatch, engine):
    """A file of an export folder was checked (size, sha256, graph) from one read and opened again by onnxruntime:
    replaced in between (another `ddpm export --out` landing, a swap), the other model ran under the check of the
    first, exit 0. The engines load the bytes that were checked: the digits are those of the file as checked."""
    import ddpm.runtime.bundle as bundle

    root, other = tiny_generator_exported(0, "--steps", 2), tiny_generator_exported(1, "--steps", 2)
    args = ["gen", "--export", root / "exp", "--engine", engine, "--steps", 2, "-n", 2, "-q"]
    r = invoke(*args, "--out", tmp_path / "checked.npz")
    assert r.exit_code == 0, r.output
    real, swapped = bundle.check_external_data, []

    def check_then_swap(path, redo="ddpm export", buf=None):   # after the one read that was hashed
        real(path, redo, buf)
        if not swapped:
            swapped.append(path)
            shutil.copyfile(other / "exp" / path.name, path)

    monkeypatch.setattr(bundle, "check_external_data", check_then_swap)
    r = invoke(*args, "--out", tmp_path / "raced.npz")
    assert r.exit_code == 0 and swapped, r.output
    with np.load(tmp_path / "checked.npz") as a, np.load(tmp_path / "raced.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    assert (root / "exp" / swapped[0].name).read_bytes() == (other / "exp" / swapped[0].name).read_bytes()
