"""Issue 8, process-level faults: a bad argument in a real process, numerical faults, kill -9 / Ctrl-C /
SIGTERM / SIGUSR1 and resuming, DDP resume, unwritable output folders. One test (or parametrized
family) per item; see docs/RELIABILITY.md. Bad arguments, bad data and bad checkpoints are tables in
their subject's file (test_cli.py, test_evaluate.py, test_data.py). Training runs use a tiny CNN on a
few hundred real MNIST images."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qgtrain.checkpoints.files as checkpoint_files
import qgtrain.checkpoints.resume as resume
import qgtrain.cli.train as train_cli
from qgtrain.attacks import ATTACKS, build_attack
from qgtrain.checkpoints import LastCheckpoint, RestoreLoaderState, StepCheckpoint
from qgtrain.data import VisionDataModule
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.module import looks_like_probabilities
from tests.helpers import (
    ONE_STEP_ARGS,
    REPO,
    KillAfterBatches,
    KilledError,
    SoftmaxOutput,
    call_main,
    error_lines,
    load_mnist_tensors,
    no_training,
    output_roots,
    small_mnist_datamodule,
)

# Six batches of 50 per epoch, 2-step PGD, one validation batch, no robustness/visualization callbacks.
TINY = [
    "--net", "tiny_cnn", "--inner", "pgd", "--steps", "2", "--run-name", "r",
    "--data.init_args.train_subset", "300", "--data.init_args.val_size", "100",
    "--data.init_args.batch_size", "50", "--data.init_args.eval_batch_size", "100",
    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
    "--robustness.every_n_epochs", "0", "--visualization.every_n_epochs", "0",
]  # fmt: skip
BATCHES_PER_EPOCH = 6
LIGHTNING_SIGNAL_NOTICE = "Received SIGTERM"  # Lightning's notice, which names every signal SIGTERM


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread here and in the subprocesses: several times faster on a shared 2-core
    machine, and in-process and subprocess runs then reduce floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_subprocess(
    argv: list[str],
    data_root: Path,
    stdout: int = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen:
    """``train.py argv`` in a subprocess; ``env`` adds variables, ``new_session`` makes it a process
    group leader (so a DDP launcher and its workers can be killed together)."""
    env = {
        **os.environ,
        "QGTRAIN_DATA": str(data_root),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


class ProgressWatcher:
    """Follows the progress bar of a ``train.py`` process (tqdm on stdout) from a reader thread."""

    PATTERN = re.compile(r"Epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/\d+")

    def __init__(self, argv: list[str], data_root: Path, env: dict[str, str] | None = None) -> None:
        self.process = train_subprocess(
            [*argv, "--trainer.enable_progress_bar=true"], data_root, stdout=subprocess.PIPE, env=env
        )
        self.text = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for chunk in iter(lambda: self.process.stdout.read(64), ""):
                self.text = (self.text + chunk)[-4000:]
        except ValueError:  # the test closed the pipe after killing the process
            return

    def batches_done(self) -> tuple[int, int]:
        """(epoch, batches finished in it) from the latest progress bar update."""
        matches = self.PATTERN.findall(self.text)
        return (int(matches[-1][0]), int(matches[-1][1])) if matches else (0, 0)


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before the kill point")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.01)


def load_all_checkpoints(folder: Path) -> dict[str, dict]:
    """Every ``*.ckpt`` in ``folder``, loaded with ``weights_only=True``; each must be complete."""
    loaded = {}
    for path in sorted(folder.glob("*.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "qgtrain"} <= checkpoint.keys()
        loaded[path.name] = checkpoint
    return loaded


def assert_same_state(a: dict, b: dict) -> None:
    """Same parameters, optimizer and scheduler state, epoch and global step, bit for bit."""
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["param_groups"] == opt_b["param_groups"]
        for index, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name]))
    assert a["lr_schedulers"] == b["lr_schedulers"]


# ======================================================================= 1. bad arguments in a real process
def test_train_bad_argument_in_a_real_process(data_root: Path, tmp_path: Path) -> None:
    process = train_subprocess([*TINY, *output_roots(tmp_path), "--eps", "0"], data_root)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        "train.py: error: --eps must be in (0, 1] for inputs in [0, 1], got 0.0"
    ]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


# ======================================================================= 2. numerical faults
def test_nan_loss_stops_with_epoch_step_and_last_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The network turns to NaN in the second epoch: the run stops there, pointing at last.ckpt."""
    forward = TinyCNN.forward
    train_mode_calls = []

    def poisoned(self: TinyCNN, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        if self.training:  # the update's forward pass (attacks and validation run in eval mode)
            train_mode_calls.append(1)
            if len(train_mode_calls) > BATCHES_PER_EPOCH + 2:
                return out * float("nan")
        return out

    monkeypatch.setattr(TinyCNN, "forward", poisoned)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    assert call_main(train_cli.main, [*TINY, *output_roots(tmp_path), "--epochs", "2"]) == 1
    lines = error_lines(capsys.readouterr().err)
    last = tmp_path / "ckpt" / "r" / "last.ckpt"
    step = BATCHES_PER_EPOCH + 2
    assert len(lines) == 1 and f"training loss is nan at epoch 1, step {step}" in lines[0], lines
    assert f"last good checkpoint: {last}" in lines[0]
    checkpoint = load_all_checkpoints(last.parent)["last.ckpt"]
    assert checkpoint["global_step"] == BATCHES_PER_EPOCH  # nothing after the fault was kept
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


class ConstantLogits(nn.Module):
    """Ignores its input except through a zero weight: every input gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 10) + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("name", [name for name, cls in ATTACKS.items() if cls.uses_gradients])
def test_attacks_survive_all_zero_gradients(name: str) -> None:
    x, y = load_mnist_tensors(16)
    model = ConstantLogits()
    cls = ATTACKS[name]
    for random_start in (True, False):
        kwargs = {"eps": 0.1, "steps": 3, "random_start": random_start}
        if "b" in cls.constructor_defaults():  # FAB has no quantization level
            kwargs["b"] = 4
        if "alpha" in cls.constructor_defaults():  # APGD sets its own step size
            kwargs["alpha"] = 0.02
        attack = cls(**kwargs)
        directions: list[torch.Tensor] = []
        result = attack.perturb(
            model, x, y, observer=lambda s, loss, g, d, seen=directions: seen.append(d.clone())
        )
        assert len(directions) == 3 and all(torch.isfinite(d).all() for d in directions)
        x_adv = result.x_adv
        assert torch.isfinite(x_adv).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        if cls.stays_in_ball:  # N-FGSM's training perturbation leaves the ball by design
            assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        if not random_start and not attack.batch_coupled:
            assert torch.equal(x_adv, x)  # no gradient, no information, no move
    assert all(p.grad is None for p in model.parameters())


def _fit_one_step(net: nn.Module) -> list[str]:
    x, y = load_mnist_tensors(40)
    module = AdversarialTraining(net, inner=build_attack("pgd", eps=0.1, alpha=0.05, steps=1))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=20))
    return [str(w.message) for w in caught]


def test_probability_outputs_are_warned_about_and_logits_are_not() -> None:
    assert looks_like_probabilities(torch.randn(8, 10).softmax(1))
    assert not looks_like_probabilities(torch.randn(8, 10))
    assert not looks_like_probabilities(torch.randn(8, 10).log_softmax(1))  # fine for cross-entropy
    assert not looks_like_probabilities(torch.rand(8, 10) / 10)  # in [0, 1] but rows do not sum to 1
    torch.manual_seed(0)
    warned = [m for m in _fit_one_step(SoftmaxOutput(TinyCNN(width=4))) if "look like probabilities" in m]
    assert len(warned) == 1 and "remove the final softmax" in warned[0]
    assert not [m for m in _fit_one_step(TinyCNN(width=4)) if "probabilities" in m]


# ======================================================================= 3. interruption
ATOMIC_WRITER = r"""
import json, os, shutil, signal, sys, time
import torch
from pathlib import Path
from qgtrain.checkpoints import atomic_torch_save

# The parent runs no torch op before forking (a forked child would hang on the parent's thread
# pool): it snapshots the file after each kill and checks the snapshots at the end.
root, trials = Path(sys.argv[1]), int(sys.argv[2])
save = {"atomic": atomic_torch_save, "plain": torch.save}  # plain: the control
mid_write = {mode: 0 for mode in save}
for mode in save:
    folder = root / mode
    folder.mkdir()
    path = folder / "last.ckpt"
    for trial in range(trials):
        child = os.fork()
        if child == 0:  # writer: overwrite the same checkpoint forever, each version self-consistent
            version = 0
            while True:
                version += 1
                save[mode]({"version": version, "payload": torch.full((2_000_000,), float(version))}, path)
        deadline = time.monotonic() + 60  # a loaded machine may not finish the first write in 80 ms
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.08 + 0.02 * trial)
        mid_write[mode] += bool(list(folder.glob(".*.tmp")))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        shutil.copyfile(path, folder / f"snapshot-{trial}")
        for stale in folder.glob(".*.tmp"):
            stale.unlink()
