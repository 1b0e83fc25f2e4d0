"""The TensorRT calls are checked statically: TensorRT cannot be installed here, so a type checker reads export/trt.py
and runtime/trt.py against the TensorRT 10.13 stubs (tests/trt_stubs, see its README), and a misspelt or removed
call fails the suite.

What the 10.13 stubs cannot see of TensorRT 11 (NVIDIA's "Migrating from TensorRT 10.x to 11.x" guide):
- the APIs that 11 removed are still in the stubs: BuilderFlag.FP16/BF16/INT8/FP8/INT4/FP4, the
  OBEY/PREFER_PRECISION_CONSTRAINTS and DIRECT_IO flags, IBuilderConfig's calibration and quantization-flag APIs,
  ICudaEngine.device_memory_size, Builder.platform_has_fast_fp16/int8. test_no_api_removed_in_tensorrt_11 checks by
  name that none of them is used;
- 11 always builds strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED is kept but ignored):
  behaviour, not a signature, so no type checker sees it; export/trt.py sets the flag on 10 only;
- APIs that 11 added or whose signatures it changed: the stubs are 10.13's. Nothing here has run on either version.
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "trt_stubs"
CHECKED = [REPO / "export" / "trt.py", REPO / "runtime" / "trt.py"]

# a call the stubs must refuse: proves that the checker really sees TensorRT's types (not Unknown everywhere)
PROBE = """import tensorrt as trt

builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
network = builder.create_netwrok(0)
"""


def _pyright():
    exe = shutil.which("basedpyright", path=str(Path(sys.executable).parent)) or shutil.which("basedpyright")
    if exe is None:
        pytest.fail("basedpyright is missing: pip install -e '.[test]'")
    return exe


@pytest.mark.slow
def test_tensorrt_calls_type_check_against_the_stubs(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    config = {"typeCheckingMode": "standard", "stubPath": str(STUBS), "pythonVersion": "3.10",
              "reportMissingModuleSource": "none"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    run = subprocess.run([_pyright(), "--outputjson", "--pythonpath", sys.executable, "-p", str(tmp_path),
                          *map(str, CHECKED), str(tmp_path / "probe.py")],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(run.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    where = lambda d: f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
    ours = [where(d) for d in errors if Path(d["file"]).name != "probe.py"]
    assert not ours, "TensorRT calls that do not type-check against the stubs:\n" + "\n".join(ours)
    probe = [d["message"] for d in errors if Path(d["file"]).name == "probe.py"]
    assert len(probe) == 1 and "create_netwrok" in probe[0], probe
    assert report["summary"]["filesAnalyzed"] >= 3


# Python APIs removed in TensorRT 11 that the 10.13 stubs still have (attribute names as written in Python)
REMOVED_IN_11 = {
    "BuilderFlag": {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"},
    "*": {"int8_calibrator", "set_calibration_profile", "get_calibration_profile", "set_quantization_flag",
          "get_quantization_flag", "quantization_flags", "clear_quantization_flag", "device_memory_size",
          "platform_has_fast_fp16", "platform_has_fast_int8"},
}


def _removed_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
        if node.attr in REMOVED_IN_11["*"] or node.attr in REMOVED_IN_11.get(owner, ()):
            found.append((node.lineno, f"line {node.lineno}: {owner}.{node.attr}"))
    return [f for _, f in sorted(found)]


def test_no_api_removed_in_tensorrt_11():
    assert _removed_uses("config.set_flag(trt.BuilderFlag.FP16)\nn = engine.device_memory_size\n") == [
        "line 1: BuilderFlag.FP16", "line 2: engine.device_memory_size"]
    for path in CHECKED:
        assert _removed_uses(path.read_text()) == [], path
