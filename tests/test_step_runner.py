"""benchmarks/steps.py's runner: when nothing is left to start, a step that is not done because its
inputs never appeared says so instead of vanishing from the run (a judge whose checkpoint went to
another folder); a step another live process runs (a runner restarted on newer code finds its
predecessor's) holds one of the jobs until it ends; a ready judgement goes before a new training run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import steps
from benchmarks.steps import Step, run_steps

FAKE_TRAIN = """import sys, time
name = sys.argv[sys.argv.index("--run-name") + 1]
with open("order.txt", "a") as order:
    order.write(name + " start\\n")
time.sleep(float(sys.argv[sys.argv.index("--seconds") + 1]))
with open("order.txt", "a") as order:
    order.write(name + " end\\n")
"""


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


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_step_another_process_runs_holds_a_job_until_it_ends(
    jobs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Another runner's process trains ``a_s0`` (3 s); with one job the runner leaves it, waits, and
    starts ``b_s0`` when it ends, then finds ``a_s0`` done. Control, two jobs: ``b_s0`` starts while
    ``a_s0`` runs, so the order the test reads can show the overlap."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(steps, "REPO_ROOT", tmp_path)  # the runner's steps run the fake train.py
    root = str(tmp_path / "checkpoints")

    def train(name: str, seconds: str) -> Step:
        command = [sys.executable, "train.py", "--run-name", name, "--checkpoint_root", root, "--seconds", seconds]
        return Step(f"train {name}", command, tmp_path / f"{name}.log", tmp_path / f"{name}.done", marker=True)

    first, second = train("a_s0", "3"), train("b_s0", "0")
    other = subprocess.Popen(
        ["bash", "-c", '"${@:2}" && touch "$1"', "other", str(first.target), *first.command], cwd=tmp_path
    )
    order = tmp_path / "order.txt"
    while not order.exists():
        time.sleep(0.05)
    assert run_steps(lambda: [first, second], jobs=jobs) == []
    other.wait()
    expected = ["a_s0 start", "a_s0 end", "b_s0 start", "b_s0 end"]
    if jobs == 2:
        expected = ["a_s0 start", "b_s0 start", "b_s0 end", "a_s0 end"]
    assert order.read_text().splitlines() == expected
    logged = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert "train a_s0: another process runs it; left to it" in logged
    assert "train a_s0: the other process ended; done" in logged


FAKE_EVALUATE = """import json, pathlib, sys
name = sys.argv[sys.argv.index("--name") + 1]
with open("order.txt", "a") as order:
    order.write(name + "\\n")
out = pathlib.Path(sys.argv[sys.argv.index("--out-dir") + 1]) / name
out.mkdir(parents=True)
(out / "results.json").write_text(json.dumps({"results": {}}))
"""


def test_a_ready_judgement_runs_before_a_new_training_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The plan lists ``train b_s0`` before ``judge a_s0`` (cheapest training first); with one job the
    runner judges the trained run first. Control: ``judge c_s0``, whose checkpoint is absent, is not
    run and is named."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "evaluate.py").write_text(FAKE_EVALUATE)
    monkeypatch.setattr(steps, "REPO_ROOT", tmp_path)
    results, ckpt = tmp_path / "results", tmp_path / "a_s0.ckpt"
    ckpt.touch()

    def judge(name: str, needs: Path) -> Step:
        command = [sys.executable, "evaluate.py", "--name", name, "--out-dir", str(results)]
        return Step(f"judge {name}", command, tmp_path / f"{name}.log", results / name / "results.json", (needs,))

    command = [sys.executable, "train.py", "--run-name", "b_s0", "--checkpoint_root", str(tmp_path), "--seconds", "0"]
    train = Step("train b_s0", command, tmp_path / "b_s0.log", tmp_path / "b_s0.done", marker=True)
    missing = tmp_path / "c_s0.ckpt"
    assert run_steps(lambda: [train, judge("a_s0", ckpt), judge("c_s0", missing)], jobs=1) == []
    assert (tmp_path / "order.txt").read_text().splitlines() == ["a_s0", "b_s0 start", "b_s0 end"]
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"judge c_s0: not run: {missing} absent")
