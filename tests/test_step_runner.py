"""benchmarks/steps.py's runner: when nothing is left to start, a step that is not done because its
inputs never appeared says so instead of vanishing from the run (a judge whose checkpoint went to
another folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.steps import Step, run_steps


def test_a_step_whose_inputs_never_appeared_is_named_with_the_missing_path(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The judge's ``best.ckpt`` is absent: the runner ends, naming it. Control: a done step (its
    marker exists) is not named."""
    done = tmp_path / "trained.done"
    done.touch()
    ckpt = tmp_path / "checkpoints" / "r_s0" / "best.ckpt"
    trained = Step("train r_s0", ["python", "train.py"], tmp_path / "t.log", done, marker=True)
    judge = Step("judge r_s0", ["python", "evaluate.py"], tmp_path / "j.log", tmp_path / "results.json", needs=(ckpt,))
    assert run_steps(lambda: [trained, judge], jobs=1) == []
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [f"judge r_s0: not run: {ckpt} absent"]
