"""Helpers the tests share (``conftest.py`` holds the fixtures): the repository root, the data root
(real MNIST when present) and small tensors from it, MNIST and CIFAR-10 files in their on-disk formats,
in-process ``train.py`` / ``evaluate.py`` calls, and training runs killed and resumed."""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from qgtrain.models import model_spec
from qgtrain.training import quiet_trainer

REPO = Path(__file__).resolve().parents[1]

# A tiny train.py run (one step, no robustness or visualization callbacks) for tests that expect a
# refusal before training: were a check to let a bad value through, the run would still be short.
# No short flag that would override the dotted keys under test.
REFUSED_RUN_ARGS = [
    "--net", "tiny_cnn", "--data.init_args.train_subset=100", "--data.init_args.val_size=100",
    "--trainer.max_steps=1", "--robustness.every_n_epochs=0", "--visualization.every_n_epochs=0",
]  # fmt: skip


def output_roots(tmp_path: Path) -> list[str]:
    """``train.py`` arguments that put checkpoints and logs under ``tmp_path``."""
    return ["--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs")]


def call_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Exit status of an in-process ``main(argv)`` (argparse-style errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def error_lines(stderr: str, prog: str = "train.py") -> list[str]:
    """The lines of ``stderr`` that ``prog`` wrote itself (``prog: ...``)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]


def no_training(*args, **kwargs):
    """Patched over ``Trainer.fit`` or ``training_step`` by tests that expect a refusal first."""
    raise AssertionError("training started")


def write_idx(path: Path, array: np.ndarray | torch.Tensor) -> None:
    """LeCun's IDX format as torchvision reads it: magic 0x0000080<ndim>, big-endian uint32 dims,
    uint8 data (``array`` holds integers in 0..255)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_cifar(root: Path, n_per_batch: int = 20) -> None:
    """Random CIFAR-10 batch files (python pickles of uint8 rows) under ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, size=n_per_batch)),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)


def write_mnist(
    root: Path, splits: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]
) -> Path:
    """``root/MNIST/raw`` in torchvision's layout: for each prefix (``train``, ``t10k``) of ``splits``,
    its (N x H x W images in 0..255, N labels) as ``<prefix>-images-idx3-ubyte`` and
    ``<prefix>-labels-idx1-ubyte``. Returns the raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


class SoftmaxOutput(nn.Module):
    """``net`` with a final softmax: it outputs probabilities, not logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def find_data_root() -> Path | None:
    """``$QGTRAIN_DATA``, else ``../shared/data`` beside the repository, if it holds MNIST."""
    candidates = [os.environ.get("QGTRAIN_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


def load_mnist_tensors(n: int, train: bool = True, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real MNIST examples as float [0, 1] tensors, else synthetic separable 28x28 data."""
    root = find_data_root()
    if root is not None:
        from torchvision.datasets import MNIST

        ds = MNIST(str(root), train=train, download=False)
        x = ds.data[offset : offset + n].unsqueeze(1).float() / 255.0
        return x, ds.targets[offset : offset + n].long()
    generator = torch.Generator().manual_seed(1234 + offset + (0 if train else 99))
    y = torch.randint(0, 10, (n,), generator=generator)
    x = torch.rand(n, 1, 28, 28, generator=generator) * 0.3
    for label in range(10):  # a bright bar per class: learnable, and an eps of 0.3 can hide it
        rows = slice(2 + 2 * label, 4 + 2 * label)
        x[y == label, :, rows, 4:24] += 0.6
    return x.clamp(0, 1), y


def lightning_like_checkpoint(net: nn.Module, path: Path) -> Path:
    """``net`` saved at ``path`` in the layout AdversarialTraining.on_save_checkpoint writes: state_dict under net.*, spec under qgtrain."""
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "qgtrain": {"net": model_spec(net)}, "epoch": 3}, path)
    return path


def assert_valid_adversarial(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, clip: tuple[float, float] = (0.0, 1.0)
) -> None:
    """``x_adv`` is a detached, finite, moved input inside the eps-ball around ``x`` and inside ``clip``."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert (x_adv - x).abs().max() <= eps * (1 + 1e-6)
    assert x_adv.min() >= clip[0] and x_adv.max() <= clip[1]
    assert torch.isfinite(x_adv).all()
    assert not torch.equal(x_adv, x), "the attack did not move the input"


def module_modes(model: nn.Module) -> list[bool]:
    """Each submodule's ``training`` flag, in order."""
    return [m.training for m in model.modules()]


