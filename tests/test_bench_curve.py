"""The training-curve picture (bench/curve.py): read from `ddpm eval --json` files, plotted with plain tick labels,
and a folder without its eval files refused in one line."""

import json
from pathlib import Path

import pytest

from ddpm.bench import curve

plt = pytest.importorskip("matplotlib.pyplot")


def _point(folder: Path, fd_cond: float, acc: float, fd_uncond: float, top: float) -> Path:
    folder.mkdir()
    row = {"n": 2000, "fd_ratio": fd_cond, "cond_accuracy": acc, "uncond_top_prob": None, "real_top_prob": 0.987}
    (folder / "eval-cond.json").write_text(json.dumps([row]))
    (folder / "eval-uncond.json").write_text(json.dumps([{**row, "fd_ratio": fd_uncond, "cond_accuracy": None,
                                                          "uncond_top_prob": top}]))
    return folder


def test_curve_reads_eval_files_and_plots_plain_labels(tmp_path, monkeypatch):
    a = _point(tmp_path / "a", 1.45, 0.991, 7.19, 0.875)
    b = _point(tmp_path / "b", 1.32, 0.984, 4.41, 0.907)
    assert curve.read_point(b) == {"fd_cond": 1.32, "accuracy": 0.984, "fd_uncond": 4.41, "top_prob": 0.907,
                                   "real_top_prob": 0.987, "n": 2000}
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)   # keep the figure to read its axes back
    out = tmp_path / "curve.png"
    curve.main(["--point", f"0={a}", "--point", f"3500={b}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fd_axis, acc_axis, top_axis = figs[-1].axes
    assert [list(line.get_ydata()) for line in fd_axis.get_lines()[:2]] == [[1.45, 1.32], [7.19, 4.41]]
    assert list(acc_axis.get_lines()[0].get_ydata()) == pytest.approx([99.1, 98.4])
    assert list(top_axis.get_lines()[0].get_xdata()) == [0, 3500]
    labels = [t.get_text() for t in fd_axis.yaxis.get_majorticklabels() if t.get_text()]
    assert labels and all(float(t) > 0 for t in labels)   # "2\\times10^{0}" would not parse


def test_curve_refuses_a_folder_without_eval_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        curve.main(["--point", f"0={tmp_path / 'empty'}", "--out", str(tmp_path / "c.png")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "eval-cond.json" in err and err.count("\n") == 1
    assert not (tmp_path / "c.png").exists()
