"""CPU thread defaults (bench/threads.md): onnxruntime sessions with as many intra-op threads as CPUs this process
may use and no spinning; the CLI's PyTorch with OMP_WAIT_POLICY=PASSIVE unless the user set it."""

import os
import subprocess
import sys

import pytest

from ddpm.export.onnx_export import ort_session
from ddpm.runtime import nets
from ddpm.runtime.nets import OnnxNet, cpu_count
from helpers import slow_except


@pytest.fixture(scope="module")
def onnx_path(tiny_exported):
    return tiny_exported(0) / "exp" / "model.onnx"


def _applied(sess):
    """(intra-op threads, intra-op spinning, inter-op spinning) read back from a live session."""
    so = sess.get_session_options()
    return (so.intra_op_num_threads, so.get_session_config_entry("session.intra_op.allow_spinning"),
            so.get_session_config_entry("session.inter_op.allow_spinning"))


def test_cpu_count_is_the_affinity_mask(monkeypatch):
    assert cpu_count() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})   # e.g. `taskset -c 3 ddpm gen`
    assert cpu_count() == 1


def test_onnx_sessions_use_the_chosen_options(onnx_path, monkeypatch):
    # the defaults bench/results/2026-11-30-threads.md chose, as a live session applies them: a thread per CPU, no spinning
    assert _applied(OnnxNet(onnx_path).sess) == (cpu_count(), "0", "0")
    assert _applied(ort_session(onnx_path)) == (cpu_count(), "0", "0")    # export's verification session too
    assert _applied(OnnxNet(onnx_path, threads=1).sess)[0] == 1          # --threads wins
    assert _applied(OnnxNet(onnx_path, spinning=True).sess)[1:] == ("1", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})        # one CPU allowed: one thread
    assert _applied(OnnxNet(onnx_path).sess)[0] == 1
    # the module's settings, which bench/threads.py varies, reach every new session (the engines' and export's)
    monkeypatch.setattr(nets, "ORT_THREADS", 2)
    monkeypatch.setattr(nets, "ORT_SPINNING", True)
    assert _applied(OnnxNet(onnx_path).sess) == (2, "1", "1") and _applied(ort_session(onnx_path)) == (2, "1", "1")


@pytest.mark.parametrize("given, expected, module", slow_except(   # the API too, not only the CLI
    [(g, e, m) for m in ("ddpm.cli", "ddpm") for g, e in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE"))],
    (None, "PASSIVE", "ddpm"), ("ACTIVE", "ACTIVE", "ddpm.cli")))
def test_cli_sets_a_passive_omp_wait_policy_before_torch_loads(given, expected, module):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = f"import os, sys, {module}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == [expected, "False"]   # set before PyTorch (and its OpenMP runtime) is loaded


@pytest.mark.parametrize("given, expected", [(None, "4"), ("28", "28")])
def test_import_ddpm_lets_idle_openblas_threads_sleep_before_numpy_loads(given, expected):
    """numpy's OpenBLAS threads spin ~2^28 cycles before they sleep (about 40 ms of CPU per `ddpm` command on 2
    cores): `import ddpm` asks for OpenBLAS's least timeout before numpy loads, and keeps a value of the user's."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import os, sys, ddpm.cli; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), 'numpy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == [expected, "True"]   # ddpm.cli loads numpy: the variable was set before it
