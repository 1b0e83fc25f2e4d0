"""What `ddpm gen` loads besides the network: nothing that its options do not use (the fixed cost of a command,
bench/results/2026-12-07-gen-fixed-cost.md)."""

import subprocess
import sys


def _modules_after_gen(tmp_path, *args) -> set[str]:
    """The modules loaded by `ddpm gen ARGS` on the shipped model, run in a fresh interpreter to its end."""
    code = ("import sys; from ddpm.cli import main\n"
            f"sys.argv = ['ddpm', 'gen', *{[str(a) for a in args]!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "open('modules.txt', 'w').write(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return set((tmp_path / "modules.txt").read_text().split())


def test_quiet_gen_on_the_onnx_engine_loads_neither_torch_nor_tqdm(tmp_path):
    """-q shows no progress bar: tqdm (about 50 ms of CPU and a monitor thread) is not imported; the onnx engine
    runs without PyTorch."""
    loaded = _modules_after_gen(tmp_path, "-n", 2, "--steps", 2, "-q", "--engine", "onnx", "--out", "d.png")
    assert (tmp_path / "d.png").is_file()
    assert "onnxruntime" in loaded and not {m for m in loaded if m.split(".")[0] in ("torch", "tqdm")}
