"""A run's folder is owned: a name holding another run's files is never written into without
``--resume`` (``-vN`` instead, whoever chose the name), two processes never write one folder (a
lock), names are single path components, and run names drop ``-b`` for attacks without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import qgtrain.checkpoints as checkpoints
import qgtrain.cli.train as train_cli
from qgtrain.attacks import ATTACKS
from tests.helpers import ONE_STEP_ARGS, REPO, call_main, error_lines, no_training, output_roots

ONE_STEP = [*ONE_STEP_ARGS, "--epochs", "1"]


@pytest.fixture(autouse=True)
def one_thread(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    torch.set_num_threads(1)


def test_an_explicit_run_name_holding_checkpoints_gets_the_next_version(tmp_path: Path) -> None:
    """The same ``--run-name`` twice without ``--resume``: the second run writes ``r-v1`` and the
    first run's checkpoint is untouched. Control: with ``--resume`` it continues ``r`` itself."""
    argv = [*ONE_STEP, *output_roots(tmp_path), "--run-name", "r"]
    assert call_main(train_cli.main, argv) == 0
    first = (tmp_path / "ckpt" / "r" / "last.ckpt").read_bytes()
    assert call_main(train_cli.main, argv) == 0
    assert (tmp_path / "ckpt" / "r" / "last.ckpt").read_bytes() == first
    assert (tmp_path / "ckpt" / "r-v1" / "last.ckpt").is_file()
    assert call_main(train_cli.main, [*argv, "--epochs", "2", "--resume", "last"]) == 0  # r-v1, newest
    assert torch.load(tmp_path / "ckpt" / "r-v1" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "ckpt" / "r-v2").exists()  # the control: resuming writes into its own run
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["r", "r-v1"]  # no lock left


def test_resuming_under_a_name_that_is_another_runs_folder_gets_the_next_version(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert call_main(train_cli.main, [*ONE_STEP, *output_roots(tmp_path), "--run-name", "a"]) == 0
    assert call_main(train_cli.main, [*ONE_STEP, *output_roots(tmp_path), "--run-name", "b"]) == 0
    name, _, _ = checkpoints.start_point("b", str(root / "a"), root, "x", 5, -1)
    assert name == "b-v1"  # b holds another run: resuming a's checkpoint must not write there
    assert checkpoints.start_point("a", str(root / "a"), root, "x", 5, -1)[0] == "a"  # control: its own


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x"])
def test_run_names_are_single_path_components(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*ONE_STEP, *output_roots(tmp_path), "--run-name", name]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --run-name {name!r}: a name must be")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even above the roots
    assert checkpoints.check_run_name("my-run.v2") == "my-run.v2"  # the control: a plain name passes


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from qgtrain.checkpoints import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
if sys.argv[2] == "hold":
    time.sleep(60)
lock.release()
"""


def _hold_lock(folder: Path, how: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(folder), how],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_of_a_run_folder_is_refused_and_a_dead_owner_leaves_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Another process holds ``r``'s lock: a run resuming ``r`` (the one writer it may not share the
    folder with) is refused in one line naming the owner's PID, and a new run named ``r`` gets
    ``r-v1``. After the owner is SIGKILLed, its lock is gone with it (flock): the control resumes,
    and a name whose killed owner left its lock file behind is free again."""
    argv = [*ONE_STEP, *output_roots(tmp_path), "--run-name", "r"]
    assert call_main(train_cli.main, argv) == 0
    folder = tmp_path / "ckpt" / "r"
    owner = _hold_lock(folder, "hold")
    try:
        assert call_main(train_cli.main, [*argv, "--epochs", "2", "--resume", "last"]) == 1
        lines = error_lines(capsys.readouterr().err)
        assert lines == [
            f"train.py: error: {folder} is being written by another training process (pid {owner.pid}); "
            "wait for it to end, or start this run under another --run-name"
        ]
        assert checkpoints.unique_run_name(tmp_path / "ckpt", "q") == "q"
        (tmp_path / "ckpt" / "q").mkdir()  # an empty folder whose writer holds the lock: taken
        q_owner = _hold_lock(tmp_path / "ckpt" / "q", "hold")
        assert checkpoints.unique_run_name(tmp_path / "ckpt", "q") == "q-v1"
        q_owner.kill()
        q_owner.wait()
        # its lock file stays, unheld: the name is free again (a grid run killed before its first
        # checkpoint sent the next session's run to -v1, where its judge never looked)
        assert (tmp_path / "ckpt" / ".q.lock").exists()
        assert checkpoints.unique_run_name(tmp_path / "ckpt", "q") == "q"
    finally:
        owner.kill()
        owner.wait()
    assert call_main(train_cli.main, [*argv, "--epochs", "2", "--resume", "last"]) == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    released = _hold_lock(tmp_path / "ckpt" / "z", "release")  # a clean release removes the file
    released.wait()
    assert not (tmp_path / "ckpt" / ".z.lock").exists()


@pytest.mark.parametrize(
    ("inner", "expected"),
    [("pqgd", "mnist-tiny_cnn-pqgd-k2-b100"), ("pgd", "mnist-tiny_cnn-pgd-k2-b1"), ("rgd", "mnist-tiny_cnn-rgd-k2")],
)
def test_run_names_drop_b_for_attacks_that_take_none(inner: str, expected: str, tmp_path: Path) -> None:
    """Decided by the class's constructor (RGD has no ``b`` argument), never its name; names of
    classes with ``b`` (the controls) are unchanged, as is the main job's."""
    argv = [*ONE_STEP, *output_roots(tmp_path), "--inner", inner, "--steps", "2"]
    assert train_cli.build_cli(argv).run_name == expected
    assert ("b" in ATTACKS[inner].constructor_defaults()) == expected.endswith(("-b1", "-b100"))
    assert checkpoints.run_name("mnist", "madry_mnist", "pqgd", 10, 100) == "mnist-madry_mnist-pqgd-k10-b100"
