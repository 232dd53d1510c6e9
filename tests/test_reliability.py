"""Issue 8, failure paths: bad arguments, bad data, numerical faults, kill -9 / Ctrl-C, untrusted
checkpoints, unwritable output folders. One test (or parametrized family) per item; see
docs/RELIABILITY.md. Training runs use a tiny CNN on a few hundred real MNIST images."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, load_mnist_tensors, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qgtrain.cli.train as train_cli
from qgtrain.attacks import ATTACKS, build_attack
from qgtrain.data import DataError, MNISTDataModule, VisionDataModule
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining
from qgtrain.training.checkpoint_io import AtomicCheckpointIO, CheckpointError
from qgtrain.training.module import looks_like_probabilities

# Six batches of 50 per epoch, 2-step PGD, one validation batch, no robustness/visualization callbacks.
TINY = [
    "--model", "tiny_cnn", "--inner", "pgd", "--steps", "2", "--run-name", "r",
    "--data.init_args.train_subset", "300", "--data.init_args.val_size", "100",
    "--data.init_args.batch_size", "50", "--data.init_args.eval_batch_size", "100",
    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--robustness.every_n_epochs", "0", "--visualization.every_n_epochs", "0",
]  # fmt: skip
BATCHES_PER_EPOCH = 6
# For argument checks: no short flag that would override the dotted keys under test (short flags are
# applied last), and a tiny run in case a check let a bad value through.
ARGS_BASE = [
    "--model", "tiny_cnn", "--data.init_args.train_subset=100", "--data.init_args.val_size=100",
    "--trainer.max_steps=1", "--robustness.every_n_epochs=0", "--visualization.every_n_epochs=0",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread here and in the subprocesses: several times faster on a shared 2-core
    machine, and in-process and subprocess runs then reduce floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def roots(tmp_path: Path) -> list[str]:
    return ["--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs")]


def call_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Exit status of an in-process ``main(argv)`` (argparse-style errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def error_lines(stderr: str, prog: str = "train.py") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]


def train_subprocess(argv: list[str], data_root: Path, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "QGTRAIN_DATA": str(data_root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


class ProgressWatcher:
    """Follows the progress bar of a ``train.py`` process (tqdm on stdout) from a reader thread."""

    PATTERN = re.compile(r"Epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/\d+")

    def __init__(self, argv: list[str], data_root: Path) -> None:
        self.process = train_subprocess(
            [*argv, "--trainer.enable_progress_bar=true"], data_root, stdout=subprocess.PIPE
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


# ======================================================================= 1. bad arguments
def no_training(*args, **kwargs):
    raise AssertionError("training started")


BAD_TRAIN_ARGS = [
    (["--eps", "-0.1"], "--eps", "(0, 1]"),
    (["--eps", "0"], "--eps", "(0, 1]"),
    (["--eps", "1.5"], "--eps", "(0, 1]"),
    (["--steps", "0"], "--steps", ">= 1"),
    (["--b", "0"], "--b", ">= 1"),
    (["--b", "2.5"], "--b", "<class 'int'>"),
    (["--alpha", "0"], "--alpha", "> 0"),
    (["--alpha", "-1"], "--alpha", "> 0"),
    (["--inner", "cw"], "--inner", "pqgd"),
    (["--model", "vgg16"], "--model", "tiny_cnn"),
    (["--dataset", "svhn"], "--dataset", "cifar10"),
    (["--devices", "999"], "--devices 999", "available"),
    (["--devices", "two"], "--devices", "'auto'"),
    # values from YAML / dotted keys reach the classes' own checks: one line, the class's message
    (["--model.inner.init_args.eps=-1"], "eps", "(0, 1]"),
    (["--model.inner.init_args.steps=0"], "steps", ">= 1"),
    (["--model.inner.init_args.b=0"], "b must", ">= 1"),
    (["--data.init_args.batch_size=0"], "batch_size", ">= 1"),
]


@pytest.mark.parametrize(("argv", "names", "allowed"), BAD_TRAIN_ARGS, ids=lambda v: str(v))
def test_train_bad_arguments_one_line_exit_2_nothing_written(
    argv: list[str],
    names: str,
    allowed: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    assert call_main(train_cli.main, [*ARGS_BASE, *roots(tmp_path), *argv]) == 2
    stderr = capsys.readouterr().err
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), stderr
    assert names in lines[0] and allowed in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no logs/, checkpoints/ or probe files


def test_train_gpu_request_without_gpu_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Lightning parses accelerator and devices; its refusals come out as one line naming both."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*ARGS_BASE, *roots(tmp_path), "--trainer.accelerator=gpu"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "train.py: error: --trainer.accelerator gpu --devices auto: No supported gpu backend found!; "
        "'auto' picks what this machine has"
    ]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # 2 GPUs: 3 is too many, 2 is fine
    monkeypatch.setattr(train_cli.QGTrainCLI, "check_before_fit", lambda self: None)
    gpu = [*ARGS_BASE, *roots(tmp_path), "--trainer.accelerator=gpu", "--devices"]
    assert call_main(train_cli.main, [*gpu, "3"]) == 2
    assert (
        "--devices 3: You requested gpu: [0, 1, 2] But your machine only has: [0, 1]"
        in capsys.readouterr().err
    )
    for fine in ("2", "0,1"):
        with pytest.raises(AssertionError, match="training started"):
            train_cli.main([*gpu, fine])
    assert call_main(train_cli.main, [*gpu, "0,2"]) == 2
    assert error_lines(capsys.readouterr().err)[-1].endswith(
        "only has: [0, 1]; 'auto' picks what this machine has"
    )


def test_train_parser_errors_name_the_key_and_choices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Errors raised by jsonargparse itself print its usage, then the key and the allowed values."""
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*ARGS_BASE, *roots(tmp_path), "--model.objective=minimax"]) == 2
    stderr = capsys.readouterr().err
    assert 'Parser key "model.objective"' in stderr and "'madry', 'mixed'" in stderr
    assert "Traceback" not in stderr and list(tmp_path.iterdir()) == []


