"""An output keeps the permission bits of the file it replaces (files.atomic_write), and a read-only file is refused
before any work (files.check_writable): a user's chmod is never undone, nothing of theirs lost."""

import os
import stat

import pytest

from ddpm.files import OutputError, atomic_write, check_writable, write_text
from helpers import invoke


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o755], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    f = tmp_path / "scores.json"
    f.write_text("old")
    f.chmod(mode)
    (tmp_path / "link.json").symlink_to(f)
    write_text(f, "new")
    assert (f.read_text(), _mode(f)) == ("new", mode)
    write_text(tmp_path / "link.json", "newer")                # through a link: the target keeps its mode
    assert (f.read_text(), _mode(f), (tmp_path / "link.json").is_symlink()) == ("newer", mode, True)


def test_a_new_file_gets_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "new.json", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new.json") == 0o640


def test_a_read_only_output_is_refused_before_any_work(tmp_path, ckpt):
    f = tmp_path / "digits.npz"
    f.write_bytes(b"mine")
    f.chmod(0o444)
    with pytest.raises(OutputError, match="it is read-only \\(mode 444\\); make it writable"):
        check_writable(f)
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--engine", "torch", "--sampler", "ddim", "--steps", 2, "--out", f)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "read-only" in r.output, r.output
    assert (f.read_bytes(), _mode(f)) == (b"mine", 0o444)
    f.chmod(0o600)
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--engine", "torch", "--sampler", "ddim", "--steps", 2, "--out", f)
    assert r.exit_code == 0, r.output
    assert f.read_bytes() != b"mine" and _mode(f) == 0o600


def test_atomic_write_keeps_the_mode_of_a_file_it_is_made_to_replace(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"a")
    f.chmod(0o400)
    atomic_write(f, lambda tmp: open(tmp, "wb").write(b"b"))   # as `mv`: the entry replaced, the mode kept
    assert (f.read_bytes(), _mode(f)) == (b"b", 0o400)


def test_an_export_run_again_keeps_the_modes_of_the_files_it_remakes(tiny_exported):
    """A re-run of `ddpm export` into a folder whose model.onnx is damaged remakes it: the new model.onnx and
    export.json keep the permission bits of the files they replace (files.publish_owned, as atomic_write for one
    file), as the model it keeps keeps its own."""
    from ddpm.export.onnx_export import export
    from ddpm.model.io import load_model

    root = tiny_exported(0, fp16=True)
    exp = root / "exp"
    model = exp / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    for name, mode in (("model.onnx", 0o600), ("export.json", 0o600), ("model_fp16.onnx", 0o640)):
        (exp / name).chmod(mode)
    export(load_model(root), exp, fp16=True, log=lambda *_: None)
    assert model.read_bytes() != bytes(data)   # remade
    assert (_mode(model), _mode(exp / "export.json"), _mode(exp / "model_fp16.onnx")) == (0o600, 0o600, 0o640)