# ---------------------------------------------------------------- training runs killed and resumed
def small_mnist_datamodule(root: Path, train_subset: int = 64, batch_size: int = 16):
    """Real MNIST, ``train_subset`` training examples in seeded order, a small validation split."""
    from qgtrain.data import MNISTDataModule

    return MNISTDataModule(
        data_dir=str(root), batch_size=batch_size, eval_batch_size=64, val_size=64,
        train_subset=train_subset, download=False, seed=0,
    )  # fmt: skip


class KilledError(RuntimeError):
    """Raised by :class:`KillAfterBatches`: the run dies as a killed process would, after its step checkpoint."""


class KillAfterBatches(L.Callback):
    """Stops training with :class:`KilledError` at the end of the ``batches``-th training batch of the run."""

    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise KilledError(f"killed after {self.seen} batches")


def fit_killed_and_resumed(
    build: Callable[[], L.LightningModule],
    root: Path,
    folder: Path,
    max_epochs: int,
    kill_after_batches: int,
    every_n_steps: int,
    edit_checkpoint: Callable[[dict], None] | None = None,
) -> L.LightningModule:
    """Train ``build()`` with a ``step.ckpt`` every ``every_n_steps`` optimizer steps, kill it after
    ``kill_after_batches`` batches, then train a fresh ``build()`` from that checkpoint (optionally
    edited first by ``edit_checkpoint``) to the end, as ``train.py --resume`` does. Returns the resumed
    module."""
    from qgtrain.checkpoints import RestoreLoaderState, StepCheckpoint

    killed = quiet_trainer(
        max_epochs=max_epochs, limit_val_batches=0, enable_checkpointing=True,
        callbacks=[StepCheckpoint(folder, every_n_steps=every_n_steps), KillAfterBatches(kill_after_batches)],
    )  # fmt: skip
    with pytest.raises(KilledError):
        killed.fit(build(), datamodule=small_mnist_datamodule(root))
    path = folder / "step.ckpt"
    if edit_checkpoint is not None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        edit_checkpoint(checkpoint)
        torch.save(checkpoint, path)
    module = build()
    resumed = quiet_trainer(max_epochs=max_epochs, limit_val_batches=0, callbacks=[RestoreLoaderState()])
    resumed.fit(module, datamodule=small_mnist_datamodule(root), ckpt_path=str(path))
    return module


def fit_uninterrupted(build: Callable[[], L.LightningModule], root: Path, max_epochs: int) -> L.LightningModule:
    """Train ``build()`` for ``max_epochs`` on :func:`small_mnist_datamodule` without validation."""
    module = build()
    quiet_trainer(max_epochs=max_epochs, limit_val_batches=0).fit(module, datamodule=small_mnist_datamodule(root))
    return module


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Bit-identical parameters."""
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


DDP_FIT_SCRIPT = '''
import sys
from pathlib import Path

import torch

from qgtrain.attacks import PGD, Free
from qgtrain.data import MNISTDataModule
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer

method, root, out, epochs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
inner = Free(eps=0.3, replays=2) if method == "free" else PGD(eps=0.3, alpha=0.1, steps=1)
module = AdversarialTraining(TinyCNN(width=4), inner, atta=method == "atta", track_clean_accuracy=False)
datamodule = MNISTDataModule(data_dir=root, batch_size=16, val_size=64, train_subset=64, download=False, seed=0)
trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, devices=2, strategy="ddp")
trainer.fit(module, datamodule=datamodule)
trainer.save_checkpoint(out / "last.ckpt")
state = module.perturbations.state_dict() if module.perturbations is not None else {"delta": module.free_delta}
torch.save(state, out / f"rank{trainer.global_rank}.pt")
'''


def ddp_fit(method: str, root: Path, folder: Path, epochs: int) -> tuple[dict, list[dict]]:
    """Two CPU processes (DDP) train a TinyCNN on 64 MNIST examples, batch 16 per process, with
    ``method`` (``free``: m = 2; ``atta``: PGD-1); returns rank 0's checkpoint and each rank's state."""
    import subprocess
    import sys

    script = folder / "ddp_fit.py"
    script.write_text(DDP_FIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), method, str(root), str(folder), str(epochs)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    states = [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    return torch.load(folder / "last.ckpt", weights_only=True), states


ONE_STEP_ARGS = [
    "--net", "tiny_cnn", "--inner", "pgd", "--steps", "1", "--alpha", "0.75",  # alpha given: not the rule's of steps
    "--data.init_args.train_subset", "100", "--data.init_args.val_size", "100",
    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--robustness.every_n_epochs", "0", "--visualization.every_n_epochs", "0",
]  # fmt: skip
"""A train.py run of one training step of a tiny network on 100 images, no monitor or views."""