def test_train_bad_argument_in_a_real_process(data_root: Path, tmp_path: Path) -> None:
    process = train_subprocess([*TINY, *roots(tmp_path), "--eps", "0"], data_root)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        "train.py: error: --eps must be in (0, 1] for inputs in [0, 1], got 0.0"
    ]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def _evaluate_main() -> Callable[[list[str]], int]:
    evaluate = pytest.importorskip("qgtrain.cli.evaluate", reason="evaluate.py not written yet")
    return evaluate.main


BAD_EVALUATE_ARGS = [
    (["--eps", "-0.1"], "--eps", "(0, 1]"),
    (["--eps", "0"], "--eps", "(0, 1]"),
    (["--eps", "2"], "--eps", "(0, 1]"),
    (["--steps", "0"], "--steps", ">= 1"),
    (["--b", "0"], "--b", ">= 1"),
    (["--b", "1.5"], "--b", ">= 1"),
    (["--alpha", "0"], "--alpha", "> 0"),
    (["--attacks", "cw"], "--attacks", "pqgd"),
    (["--model", "vgg16"], "--model", "tiny_cnn"),
    (["--dataset", "svhn"], "--dataset", "cifar10"),
]


@pytest.mark.parametrize(("argv", "names", "allowed"), BAD_EVALUATE_ARGS, ids=lambda v: str(v))
def test_evaluate_bad_arguments_one_line_exit_2_nothing_written(
    argv: list[str],
    names: str,
    allowed: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    main = _evaluate_main()
    monkeypatch.chdir(tmp_path)
    code = call_main(main, ["--ckpt", str(tmp_path / "model.ckpt"), "--out-dir", "results", *argv])
    stderr = capsys.readouterr().err
    lines = error_lines(stderr, "evaluate.py")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), stderr
    assert names in lines[0] and allowed in lines[0], lines[0]
    assert "Traceback" not in stderr and list(tmp_path.iterdir()) == []


def test_evaluate_device_beyond_what_is_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    main = _evaluate_main()
    monkeypatch.chdir(tmp_path)
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (or any GPU on a CPU box)
    assert call_main(main, ["--ckpt", "model.ckpt", "--device", device]) == 2
    lines = error_lines(capsys.readouterr().err, "evaluate.py")
    assert len(lines) == 1 and "--device" in lines[0] and list(tmp_path.iterdir()) == []


# ======================================================================= 2. bad data
def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format: magic 0x0000080<ndim>, big-endian uint32 dims, uint8 data."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def fake_mnist(root: Path, n_train: int = 60, size: int = 28, labels: np.ndarray | None = None) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, size, size)))
        y = labels if labels is not None and prefix == "train" else rng.integers(0, 10, n)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return raw


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] = 0x99
    path.write_bytes(bytes(data))


BAD_DATA = {
    "missing root": (lambda raw: None, "missing train-images-idx3-ubyte"),
    "truncated images": (
        lambda raw: _truncate(raw / "train-images-idx3-ubyte", 1000),
        "train-images-idx3-ubyte is truncated or corrupt: its header says 60x28x28 = 47040 bytes",
    ),
    "truncated labels": (
        lambda raw: _truncate(raw / "train-labels-idx1-ubyte", 30),
        "train-labels-idx1-ubyte is truncated or corrupt",
    ),
    "corrupt header": (
        lambda raw: _corrupt_magic(raw / "train-labels-idx1-ubyte"),
        "train-labels-idx1-ubyte is not a uint8 IDX file",
    ),
    "empty file": (
        lambda raw: (raw / "t10k-images-idx3-ubyte").write_bytes(b""),
        "t10k-images-idx3-ubyte is not a uint8 IDX file",
    ),
    "wrong image shape": ("size=32", "images have shape (1, 32, 32), expected (1, 28, 28)"),
    "one class": ("one_class", "every label is 3; a classifier cannot be trained on one class"),
    "labels out of range": ("labels_12", "labels outside [0, 10) (found 0..11)"),
    "count mismatch": (
        lambda raw: write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10),
        "60 images but 50 labels",
    ),
}