report = {}
for mode in save:
    report[mode] = {"killed_mid_write": mid_write[mode], "complete": 0, "unreadable": 0}
    for trial in range(trials):
        try:
            state = torch.load(root / mode / f"snapshot-{trial}", weights_only=True)
            assert state["version"] >= 1 and bool((state["payload"] == state["version"]).all())
            report[mode]["complete"] += 1
        except Exception:
            report[mode]["unreadable"] += 1
print(json.dumps(report))
"""


def _run_writer(folder: Path, trials: int) -> dict[str, dict[str, int]]:
    out = subprocess.run(
        [sys.executable, "-c", ATOMIC_WRITER, str(folder), str(trials)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sigkill_during_checkpoint_writes_never_leaves_a_truncated_file(tmp_path: Path) -> None:
    """A process rewriting an 8 MB checkpoint in a loop is SIGKILLed 10 times at different moments:
    with the atomic writer the file is always complete and self-consistent, also when the kill lands
    mid-write; the control, plain ``torch.save``, leaves truncated files under the same kills."""
    report = _run_writer(tmp_path, 10)
    assert report["atomic"]["complete"] == 10, report
    assert report["atomic"]["killed_mid_write"] >= 1, report  # kills did land while a write was under way
    assert report["plain"]["unreadable"] >= 1, report


@pytest.fixture(scope="module")
def uninterrupted_root(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory, single_thread: None
) -> Path:
    """The reference: 2 epochs in one go (in-process); its output root (``ckpt/r``, ``logs/r``)."""
    tmp = tmp_path_factory.mktemp("reference")
    old = os.environ.get("QGTRAIN_DATA")
    os.environ["QGTRAIN_DATA"] = str(data_root)
    try:
        assert call_main(train_cli.main, [*TINY, *output_roots(tmp), "--epochs", "2"]) == 0
    finally:
        if old is None:
            os.environ.pop("QGTRAIN_DATA")
        else:
            os.environ["QGTRAIN_DATA"] = old
    return tmp


@pytest.fixture(scope="module")
def uninterrupted_run(uninterrupted_root: Path) -> dict:
    """The reference run's final last.ckpt."""
    return load_all_checkpoints(uninterrupted_root / "ckpt" / "r")["last.ckpt"]


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted_run(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted_run: dict
) -> None:
    run_dir = tmp_path / "ckpt" / "r"
    process = train_subprocess([*TINY, *output_roots(tmp_path), "--epochs", "2"], data_root)
    wait_for(lambda: (run_dir / "last.ckpt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    checkpoints = load_all_checkpoints(run_dir)
    assert checkpoints["last.ckpt"]["global_step"] == BATCHES_PER_EPOCH  # killed in epoch 1
    assert checkpoints["last.ckpt"]["epoch"] == 0

    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    assert (
        call_main(train_cli.main, [*TINY, *output_roots(tmp_path), "--epochs", "2", "--resume", "last"]) == 0
    )
    resumed = load_all_checkpoints(run_dir)["last.ckpt"]
    assert resumed["global_step"] == 2 * BATCHES_PER_EPOCH
    assert_same_state(resumed, uninterrupted_run)


def test_sigkill_mid_first_epoch_leaves_nothing_broken(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Killed after 3 of the first epoch's 6 batches, before any checkpoint: no file is left
    half-written, and ``--resume last`` says cleanly that there is nothing to resume."""
    run = ProgressWatcher([*TINY, *output_roots(tmp_path), "--epochs", "2"], data_root)
    wait_for(lambda: run.batches_done() >= (0, 3), run.process)
    run.process.send_signal(signal.SIGKILL)
    run.process.wait(timeout=30)
    assert run.batches_done()[0] == 0 and run.batches_done()[1] < BATCHES_PER_EPOCH
    run_dir = tmp_path / "ckpt" / "r"
    assert not run_dir.exists() or not list(run_dir.glob("*.ckpt"))
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*TINY, *output_roots(tmp_path), "--resume", "last"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"train.py: error: --resume last: no checkpoint of a run named r (or r-vN) in "
                     f"{tmp_path / 'ckpt'}; pass a .ckpt file or a run folder"]  # fmt: skip


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resumes(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [*TINY, *output_roots(tmp_path), "--epochs", "1", "--data.init_args.train_subset", "600"]
    run = ProgressWatcher(argv, data_root)
    wait_for(lambda: run.batches_done() >= (0, 3), run.process)  # 3 of the epoch's 12 batches done
    run.process.send_signal(signal.SIGINT)
    stderr = run.process.communicate(timeout=60)[1]
    process = run.process
    interrupted = tmp_path / "ckpt" / "r" / "interrupted.ckpt"
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    # one notice when the signal arrives, naming it (not Lightning's "Received SIGTERM: 2" beside it)
    assert LIGHTNING_SIGNAL_NOTICE not in stderr
    assert stderr.count("Ctrl-C: stopping at the end of this batch (Ctrl-C again to stop now)") == 1
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: interrupted by Ctrl-C at epoch 0, step ")
    assert f"saved {interrupted}" in last_line
    # the real command line (issue 17.2), not a template: it pastes as it is
    argv_seen = [*argv, "--trainer.enable_progress_bar=true"]
    assert last_line.endswith(
        "continue with "
        + shlex.join(["python", str(REPO / "train.py"), *argv_seen, "--resume", str(interrupted)])
    ), last_line
    saved = load_all_checkpoints(interrupted.parent)["interrupted.ckpt"]
    assert 3 <= saved["global_step"] < 12

    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    assert call_main(train_cli.main, [*argv, "--resume", str(interrupted)]) == 0
    final = load_all_checkpoints(interrupted.parent)
    assert final["last.ckpt"]["global_step"] == 12  # the epoch's remaining batches, not a fresh epoch
    assert "interrupted.ckpt" not in final  # superseded by last.ckpt, which continued it


# ----------------------------------------------------------------------- 3b. step checkpoints, preemption
EVERY = 4  # --ckpt-every-steps in these tests: step.ckpt at global steps 4, 8 (and 12, the run's end)
RESUMED_FROM = re.compile(r"resuming from (\S+): epoch (\d+), step (\d+)")


def newest_checkpoint(folder: Path) -> tuple[str, int]:
    """(name, global_step) of the most recently written resumable checkpoint in ``folder``."""
    names = [n for n in ("step.ckpt", "last.ckpt", "interrupted.ckpt") if (folder / n).exists()]
    name = max(names, key=lambda n: (folder / n).stat().st_mtime_ns)
    return name, load_all_checkpoints(folder)[name]["global_step"]


def scalar_curve(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` as TensorBoard shows it: every event file of ``log_dir`` in order,
    steps that a resumed run logged again replacing the stopped run's."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def saved_step(path: Path) -> int:
    """global_step of a checkpoint that another process may be replacing (atomically) right now."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.mark.parametrize(
    ("kill_when", "resume_point"),
    [
        ("right after the step checkpoint at step 4 (epoch 0)", 4),
        ("between the step checkpoints at steps 8 and 12 (epoch 1)", 8),
    ],
)
def test_sigkill_inside_an_epoch_resumes_from_the_step_checkpoint_bit_identically(
    kill_when: str,
    resume_point: int,
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    uninterrupted_run: dict,
    uninterrupted_root: Path,
) -> None:
    """SIGKILL inside an epoch, then ``--resume last``: the run continues at the step checkpoint's
    next batch (same data order, attack starts, optimizer and scheduler) and ends bit-identical to
    the uninterrupted run; only the steps since that checkpoint are computed again. Its TensorBoard
    curves continue the killed run's version (issue 26.2)."""
    run_dir = tmp_path / "ckpt" / "r"
    argv = [*TINY, *output_roots(tmp_path), "--epochs", "2", "--ckpt-every-steps", str(EVERY)]
    run = ProgressWatcher(argv, data_root)
    if resume_point == 4:
        wait_for(lambda: saved_step(run_dir / "step.ckpt") == 4, run.process)
    else:
        wait_for(lambda: run.batches_done() >= (1, 3), run.process)  # step 9 done
    run.process.send_signal(signal.SIGKILL)
    run.process.wait(timeout=30)
    epoch, batches = run.batches_done()
    done_before_kill = epoch * BATCHES_PER_EPOCH + batches
    name, step = newest_checkpoint(run_dir)
    assert (name, step) == ("step.ckpt", resume_point), (name, step, done_before_kill)
    assert 0 <= done_before_kill - step <= EVERY  # at most the steps since the last step checkpoint

    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    # TensorBoard reads a folder's event files in name order, and the name's time has whole seconds
    # (then host, then pid): a resumed file opened within the killed run's second, by this process's
    # lower pid, would be read first. A real run lives longer than a second; this tiny one may not.
    time.sleep(1.0)
    with caplog.at_level(logging.INFO, logger="qgtrain"):
        assert call_main(train_cli.main, [*argv, "--resume", "last"]) == 0
    resumed_from = RESUMED_FROM.findall(caplog.text)
    assert resumed_from == [(str(run_dir / "step.ckpt"), str(step // BATCHES_PER_EPOCH), str(step))]
    final = load_all_checkpoints(run_dir)["last.ckpt"]
    assert final["global_step"] == 2 * BATCHES_PER_EPOCH  # 12 - step steps trained after the resume
    assert_same_state(final, uninterrupted_run)
    # One TensorBoard run: the resumed run continued version_0's stream (a second event file). Its
    # curve is the uninterrupted run's, one value per step: the resumed run's steps replace what the
    # killed run logged after the checkpoint, and the steps before it were flushed with the
    # checkpoint (all but the checkpoint's own batch, which logs after the checkpoint hook).
    logs = tmp_path / "logs" / "r"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert len(list((logs / "version_0").glob("events.out.tfevents.*"))) == 2
    curve = scalar_curve(logs / "version_0", "train/loss_step")
    reference = dict(scalar_curve(uninterrupted_root / "logs" / "r" / "version_0", "train/loss_step"))
    assert sorted(reference) == list(range(2 * BATCHES_PER_EPOCH))
    assert len({s for s, _ in curve}) == len(curve) and all(reference[s] == v for s, v in curve)
    assert {*range(step - 1), *range(step, 2 * BATCHES_PER_EPOCH)} <= {s for s, _ in curve}


def test_no_signal_no_preemption_checkpoint(uninterrupted_root: Path) -> None:
    """The control of the signal tests: a run that nobody signals writes no ``interrupted.ckpt`` (and,
    under the 10-minute default, no ``step.ckpt``)."""
    assert sorted(p.name for p in (uninterrupted_root / "ckpt" / "r").iterdir()) == ["best.ckpt", "last.ckpt"]


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_sigterm_and_sigusr1_save_a_checkpoint_exit_with_128_plus_signal_and_resume(
    signal_name: str,
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    uninterrupted_run: dict,
) -> None:
    """SIGTERM (plain) and SIGUSR1 (inside a fake SLURM job, ``scontrol`` on PATH): the run stops
    at the end of the current batch, writes ``interrupted.ckpt``, prints one line with the command
    that continues it and exits with 128 + the signal number. Under SLURM the job is requeued and
    the requeued job (``SLURM_RESTART_COUNT=1``, same command, no ``--resume``) resumes by itself."""
    signum = getattr(signal, signal_name)
    env: dict[str, str] = {}
    if signal_name == "SIGUSR1":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        scontrol = bin_dir / "scontrol"
        scontrol.write_text(FAKE_SCONTROL.format(log=tmp_path / "scontrol.log"))
        scontrol.chmod(0o755)
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "qgtrain",
            "SLURM_NTASKS": "1",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
        }
    argv = [*TINY, *output_roots(tmp_path), "--epochs", "2"]
    run = ProgressWatcher(argv, data_root, env=env)
    wait_for(lambda: run.batches_done() >= (0, 2), run.process)
    run.process.send_signal(signum)
    stderr = run.process.communicate(timeout=120)[1]
    interrupted = tmp_path / "ckpt" / "r" / "interrupted.ckpt"
    assert run.process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    assert LIGHTNING_SIGNAL_NOTICE not in stderr  # it would call SIGUSR1 "SIGTERM: 10"
    assert stderr.count(f"{signal_name}: stopping at the end of this batch") == 1
    line = stderr.strip().splitlines()[-1]
    saved = load_all_checkpoints(interrupted.parent)["interrupted.ckpt"]
    step = saved["global_step"]
    assert line.startswith(
        f"train.py: interrupted by {signal_name} at epoch 0, step {step}; saved {interrupted}"
    )
    assert 2 <= step < 2 * BATCHES_PER_EPOCH

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    if signal_name == "SIGUSR1":
        assert "SLURM job requeued" in line
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        resume_argv = argv  # the requeued job runs the same command
    else:
        command = shlex.split(line.split("; continue with ", 1)[1])  # pasteable (issue 17.2)
        assert command[:2] == ["python", str(REPO / "train.py")]
        resume_argv = command[2:]
    with caplog.at_level(logging.INFO, logger="qgtrain"):
        assert call_main(train_cli.main, resume_argv) == 0
    assert RESUMED_FROM.findall(caplog.text) == [(str(interrupted), "0", str(step))]
    final = load_all_checkpoints(interrupted.parent)
    assert_same_state(final["last.ckpt"], uninterrupted_run)
    assert "interrupted.ckpt" not in final  # superseded once the resumed run wrote last.ckpt


# ----------------------------------------------------------------------- 3c. --resume (issue 17.3, 17.5)
def _touch_checkpoint(path: Path, age_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_resume_last_is_the_newest_checkpoint_of_the_newest_run(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _touch_checkpoint(root / "run" / "last.ckpt", 300)
    _touch_checkpoint(root / "run-v1" / "last.ckpt", 200)
    _touch_checkpoint(root / "run-v1" / "step.ckpt", 100)  # newer than last.ckpt: the resume point
    _touch_checkpoint(root / "run-v1" / "best.ckpt", 0)  # not a resume point
    (root / "run-v2").mkdir()  # a run that wrote nothing
    _touch_checkpoint(root / "other-v3" / "last.ckpt", 0)  # another name
    assert resume.resolve_resume("last", root, "run") == root / "run-v1" / "step.ckpt"
    _touch_checkpoint(root / "run-v1" / "interrupted.ckpt", 50)
    assert resume.resolve_resume("last", root, "run") == root / "run-v1" / "interrupted.ckpt"
    # a run folder holding only interrupted.ckpt or only step.ckpt (Ctrl-C or a kill in epoch 0)
    _touch_checkpoint(root / "a" / "interrupted.ckpt", 0)
    _touch_checkpoint(root / "b" / "step.ckpt", 0)
    assert resume.resolve_resume(str(root / "a"), root, "x") == root / "a" / "interrupted.ckpt"
    assert resume.resolve_resume(str(root / "b"), root, "x") == root / "b" / "step.ckpt"
    with pytest.raises(resume.ResumeError, match="no checkpoint"):
        resume.resolve_resume(str(root / "run-v2"), root, "run")


def test_resume_a_finished_run_says_so_and_writes_nothing(
    uninterrupted_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    before = sorted(p.relative_to(uninterrupted_root) for p in uninterrupted_root.rglob("*"))
    argv = [*TINY, *output_roots(uninterrupted_root), "--epochs", "2", "--resume", "last"]
    assert call_main(train_cli.main, argv) == 2
    last = uninterrupted_root / "ckpt" / "r" / "last.ckpt"
    assert error_lines(capsys.readouterr().err) == [
        f"train.py: error: --resume: the run in {last.parent} is finished (2 of 2 epochs in last.ckpt); "
        "to train longer resume with --epochs N (N > 2)"
    ]
    assert sorted(p.relative_to(uninterrupted_root) for p in uninterrupted_root.rglob("*")) == before


def test_resume_with_another_architecture_is_one_line(
    uninterrupted_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    last = uninterrupted_root / "ckpt" / "r" / "last.ckpt"
    argv = [*TINY, *output_roots(uninterrupted_root), "--epochs", "3", "--resume", str(last)]
    assert call_main(train_cli.main, [*argv, "--net", "madry_mnist"]) == 2
    stderr = capsys.readouterr().err
    assert error_lines(stderr) == [
        f"train.py: error: --resume: {last} holds a tiny_cnn(dataset=mnist, width=16) network, this run "
        "builds madry_mnist(dataset=mnist); pass the checkpoint's --model / --config"
    ]
    assert "Traceback" not in stderr
    with pytest.raises(AssertionError, match="training started"):  # the control: same network, accepted
        train_cli.main(argv)


def _write_checkpoint(path: Path, global_step: int, epochs_done: int, age_s: float) -> None:
    """A small checkpoint with Lightning's progress counters, written ``age_s`` seconds ago."""
    progress = {"current": {"processed": epochs_done, "completed": epochs_done}}
    checkpoint = {
        "global_step": global_step,
        "epoch": epochs_done,
        "loops": {"fit_loop": {"epoch_progress": progress}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("interrupted_is_newer_on_disk", [False, True])
def test_resume_last_never_picks_a_superseded_interrupted_checkpoint(
    tmp_path: Path, interrupted_is_newer_on_disk: bool
) -> None:
    """A stale interrupted.ckpt (step 3) beside the last.ckpt of the run that continued it (step 12):
    ``--resume last`` and the run folder give last.ckpt in both orders of the files' times (a copied
    folder gets new ones). The control: an interrupted.ckpt further along (step 15) is picked."""
    run = tmp_path / "ckpt" / "r"
    _write_checkpoint(run / "interrupted.ckpt", 3, 0, 0 if interrupted_is_newer_on_disk else 100)
    _write_checkpoint(run / "last.ckpt", 12, 2, 50)
    assert resume.resolve_resume("last", run.parent, "r") == run / "last.ckpt"
    assert resume.resolve_resume(str(run), run.parent, "r") == run / "last.ckpt"
    _write_checkpoint(run / "interrupted.ckpt", 15, 2, 100)  # interrupted in epoch 2, older on disk
    assert resume.resolve_resume("last", run.parent, "r") == run / "interrupted.ckpt"
    # same step: last.ckpt (epoch done) beats the step checkpoint of the epoch's last batch, by epochs
    _write_checkpoint(run / "step.ckpt", 15, 2, 0)
    _write_checkpoint(run / "last.ckpt", 15, 3, 200)
    assert resume.resolve_resume("last", run.parent, "r") == run / "last.ckpt"


def test_interrupted_checkpoint_is_removed_only_once_a_checkpoint_continuing_it_is_written(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    interrupted, last = folder / "interrupted.ckpt", folder / "last.ckpt"
    _write_checkpoint(interrupted, 3, 0, 0)
    _write_checkpoint(last, 12, 2, 0)

    def trainer(ckpt_path: Path | None, rank_zero: bool = True) -> object:
        return type("T", (), {"ckpt_path": ckpt_path, "is_global_zero": rank_zero, "global_step": 12})()

    # controls: a run that started elsewhere (or fresh), and a non-zero rank, leave it alone
    for other in (trainer(folder / "step.ckpt"), trainer(None), trainer(interrupted, rank_zero=False)):
        resume.remove_superseded_interrupt(other, folder, last)
        assert interrupted.is_file()
    resume.remove_superseded_interrupt(trainer(interrupted), folder, interrupted)  # writing it again
    assert interrupted.is_file()
    resume.remove_superseded_interrupt(trainer(interrupted), folder, last)  # the run that continued it
    assert not interrupted.exists() and last.is_file()


def test_a_resumed_run_logs_into_its_tensorboard_version(tmp_path: Path) -> None:
    logs = tmp_path / "logs" / "r"
    # a step checkpoint after 8 batches (the 8th processed, not completed) and a last.ckpt after 6
    step_ckpt = {"loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 7},
                 "epoch_loop.batch_progress": {"total": {"processed": 8, "completed": 7}}}}}  # fmt: skip
    last_ckpt = {"loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 6},
                 "epoch_loop.batch_progress": {"total": {"processed": 6, "completed": 6}}}}}  # fmt: skip
    assert resume.log_continuation(logs, step_ckpt) == {}  # no log folder yet: a new version
    for name in ("version_0", "version_2", "version_10", "other", "version_x"):
        (logs / name).mkdir(parents=True)
    assert resume.log_continuation(logs, step_ckpt) == {"version": 10, "purge_step": 8}
    assert resume.log_continuation(logs, last_ckpt) == {"version": 10, "purge_step": 6}
    assert resume.log_continuation(logs, None) == {}  # a new run: Lightning's next version


class ProgressBarSeen(L.Callback):
    """The progress bar's label, position and total before each training batch (after the bar's
    own hooks and :class:`~qgtrain.checkpoints.RestoreLoaderState` have run)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int | None]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.desc.rstrip(": "), bar.n, bar.total))


@pytest.mark.parametrize(
    ("checkpoint", "kill_after", "resumes_at"),
    [("step.ckpt", 3, (0, 2)), ("last.ckpt", 5, (1, 4))],
    ids=["inside epoch 0", "after epoch 0"],
)
def test_a_resumed_epoch_shows_its_progress_bar_total_and_its_number(
    data_root: Path, tmp_path: Path, checkpoint: str, kill_after: int, resumes_at: tuple[int, int]
) -> None:
    """4 batches per epoch. Killed inside epoch 0 (step.ckpt at step 2) or in epoch 1 (last.ckpt at
    the end of epoch 0), the resumed run's bar reads ``Epoch 0: 2/4`` / ``Epoch 1: 0/4``, not
    ``2/?``, and :func:`resume.resumes_at` names the same epoch (numbered from 0, as the bar)."""
    folder = tmp_path / "ckpt"
    build = lambda: AdversarialTraining(TinyCNN(width=4), build_attack("pgd", eps=0.3, steps=1))  # noqa: E731
    killed = quiet_trainer(
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
        callbacks=[StepCheckpoint(folder, every_n_steps=2), LastCheckpoint(folder), KillAfterBatches(kill_after)],
    )  # fmt: skip
    with pytest.raises(KilledError):
        killed.fit(build(), datamodule=small_mnist_datamodule(data_root))
    saved = torch.load(folder / checkpoint, map_location="cpu", weights_only=True)
    assert resume.resumes_at(saved) == resumes_at
    seen = ProgressBarSeen()
    resumed = quiet_trainer(
        max_epochs=2, limit_val_batches=0, enable_progress_bar=True,
        callbacks=[RestoreLoaderState(), seen, TQDMProgressBar()],
    )  # fmt: skip
    resumed.fit(build(), datamodule=small_mnist_datamodule(data_root), ckpt_path=str(folder / checkpoint))
    epoch, step = resumes_at
    assert seen.seen[0][0] == f"Epoch {epoch}"
    # before each remaining batch g of the run: its epoch, the batches done in it, the epoch's total
    assert seen.seen == [(f"Epoch {g // 4}", g % 4, 4) for g in range(step, 8)]


# ----------------------------------------------------------------------- 3d. DDP
DDP_ARGS = [
    "--config", str(REPO / "configs" / "mnist_fast.yaml"), "--model.net.init_args.width", "4", "--inner", "pgd", "--steps", "2",
    "--run-name", "ddp", "--epochs", "2", "--devices", "2", "--strategy", "ddp",
    "--trainer.accelerator", "cpu", "--data.init_args.train_subset", "400",
    "--data.init_args.val_size", "100", "--data.init_args.batch_size", "50",
    "--data.init_args.eval_batch_size", "100", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--robustness.every_n_epochs", "0", "--visualization.every_n_epochs", "0",
]  # fmt: skip
DDP_STEPS_PER_EPOCH = 4  # 400 examples / (2 processes x 50)


@pytest.mark.slow
def test_ddp_two_processes_resume_mid_epoch_bit_identically(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 2-process gloo run writes step.ckpt every 3 steps; the last one (step 6) is inside epoch 1.
    Resumed from it with 2 processes, the run ends with the uninterrupted run's weights, optimizer
    and scheduler: both ranks continued at the same step with their own shard of the same order.
    Resuming it with 1 process is refused."""
    first = train_subprocess([*DDP_ARGS, *output_roots(tmp_path), "--ckpt-every-steps", "3"], data_root)
    stderr = first.communicate(timeout=300)[1]
    assert first.returncode == 0, stderr[-3000:]
    reference = load_all_checkpoints(tmp_path / "ckpt" / "ddp")
    step_ckpt = reference["step.ckpt"]
    assert step_ckpt["global_step"] == 6 and step_ckpt["epoch"] == 1  # mid-epoch: 2 of epoch 1's 4 steps
    assert step_ckpt["qgtrain"]["world_size"] == 2

    resumed_dir = tmp_path / "ckpt" / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "step.ckpt").write_bytes((tmp_path / "ckpt" / "ddp" / "step.ckpt").read_bytes())
    argv = [*DDP_ARGS, *output_roots(tmp_path), "--run-name", "resumed", "--resume", str(resumed_dir)]
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    assert call_main(train_cli.main, [*argv, "--devices", "1", "--strategy", "auto"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"train.py: error: --resume: {resumed_dir / 'step.ckpt'} was written by 2 training process(es), "
        "this run has 1; resume with the same --devices and --num-nodes"
    ]
    second = train_subprocess(argv, data_root)
    stderr = second.communicate(timeout=300)[1]
    assert second.returncode == 0, stderr[-3000:]
    assert RESUMED_FROM.findall(stderr) == [(str(resumed_dir / "step.ckpt"), "1", "6")] * 2  # each rank
    final = load_all_checkpoints(resumed_dir)["last.ckpt"]
    assert final["global_step"] == 2 * DDP_STEPS_PER_EPOCH
    assert_same_state(final, reference["last.ckpt"])


# ======================================================================= 4. disk
def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return result.returncode == 0


def _simulate(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Where tmpfs cannot be mounted: make the probe write in check_writable fail with ``code``."""

    def failing_open(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_files, "open", failing_open, raising=False)


@pytest.mark.parametrize("case", ["full", "read-only", "not a folder"])
def test_unwritable_output_is_an_error_at_start(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    mounted = False
    if case == "not a folder":
        out.write_text("a file where the output folder should be")
        expected = "Not a directory"
    else:
        options, code = ("size=16k", errno.ENOSPC) if case == "full" else ("ro,size=1m", errno.EROFS)
        mounted = _mount_tmpfs(out, options)
        if not mounted:
            _simulate(monkeypatch, code)
        expected = os.strerror(code)

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the output folder was checked")

    monkeypatch.setattr(VisionDataModule, "prepare_data", no_data)
    monkeypatch.setattr(VisionDataModule, "setup", no_data)
    try:
        argv = [*TINY, "--checkpoint_root", str(out / "ckpt"), "--log_root", str(tmp_path / "logs")]
        code = call_main(train_cli.main, argv)
        listing = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot write the checkpoint folder {out / 'ckpt' / 'r'}" in lines[0] and expected in lines[0]
    assert listing in (None, [])  # nothing left behind on the full/read-only filesystem
    assert not (tmp_path / "logs").exists()


# ======================================================================= 5. the environment, sizes, limits (issue 35)
ONE_STEP = [*ONE_STEP_ARGS, "--run-name", "r"]


def test_a_full_disk_while_writing_last_ckpt_is_one_line_and_keeps_the_earlier_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """ENOSPC (simulated: the atomic writer's fsync fails for last.ckpt) in the second epoch: one
    line naming the file, the cause and the last good checkpoint, status 1, no traceback; the
    first epoch's last.ckpt is intact. The control: the same run without the fault exits 0."""
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    argv = [*ONE_STEP, *output_roots(tmp_path)]
    assert call_main(train_cli.main, [*argv, "--epochs", "1"]) == 0  # the control
    last = tmp_path / "ckpt" / "r" / "last.ckpt"
    fsync = os.fsync

    def full_disk(fd: int) -> None:
        if Path(f"/proc/self/fd/{fd}").resolve().name.startswith(".last.ckpt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert call_main(train_cli.main, [*argv, "--epochs", "2", "--resume", "last"]) == 1
    stderr = capsys.readouterr().err
    assert error_lines(stderr) == [
        f"train.py: error: {last}: No space left on device; free space on that disk or write elsewhere; "
        f"the last good checkpoint is {last}"
    ]
    assert "Traceback" not in stderr
    assert torch.load(last, weights_only=True)["global_step"] == 1


def test_an_unreadable_data_file_is_the_users_to_fix_not_a_bug(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Tests run as root, where ``chmod 000`` denies nothing: reading the training images raises
    PermissionError as it would for another user. One line naming the file and the cause, status 1,
    no bug report, not "corrupt". The control: a content fault in the same place is still reported
    as a corrupt file."""
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    read_bytes = Path.read_bytes
    fault: list[BaseException] = [PermissionError(errno.EACCES, "Permission denied")]

    def denied(self: Path) -> bytes:
        if self.name == "train-images-idx3-ubyte":
            exc = fault[0]
            if isinstance(exc, OSError):
                raise type(exc)(exc.errno, exc.strerror, str(self))
            raise exc
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    argv = [*ONE_STEP, *output_roots(tmp_path), "--epochs", "1"]
    assert call_main(train_cli.main, argv) == 1
    stderr = capsys.readouterr().err
    lines = error_lines(stderr)
    assert len(lines) == 1 and "train-images-idx3-ubyte: Permission denied; check its permissions" in lines[0]
    assert "Traceback" not in stderr and "bug" not in stderr and "corrupt" not in stderr
    fault[0] = IndexError("garbage")  # the control: the file's content, not the machine
    assert call_main(train_cli.main, argv) == 1
    assert "the files are truncated or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "reason"),
    [("trainer: [max_epochs: 1\n", "not valid YAML (line 2)"), ("", "the file is empty"),
     ("- a\n- b\n", "the file is a list, not a mapping")],
    ids=["malformed", "empty", "a list"],
)  # fmt: skip
def test_a_bad_config_file_is_one_line_naming_it(
    content: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    config = tmp_path / "my.yaml"
    config.write_text(content)
    argv = [*ONE_STEP, *output_roots(tmp_path), "--config", str(config)]
    assert call_main(train_cli.main, argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --config {config}: {reason}"), lines
    config.write_text("trainer:\n  max_epochs: 1\n")  # the control: a good file is read
    with pytest.raises(AssertionError, match="training started"):
        train_cli.main(argv)


CLASSES = ["--data", "qgtrain.data.MNISTDataModule", "--model.net", "qgtrain.models.TinyCNN"]


@pytest.mark.parametrize("key", train_cli.BATCH_LIMITS)
def test_whole_number_trainer_limits_mean_batches(key: str) -> None:
    """As Lightning documents: ``1`` is one batch (an int), ``1.0`` the whole set (a float; the
    control: the check tells the two apart by type). jsonargparse's own reading of Lightning's
    ``int | float`` depends on which order ``typing`` cached first (``1.0`` in train.py)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    train_cli.QGTrainCLI.add_core_arguments_to_parser(
        type("CLI", (), {"trainer_class": Trainer, "trainer_defaults": {}, "model_class": AdversarialTraining,
                         "subclass_mode_model": False, "datamodule_class": VisionDataModule,
                         "subclass_mode_data": True})(),
        parser,
    )  # fmt: skip
    for typed, expected in (("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25)):
        value = parser.parse_args([f"--trainer.{key}", typed, *CLASSES])
        assert repr(value.trainer[key]) == repr(expected), (key, typed)


def test_attack_sizes_have_bounds_with_an_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from qgtrain.attacks import PGD

    with pytest.raises(ValueError, match=r"steps must be <= 100000 \(set QGTRAIN_MAX_STEPS to allow more\)"):
        PGD(steps=1_000_000_000)
    with pytest.raises(ValueError, match=r"restarts must be <= 1000 \(set QGTRAIN_MAX_RESTARTS"):
        PGD(restarts=10**6)
    assert PGD(steps=100_000).steps == 100_000  # the control: at the bound
    monkeypatch.setenv("QGTRAIN_MAX_STEPS", str(10**9))
    assert PGD(steps=10**9).steps == 10**9


def test_a_stop_request_interrupts_an_attack_between_iterations() -> None:
    """A signal's stop request (after its grace period) ends an attack at its next iteration, so a
    huge step count cannot hold a run past a SIGTERM; without one (the control) it runs to the end."""
    from qgtrain.attacks import PGD
    from qgtrain.attacks.limits import AttackInterrupted, clear_stop, request_stop

    x, y = load_mnist_tensors(4)
    net, attack = TinyCNN(width=4), PGD(eps=0.1, steps=50_000)
    request_stop(0.2)
    start = time.monotonic()
    try:
        with pytest.raises(AttackInterrupted):
            attack(net, x, y)
    finally:
        clear_stop()
    assert time.monotonic() - start < 10
    assert PGD(eps=0.1, steps=3)(net, x, y).shape == x.shape  # the control: no request, no stop
