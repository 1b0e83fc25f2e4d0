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


def test_quiet_gen_on_the_onnx_engine_loads_neither_torch_nor_tqdm_nor_pillows_other_formats(tmp_path):
    """-q shows no progress bar: tqdm (about 50 ms of CPU and a monitor thread) is not imported; the onnx engine
    runs without PyTorch; a .png grid loads the plugins Pillow's own save loads (PNG, BMP, GIF, JPEG, PPM), not
    the other 40 (about 45 ms)."""
    loaded = _modules_after_gen(tmp_path, "-n", 2, "--steps", 2, "-q", "--engine", "onnx", "--out", "d.png")
    assert (tmp_path / "d.png").is_file()
    assert "onnxruntime" in loaded and not {m for m in loaded if m.split(".")[0] in ("torch", "tqdm")}
    assert "PIL.PngImagePlugin" in loaded and "PIL.TiffImagePlugin" not in loaded


def test_a_grid_of_another_format_than_png_is_still_written_by_its_extension(tmp_path):
    """Extensions other than .png go to the format Pillow's plugins register for them (a TIFF here)."""
    import numpy as np
    from PIL import Image

    from ddpm.runtime.images import grid, save_grid

    images = (np.arange(4 * 28 * 28) % 251).astype(np.uint8).reshape(4, 28, 28)
    save_grid(images, tmp_path / "g.tif")
    with Image.open(tmp_path / "g.tif") as im:
        assert im.format == "TIFF"
        assert np.array_equal(np.asarray(im), grid(images).repeat(2, axis=0).repeat(2, axis=1))
