"""Reads bounded by what a file declares, and nesting or numbers that Python itself cannot take: a ckpt.pt whose
pickle nests lists 100,000 deep, a model.safetensors whose config JSON does, the MNIST checksum cache as a pipe, a
device or deep JSON, an IDX header that declares gigabytes beside a label file of another count, a samples file of
images of another size, and integers too large for a float given to the API."""

import gzip
import io
import json
import os
import pickle
import struct
import threading
import zipfile

import numpy as np
import pytest
import torch

import ddpm
from ddpm.errors import DdpmError
from ddpm.model.io import CKPT_FORMAT, CheckpointError, load_checkpoint, read_model_info
from ddpm.samples import SamplesError, read_samples, save_samples
from ddpm.train import data as mnist_data
from ddpm.train.data import DataError, load_mnist, write_idx
from helpers import invoke, tiny_checkpoint, traced_peak


def _deep_checkpoint(path, depth: int) -> None:
    """A ckpt.pt (torch.save's zip) whose pickle holds, beside format and step, a list nested `depth` deep: written
    as pickle opcodes, which build it without recursion (pickle.dumps of such a list would recurse itself)."""
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, "step": 0}, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pk = pickle.dumps({"format": CKPT_FORMAT, "step": 0}, protocol=2)
    assert pk.endswith(b"u.")   # SETITEMS, STOP
    nested = b"]" * depth + b"a" * (depth - 1)   # EMPTY_LIST depth times, then APPEND each into the one before
    pk = pk[:-1] + pickle.dumps("junk", protocol=2)[2:-1] + nested + b"s."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in zin.infolist():
            out.writestr(info, pk if info.filename.endswith("data.pkl") else zin.read(info))


