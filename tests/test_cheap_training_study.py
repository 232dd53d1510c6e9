"""benchmarks/cheap_training.py on the smoke budget: a study killed with SIGKILL mid-training continues
from the run's step.ckpt (at most one checkpoint interval lost) and does not redo finished steps."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgtrain.checkpoints import read_checkpoint
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # several train.py and evaluate.py processes
INTERVAL = 2  # the smoke budget's --ckpt-every-steps
FIRST, SECOND = "pgd2_s0", "pqgd2_b100_s0"  # the smoke grid, trained in this order with --jobs 1


def study(out: Path, data: Path, *options: str) -> list[str]:
    """The study's command (run from the repository root: ``cwd=REPO``)."""
    return [sys.executable, "-m", "benchmarks.cheap_training", "--budget", "smoke", "--out", str(out), "--data-dir", str(data),
            "--jobs", "1", *options]  # fmt: skip


def batches_trained(log: Path) -> int:
    """Optimizer steps done, from the last progress-bar line train.py wrote (``Epoch E: ...| n/N``)."""
    epoch, done, per_epoch = re.findall(r"Epoch (\d+):\s+\d+%\|[^|]*\| (\d+)/(\d+)", log.read_text())[-1]
    return int(epoch) * int(per_epoch) + int(done)


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """Train the smoke grid with --jobs 1; SIGKILL the study's whole process group once the second
    run has a step.ckpt past step 2; rerun the same command to the end."""
    out = tmp_path_factory.mktemp("study")
    folder = out / "cheap_training" / "smoke"
    fresh = subprocess.run(study(out, data_root, "--dry-run"), cwd=REPO, capture_output=True, text=True, check=True)
    process = subprocess.Popen(
        study(out, data_root, "--train-only"), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )  # fmt: skip
    step_ckpt = folder / "checkpoints" / SECOND / "step.ckpt"
    deadline = time.monotonic() + 240
    while not (step_ckpt.is_file() and read_checkpoint(step_ckpt)["global_step"] > INTERVAL):
        assert process.poll() is None, "the study ended before it could be killed mid-training"
        assert time.monotonic() < deadline, "no step checkpoint of the second run within 240 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGSTOP)  # frozen: its log and checkpoints are what the kill leaves
    killed = {
        "trained": batches_trained(folder / f"{SECOND}.train.log"),
        "saved": read_checkpoint(step_ckpt)["global_step"],
        "first_done": (folder / f"{FIRST}.done").stat().st_mtime_ns,
        "first_log": (folder / f"{FIRST}.train.log").read_text(),
        "second_done": (folder / f"{SECOND}.done").exists(),
    }
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    planned = subprocess.run(study(out, data_root, "--dry-run"), cwd=REPO, capture_output=True, text=True)
    rerun = subprocess.run(study(out, data_root, "--train-only"), cwd=REPO, capture_output=True, text=True, timeout=300)
    return {
        "out": out,
        "folder": folder,
        "fresh": fresh.stdout,
        "planned": planned.stdout,
        "rerun": rerun,
        **killed,
    }


def test_the_rerun_resumes_the_killed_run_from_its_step_checkpoint(killed_and_rerun):
    run = killed_and_rerun
    assert run["rerun"].returncode == 0, run["rerun"].stdout + run["rerun"].stderr
    assert not run["second_done"] and (run["folder"] / f"{SECOND}.done").is_file()
    # control: a run without a checkpoint starts fresh; after the kill the same run resumes
    assert "--resume" not in run["fresh"]
    assert re.search(rf"todo  train {SECOND}: .* --resume last$", run["planned"], re.MULTILINE)
    log = (run["folder"] / f"{SECOND}.train.log").read_text()
    resumed = [int(step) for step in re.findall(r"resuming from \S+: epoch \d+, step (\d+)", log)]
    assert len(resumed) == 1, log[-2000:]
    assert resumed[0] >= run["saved"] > 0  # from the checkpoint the kill left, not from zero
    assert run["trained"] - resumed[0] <= INTERVAL  # at most one checkpoint interval lost


def test_the_rerun_does_not_redo_the_finished_run(killed_and_rerun):
    run = killed_and_rerun
    assert re.search(rf"^done  train {FIRST}:", run["planned"], re.MULTILINE)
    assert f"train {FIRST}:" not in run["rerun"].stdout  # not launched again
    assert (run["folder"] / f"{FIRST}.done").stat().st_mtime_ns == run["first_done"]
    assert (run["folder"] / f"{FIRST}.train.log").read_text() == run["first_log"]


def test_judging_writes_each_result_once_and_the_report_reads_them(killed_and_rerun, data_root):
    run = killed_and_rerun
    judged = subprocess.run(study(run["out"], data_root, "--judge-only"), cwd=REPO, capture_output=True, text=True)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    results = run["folder"] / "results"
    for name in (FIRST, SECOND):  # every run: APGD-CE -> APGD-T only
        record = json.loads((results / name / "results.json").read_text())
        assert [a["label"] for a in record["results"]["suite"]["attacks"]] == ["apgd_ce", "apgd_t"]
    assert list(results.glob("*_full/results.json"))  # the whole suite for the frontier (equal cost)
    written = {path: path.stat().st_mtime_ns for path in results.glob("*/results.json")}
    again = subprocess.run(study(run["out"], data_root, "--judge-only"), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and not re.search(r"\] judge \S+: ", again.stdout)  # nothing launched
    assert {path: path.stat().st_mtime_ns for path in results.glob("*/results.json")} == written
    report = subprocess.run(study(run["out"], data_root, "--report"), cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "pqgd2_b100" in report.stdout and (run["out"] / "cheap_training_smoke.png").is_file()
