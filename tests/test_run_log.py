"""A run's log.jsonl as `train --resume` and `distill --resume` read it (train.loop.log_rows, cut_log): line by line
within MAX_LOG_LINE and MAX_LOG_BYTES, a line that is not a row (deep JSON, junk, an over-long line) refused in one
line with the log kept as it is, and only a row cut by a kill (the start of one, last) dropped."""

import json

import pytest

from ddpm.train import loop
from ddpm.train.loop import TrainingError, cut_log
from helpers import invoke, traced_peak


def _rows(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 0.5 + s / 1000}) + "\n" for s in steps)


@pytest.mark.parametrize("junk, said", [("[" * 200_000, "is longer than 4096 bytes"),
                                        ("[" * 4000, "is not a row of the log"),      # RecursionError in json
                                        ("1", "is not a row of the log"),
                                        ('{"step": true, "loss": 1}', "is not a row of the log")])
def test_a_line_that_is_not_a_row_is_refused_and_kept(tmp_path, junk, said):
    """Deep nesting gave a RecursionError traceback; other lines that are not rows were dropped without a word."""
    log = tmp_path / "log.jsonl"
    log.write_text(_rows(range(1, 5)) + junk + "\n" + _rows([5]))
    before = log.read_bytes()
    with pytest.raises(TrainingError, match=f"line 5 {said}.*kept as it is: remove line 5, and run again"):
        cut_log(log, 3)
    assert log.read_bytes() == before


def test_rows_after_the_step_and_a_cut_row_are_dropped(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(_rows(range(1, 7)) + '{"step": 7, "lo')
    cut_log(log, 4)
    assert log.read_text() == _rows(range(1, 5))
    log.write_text(_rows(range(1, 3)) + '{"loss": 0.25, "step": 3}')   # a whole row, unterminated: kept, ended
    cut_log(log, 3)
    assert log.read_text() == _rows(range(1, 3)) + '{"loss": 0.25, "step": 3}\n'
    log.write_text(_rows(range(1, 3)) + "my note")                     # no row's start: not a cut append
    with pytest.raises(TrainingError, match="line 3 is not a row"):
        cut_log(log, 3)


def test_a_log_over_the_bound_is_refused_unread(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text(_rows(range(1, 4001)))   # 124 kB
    before = log.read_bytes()
    monkeypatch.setattr(loop, "MAX_LOG_BYTES", 64 << 10)
    with pytest.raises(TrainingError, match=r"holds 0 MiB, more than a run's log ever does.*move it aside"):
        cut_log(log, 10)
    assert log.read_bytes() == before


@pytest.mark.slow
def test_the_log_is_cut_line_by_line(tmp_path):
    """read_text() and a list of every kept line: memory grew with the log (748 MB for 80 MB of lines)."""
    log = tmp_path / "log.jsonl"
    log.write_text(_rows(range(1, 200_001)))   # 9 MB
    peak = traced_peak(lambda: cut_log(log, 150_000))
    assert log.read_text() == _rows(range(1, 150_001))
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("command", ["train", "distill"])
def test_resume_refuses_a_bad_log_before_any_work(tmp_path, command):
    """Both commands check the log as they check their outputs, before the checkpoint (here not one) is read."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "options.json").write_text("{}\n")
    (run / "ckpt.pt").write_bytes(b"not read")
    (run / "log.jsonl").write_text(_rows([1, 2]) + "[" * 200_000 + "\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = invoke(command, "--out", run, "--resume")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "log.jsonl line 3 is longer than 4096 bytes" in r.output and "Traceback" not in r.output, r.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