def test_a_checkpoint_nesting_lists_100000_deep_is_one_line(tmp_path):
    """The storage walk recursed per level: RecursionError. It keeps its own stack and refuses deep nesting."""
    path = tmp_path / "ckpt.pt"
    _deep_checkpoint(path, 100_000)
    with pytest.raises(CheckpointError, match="nests lists or dicts more than 32 levels deep"):
        load_checkpoint(path)
    r = invoke("train", "--init", path, "--steps", "1", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "nests lists or dicts" in r.output and "Traceback" not in r.output, r.output


def test_a_model_whose_metadata_json_nests_200000_deep_is_one_line(tmp_path):
    """json.loads recurses per array level: RecursionError for a config or step of 200,000 brackets."""
    from ddpm.model.io import _parse_meta

    for key in ("config", "step"):
        meta = {"format": "ddpm-model", "config": json.dumps({}), key: "[" * 200_000 + "]" * 200_000}
        with pytest.raises(CheckpointError, match=f"entry '{key}' nests JSON arrays or objects too deeply"):
            _parse_meta(tmp_path / "model.safetensors", meta)


@pytest.mark.parametrize("kind", ["fifo", "deep", "huge"])
def test_a_bad_checksum_cache_is_ignored(fake_mnist, tmp_path, monkeypatch, kind):
    """$XDG_CACHE_HOME/ddpm/mnist-checks.json is a cache: a pipe there (reading it waited for a writer forever),
    JSON nested too deep (RecursionError) or a file over the size cap is ignored and the MD5s computed again. (A link
    to /dev/zero, read without end, is refused by the same files.input_path check as the pipe; not tried here, as
    without the check it takes all memory.)"""

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    where = tmp_path / "xdg" / "ddpm" / "mnist-checks.json"
    where.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "device":
        where.symlink_to("/dev/zero")
    elif kind == "deep":
        where.write_text("[" * 200_000 + "]" * 200_000)
    else:
        where.write_text(json.dumps({"pad": "x" * mnist_data.MAX_CHECKS_BYTES}))
    out = []
    reader = threading.Thread(target=lambda: out.append(load_mnist(fake_mnist, "train")), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():   # waiting for a writer to the pipe: be one, each time it opens it, so that it ends
        while reader.is_alive():
            try:
                os.close(os.open(where, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:   # no reader at this moment
                pass
            reader.join(0.1)
        pytest.fail("load_mnist waited on the checksum cache")
    images, labels = out[0]
    assert images.shape == (256, 28, 28) and labels.shape == (256,)
    if kind in ("deep", "huge"):   # a file of ours is replaced; a pipe or a device is left as it is (atomic_write)
        recs = json.loads(where.read_text())
        assert str((fake_mnist / "train-images-idx3-ubyte.gz").resolve()) in recs and "pad" not in recs


def _idx_header_gz(path, dims) -> None:
    """A .gz IDX file of uint8 whose header declares `dims`, holding a few bytes of data only."""
    head = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(gzip.compress(head + bytes(1000)))


def test_image_and_label_counts_are_compared_from_the_headers(tmp_path):
    """A small train-images .gz whose header declares 2,739,000 images beside 100 labels: refused from the two
    headers, before anything is inflated (it inflated 2.1 GB, twice, before the counts were compared)."""
    data = tmp_path / "d"
    data.mkdir()
    _idx_header_gz(data / "train-images-idx3-ubyte.gz", (2_739_000, 28, 28))
    write_idx(data / "train-labels-idx1-ubyte", np.zeros(100, np.uint8))
    peak = traced_peak(lambda: _expect_data_error(data))
    assert peak < 10 << 20, peak


def _expect_data_error(data) -> None:
    with pytest.raises(DataError, match=r"labels has shape \(100,\)|images has shape \(2739000, 28, 28\)"):
        load_mnist(data, "train")


def test_an_idx_file_is_held_once(tmp_path):
    """The data of an IDX file is read into the array itself: the peak is its size and a few MiB, not twice it."""
    images = np.random.default_rng(0).integers(0, 256, (20_000, 28, 28), dtype=np.uint8)
    for name in ("x.gz", "x"):
        write_idx(tmp_path / name, images)
        out = []
        peak = traced_peak(lambda: out.append(mnist_data.read_idx(tmp_path / name)))
        assert np.array_equal(out[0], images)
        assert peak < images.nbytes + (6 << 20), (name, peak, images.nbytes)   # + the inflating's 1 MiB chunks


def test_big_endian_idx_types_read_as_numbers(tmp_path):
    """The in-place read keeps IDX's big-endian types right: int16 and float32 come back as their values."""
    for code, dtype in ((0x0B, ">i2"), (0x0D, ">f4")):
        values = np.arange(-6, 6).astype(dtype).reshape(3, 4)
        (tmp_path / "v").write_bytes(bytes([0, 0, code, 2]) + struct.pack(">2I", 3, 4) + values.tobytes())
        got = mnist_data.read_idx(tmp_path / "v")
        assert got.dtype.isnative and np.array_equal(got, values.astype(got.dtype))


def test_samples_of_another_image_size_are_refused_from_the_header(tmp_path):
    """An 875 KB .npz declaring one 30000x30000 image: `ddpm eval` refuses it from the .npy header (it inflated
    ~1 GB before the evaluator refused the shape)."""
    path = tmp_path / "big.npz"
    save_samples(path, np.array([0]), [np.zeros((1, 3000, 3000), np.uint8)])
    with pytest.raises(SamplesError, match=r"images of shape \(1, 3000, 3000\), but \(N, 28, 28\) are read here"):
        read_samples(path, (28, 28))
    peak = traced_peak(lambda: pytest.raises(SamplesError, read_samples, path, (28, 28)))
    assert peak < 1 << 20, peak
    assert read_samples(path)[0].shape == (1, 3000, 3000)   # without an image_shape: any H, W
    r = invoke("eval", "--samples", path)
    assert r.exit_code == 1 and "(N, 28, 28) are read here" in r.output and "Traceback" not in r.output, r.output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    tiny_checkpoint(folder)
    return ddpm.load(folder)


@pytest.mark.parametrize("call, arg", [
    (lambda m: m.generate(1, guidance=10**400), "guidance"),
    (lambda m: m.generate(1, eta=10**400, sampler="ddim", steps=2), "eta"),
    (lambda m: m.generate(1, guidance_rescale=-10**400), "guidance_rescale"),
    (lambda m: m.generate(1, guidance_interval=(0, 10**400)), "guidance_interval"),
    (lambda m: m.edit(np.zeros((28, 28), np.uint8), strength=10**400), "strength"),
    (lambda m: m.edit(np.zeros((28, 28), np.uint8), guidance=10**400), "guidance"),
    (lambda m: m.restore(np.zeros((28, 28), np.uint8), sigma=10**400), "sigma"),
    (lambda m: m.plan("ddim", eta=10**400), "eta"),
])
def test_integers_too_large_for_a_float_are_one_line(model, call, arg):
    """math.isfinite(10**400) raises OverflowError: the argument check names the argument instead."""
    with pytest.raises(DdpmError, match=rf"\(\): {arg} must be ") as e:
        call(model)
    assert "\n" not in str(e.value) and "OverflowError" not in str(e.value), e.value


def test_a_checksum_cache_over_the_cap_is_not_read_whole(fake_mnist, tmp_path, monkeypatch):
    """300 MB of spaces before `{}` (here 256 MiB, sparse): read up to MAX_CHECKS_BYTES, ignored and rewritten."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    where = tmp_path / "xdg" / "ddpm" / "mnist-checks.json"
    where.parent.mkdir(parents=True)
    with open(where, "wb") as f:
        f.truncate(256 << 20)
        f.seek(0, os.SEEK_END)
        f.write(b"{}")
    peak = traced_peak(lambda: load_mnist(fake_mnist, "train"))
    assert peak < 3 * mnist_data.MAX_CHECKS_BYTES + (4 << 20), peak
    assert where.stat().st_size < mnist_data.MAX_CHECKS_BYTES
