"""An interrupted evaluate.py (Ctrl-C or SIGTERM): what was finished, per part, in ``NAME-partial``
(the plain name stays free for the full run), one line when nothing was finished, no claimed flag."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import qgtrain.evaluation.protocol as protocol
from qgtrain.cli.evaluate import main
from tests.helpers import call_main, error_lines

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's fixtures: data_dir, tiny_ckpt

# Two batches of 50; on each the suite, then the two paper rows: attack_batch calls 1-3 are batch 0.
FAST = ["--n", "100", "--batch-size", "50", "--steps", "3", "--targets", "2", "--queries", "20"]
FAST += ["--eps", "0.1", "--suite", "apgd_ce,apgd_t", "--threads", "1", "--device", "cpu", "--quiet"]
FAST += ["--name", "cut"]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int, stop=None) -> None:
    """The ``call``-th attack_batch is interrupted (by ``stop()``, default a Ctrl-C)."""
    real, calls = protocol.attack_batch, []

    def attack_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if stop is None:
                raise KeyboardInterrupt
            stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "attack_batch", attack_batch)


def evaluate(ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    return call_main(
        main, ["--ckpt", str(ckpt), "--data-dir", str(data), "--out-dir", str(out), *FAST, *extra]
    )


def test_nothing_finished_is_one_line_and_nothing_written(
    tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Interrupted in batch 0's suite: one line, status 130, no folder. Control: interrupted after
    batch 0, the finished batch is written."""
    interrupt_at(monkeypatch, 1)
    assert evaluate(tiny_ckpt, data_dir, tmp_path) == 130
    lines = error_lines(capsys.readouterr().err, "evaluate.py")
    assert len(lines) == 1 and "nothing was finished, nothing written" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    interrupt_at(monkeypatch, 4)
    assert evaluate(tiny_ckpt, data_dir, tmp_path) == 130
    assert json.loads((tmp_path / "cut-partial" / "results.json").read_text())["results"]["n"] == 50


def test_the_suite_finished_rows_not_are_reported_per_part_without_a_claimed_flag(
    tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Interrupted in batch 0's first paper row: the suite's batch is reported, the rows named as
    unfinished, the checks as not run (no "--no-masking-checks", which was not given), in
    ``cut-partial``; the full run then takes ``cut``, not ``cut-v1``. Control: with the flag given,
    the report says so."""
    interrupt_at(monkeypatch, 2)
    assert evaluate(tiny_ckpt, data_dir, tmp_path) == 130
    err = capsys.readouterr().err
    assert "the suite finished 1 of 2 batches (50 of 100 examples); not finished, left out: pqgd" in err, err
    folder = tmp_path / "cut-partial"
    record = json.loads((folder / "results.json").read_text())
    results = record["results"]
    assert results["n"] == 50 and results["rows"] == [] and len(results["suite"]["attacks"]) == 2
    assert results["unfinished"] == ["pqgd (b=100)", "blob_qg (b=100)"]
    assert record["masking"]["skipped"] == "interrupted"
    markdown = (folder / "results.md").read_text()
    assert "Not run: the evaluation was interrupted." in markdown and "--no-masking-checks" not in markdown
    assert "PARTIAL: interrupted; the suite finished 1 of 2 batches" in markdown
    monkeypatch.undo()
    assert evaluate(tiny_ckpt, data_dir, tmp_path, "--no-masking-checks") == 0
    assert (tmp_path / "cut" / "results.json").exists() and not (tmp_path / "cut-v1").exists()
    assert "Checks disabled (--no-masking-checks)." in (tmp_path / "cut" / "results.md").read_text()


def test_sigterm_writes_what_was_finished_and_exits_143(
    tiny_ckpt: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM (a scheduler's stop) in batch 1 writes batch 0, marked partial, status 143; the
    handler in place before is back afterwards. Control: the same run uninterrupted covers both
    batches."""
    before = signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert evaluate(tiny_ckpt, data_dir, tmp_path) == 143
    assert "interrupted (SIGTERM); the suite finished 1 of 2 batches" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut-partial" / "results.json").read_text())["results"]["n"] == 50
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.undo()
    assert evaluate(tiny_ckpt, data_dir, tmp_path, "--no-masking-checks") == 0
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["results"]["n"] == 100