def make_bad_data(tmp_path: Path, case: str) -> Path:
    action, _ = BAD_DATA[case]
    root = tmp_path / "data"
    if case == "missing root":
        return root
    kwargs = {
        "size=32": {"size": 32},
        "one_class": {"labels": np.full(60, 3)},
        "labels_12": {"labels": np.arange(60) % 12},
    }.get(action if isinstance(action, str) else "", {})
    raw = fake_mnist(root, **kwargs)
    if callable(action):
        action(raw)
    return root


def test_fake_mnist_is_read_correctly(tmp_path: Path) -> None:
    """The control: the generated files themselves load, so each failure below is the defect's."""
    fake_mnist(tmp_path)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10, download=False)
    dm.prepare_data()
    dm.setup(None)
    assert len(dm.train_set) == 50 and len(dm.test_set) == 20
    assert dm.train_set.images.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_one_line_error_naming_the_file_or_problem(case: str, tmp_path: Path) -> None:
    root = make_bad_data(tmp_path, case)
    dm = MNISTDataModule(data_dir=str(root), val_size=10, download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
        dm.setup(None)
    message = str(info.value)
    assert "\n" not in message and BAD_DATA[case][1] in message, message


@pytest.mark.parametrize("case", ["missing root", "truncated images", "one class"])
def test_bad_data_stops_train_before_any_training_step(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = make_bad_data(tmp_path, case)

    monkeypatch.setattr(AdversarialTraining, "training_step", no_training)
    argv = [*TINY, *roots(tmp_path), "--data-dir", str(root), "--data.init_args.download=false"]
    assert call_main(train_cli.main, [*argv, "--data.init_args.val_size=10"]) == 1
    stderr = capsys.readouterr().err
    lines = error_lines(stderr)
    assert len(lines) == 1 and BAD_DATA[case][1] in lines[0], stderr
    assert "Traceback" not in stderr and not list(tmp_path.rglob("*.ckpt"))


# ======================================================================= 3. numerical faults
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
    assert call_main(train_cli.main, [*TINY, *roots(tmp_path), "--epochs", "2"]) == 1
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


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_survive_all_zero_gradients(name: str) -> None:
    x, y = load_mnist_tensors(16)
    model = ConstantLogits()
    for random_start in (True, False):
        attack = build_attack(name, eps=0.1, alpha=0.02, steps=3, b=4, random_start=random_start)
        directions: list[torch.Tensor] = []
        result = attack.perturb(
            model, x, y, observer=lambda s, loss, g, d, seen=directions: seen.append(d.clone())
        )
        assert len(directions) == 3 and all(torch.isfinite(d).all() for d in directions)
        x_adv = result.x_adv
        assert torch.isfinite(x_adv).all()
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
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


class SoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def test_probability_outputs_are_warned_about_and_logits_are_not() -> None:
    assert looks_like_probabilities(torch.randn(8, 10).softmax(1))
    assert not looks_like_probabilities(torch.randn(8, 10))
    assert not looks_like_probabilities(torch.randn(8, 10).log_softmax(1))  # fine for cross-entropy
    assert not looks_like_probabilities(torch.rand(8, 10) / 10)  # in [0, 1] but rows do not sum to 1
    torch.manual_seed(0)
    warned = [m for m in _fit_one_step(SoftmaxNet()) if "look like probabilities" in m]
    assert len(warned) == 1 and "remove the final softmax" in warned[0]
    assert not [m for m in _fit_one_step(TinyCNN(width=4)) if "probabilities" in m]


# ======================================================================= 4. interruption
ATOMIC_WRITER = r"""
import json, os, shutil, signal, sys, time
import torch
from pathlib import Path
from qgtrain.training.checkpoint_io import atomic_torch_save

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
def uninterrupted_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> dict:
    """The reference: 2 epochs in one go (in-process), its final last.ckpt."""
    tmp = tmp_path_factory.mktemp("reference")
    old = os.environ.get("QGTRAIN_DATA")
    os.environ["QGTRAIN_DATA"] = str(data_root)
    try:
        assert call_main(train_cli.main, [*TINY, *roots(tmp), "--epochs", "2"]) == 0
    finally:
        if old is None:
            os.environ.pop("QGTRAIN_DATA")
        else:
            os.environ["QGTRAIN_DATA"] = old
    return load_all_checkpoints(tmp / "ckpt" / "r")["last.ckpt"]


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted_run(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted_run: dict
) -> None:
    run_dir = tmp_path / "ckpt" / "r"
    process = train_subprocess([*TINY, *roots(tmp_path), "--epochs", "2"], data_root)
    wait_for(lambda: (run_dir / "last.ckpt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    checkpoints = load_all_checkpoints(run_dir)
    assert checkpoints["last.ckpt"]["global_step"] == BATCHES_PER_EPOCH  # killed in epoch 1
    assert checkpoints["last.ckpt"]["epoch"] == 0

    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    assert call_main(train_cli.main, [*TINY, *roots(tmp_path), "--epochs", "2", "--resume", "last"]) == 0
    resumed = load_all_checkpoints(run_dir)["last.ckpt"]
    assert resumed["global_step"] == 2 * BATCHES_PER_EPOCH
    assert_same_state(resumed, uninterrupted_run)


def test_sigkill_mid_first_epoch_leaves_nothing_broken(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Killed after 3 of the first epoch's 6 batches, before any checkpoint: no file is left
    half-written, and ``--resume last`` says cleanly that there is nothing to resume."""
    run = ProgressWatcher([*TINY, *roots(tmp_path), "--epochs", "2"], data_root)
    wait_for(lambda: run.batches_done() >= (0, 3), run.process)
    run.process.send_signal(signal.SIGKILL)
    run.process.wait(timeout=30)
    assert run.batches_done()[0] == 0 and run.batches_done()[1] < BATCHES_PER_EPOCH
    run_dir = tmp_path / "ckpt" / "r"
    assert not run_dir.exists() or not list(run_dir.glob("*.ckpt"))
    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*TINY, *roots(tmp_path), "--resume", "last"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"train.py: error: --resume: no checkpoint at {run_dir / 'last.ckpt'}; "
                     "pass a .ckpt file, a run folder, or 'last'"]  # fmt: skip


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resumes(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [*TINY, *roots(tmp_path), "--epochs", "1", "--data.init_args.train_subset", "600"]
    run = ProgressWatcher(argv, data_root)
    wait_for(lambda: run.batches_done() >= (0, 3), run.process)  # 3 of the epoch's 12 batches done
    run.process.send_signal(signal.SIGINT)
    stderr = run.process.communicate(timeout=60)[1]
    process = run.process
    interrupted = tmp_path / "ckpt" / "r" / "interrupted.ckpt"
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: interrupted at epoch 0, step ")
    assert f"saved {interrupted}" in last_line and f"--resume {interrupted}" in last_line
    saved = load_all_checkpoints(interrupted.parent)["interrupted.ckpt"]
    assert 3 <= saved["global_step"] < 12

    monkeypatch.setenv("QGTRAIN_DATA", str(data_root))
    assert call_main(train_cli.main, [*argv, "--resume", str(interrupted)]) == 0
    final = load_all_checkpoints(interrupted.parent)["last.ckpt"]
    assert final["global_step"] == 12  # the epoch's remaining batches, not a fresh epoch


# ======================================================================= 5. untrusted checkpoints
class CodeRunner:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoints(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "code-ran"
    files = {"torch.save": tmp_path / "evil_zip.ckpt", "pickle": tmp_path / "evil_pickle.ckpt"}
    torch.save({"state_dict": {}, "payload": CodeRunner(marker)}, files["torch.save"])
    with open(files["pickle"], "wb") as handle:
        pickle.dump({"state_dict": CodeRunner(marker)}, handle)
    return files


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_crafted_checkpoint_is_refused_and_runs_no_code(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    evil = crafted_checkpoints(tmp_path)[kind]
    marker = tmp_path / "code-ran"
    # Control: an unsafe load of this file does run the code.
    with open(evil, "rb") as handle:
        torch.load(handle, weights_only=False) if kind == "torch.save" else pickle.load(handle)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(evil)
    monkeypatch.chdir(tmp_path)
    assert call_main(train_cli.main, [*TINY, *roots(tmp_path), "--resume", str(evil)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"--resume: refusing to load {evil}" in lines[0]
    assert not (tmp_path / "ckpt").exists()

    try:
        main = _evaluate_main()
    except pytest.skip.Exception:
        main = None
    if main is not None:
        assert call_main(main, ["--ckpt", str(evil), "--out-dir", str(tmp_path / "results")]) == 1
        lines = error_lines(capsys.readouterr().err, "evaluate.py")
        assert len(lines) == 1 and "refusing to load" in lines[0]
        assert not (tmp_path / "results").exists()
    assert not marker.exists()


# ======================================================================= 6. disk
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

    monkeypatch.setattr(train_cli, "open", failing_open, raising=False)


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
