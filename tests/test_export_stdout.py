"""`ddpm export` with a standard output that cannot be written (`> /dev/full`): the line reliability.md promises for
standard output, not a full disk of the export folder, and the export is published all the same."""

import os
import subprocess
import sys

import pytest

from ddpm.runtime.bundle import Bundle
from helpers import invoke_to_full_stdout, tiny_checkpoint

FULL = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@FULL
@pytest.mark.slow   # a process that exports: test_export_to_a_full_stdout_in_this_process runs the same in the loop
def test_export_to_a_full_stdout_names_stdout_and_keeps_the_export(tmp_path):
    weights = tiny_checkpoint(tmp_path)
    out = tmp_path / "ef"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "ddpm", "export", "--ckpt", str(tmp_path), "--out", str(out)],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "no space left" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "Error: cannot write to standard output: No space left on device"
    assert Bundle.load(out, expected_hash=weights.hash).onnx_path()   # published and whole


@FULL
def test_export_to_a_full_stdout_in_this_process(tmp_path, capsys):
    """The same export in this process: the first line export prints fails (errors.StdoutFailed), export goes on
    and publishes the folder, then the CLI prints the line for standard output."""
    weights = tiny_checkpoint(tmp_path)
    out = tmp_path / "ef"
    code, err = invoke_to_full_stdout(capsys, "export", "--ckpt", tmp_path, "--out", out)
    assert code == 1, err[-2000:]
    assert "Traceback" not in err and "no space left" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "Error: cannot write to standard output: No space left on device"
    assert Bundle.load(out, expected_hash=weights.hash).onnx_path()   # published and whole
