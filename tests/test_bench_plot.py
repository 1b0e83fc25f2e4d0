"""bench.png: the batch sizes and times are labelled as plain numbers (1, 8, 64; 2.5), never as 10^0 or 2x10^0."""

from pathlib import Path

import pytest

from ddpm.bench import speed

plt = pytest.importorskip("matplotlib.pyplot")


@pytest.mark.parametrize("batches, ms", [([1, 2], [3.0, 2.5]), ([1, 8, 64], [30.0, 12.0, 9.0]),
                                         ([1, 256], [0.05, 0.002])])
def test_bench_plot_labels_are_plain_numbers(batches, ms, tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)   # keep the figure plot() draws to read its labels back
    res = {"sampler": "unipc8", "device": "cpu",
           "results": [{"engine": e, "batch": b, "median_s": b * m * f / 1000}
                       for e, f in (("onnx", 1.0), ("torch", 1.3)) for b, m in zip(batches, ms)]}
    assert speed.plot(res, Path(tmp_path / "bench.png")) and (tmp_path / "bench.png").stat().st_size > 0
    ax = figs[-1].axes[0]
    assert [t.get_text() for t in ax.xaxis.get_majorticklabels()] == [str(b) for b in batches]
    labels = [t.get_text() for axis in (ax.xaxis, ax.yaxis)
              for t in (*axis.get_majorticklabels(), *axis.get_minorticklabels()) if t.get_text()]
    assert labels and all(float(t) > 0 for t in labels)   # "2\\times10^{0}" would not parse
    y = [float(t.get_text()) for t in ax.yaxis.get_minorticklabels() + ax.yaxis.get_majorticklabels()
         if t.get_text()]
    lo, hi = ax.get_ylim()
    assert any(lo <= v <= hi for v in y)                 # the visible range carries at least one label
