"""Data modules: root resolution, seeded held-out split, shapes and ranges, CIFAR-10 on generated files,
and bad data (missing, truncated, corrupt or malformed files): one line, before any training step."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qgtrain.cli.train import main as train_main
from qgtrain.data import (
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SeededRandomSampler,
    build_datamodule,
    resolve_data_dir,
)
from qgtrain.training import AdversarialTraining
from tests.helpers import (
    REFUSED_RUN_ARGS,
    call_main,
    error_lines,
    no_training,
    write_cifar,
    write_idx,
    write_mnist,
)


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QGTRAIN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("QGTRAIN_DATA")
    assert resolve_data_dir(None) == Path("data")


def test_mnist_split_is_seeded_disjoint_and_in_range(data_root: Path) -> None:
    dm = MNISTDataModule(data_dir=str(data_root), val_size=1000, train_subset=2000, seed=3, download=False)
    dm.setup("fit")
    assert len(dm.train_set) == 2000 and len(dm.val_set) == 1000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == torch.long
    # The held-out split depends on the seed alone, and never overlaps the training images.
    again = MNISTDataModule(data_dir=str(data_root), val_size=1000, train_subset=2000, seed=3, download=False)
    again.setup("fit")
    assert torch.equal(again.val_set.images, dm.val_set.images)
    train_rows = {bytes(img.numpy()) for img in dm.train_set.images}
    assert not any(bytes(img.numpy()) in train_rows for img in dm.val_set.images[:200])
    other = MNISTDataModule(data_dir=str(data_root), val_size=1000, seed=4, download=False)
    other.setup("fit")
    assert not torch.equal(other.val_set.images, dm.val_set.images)


def test_test_split_is_separate(data_root: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_root), download=False)
    dm.setup("test")
    assert len(dm.test_set) == 10000 and dm.train_set is None


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    sampler = SeededRandomSampler(100, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first and sorted(second) == list(range(100))


def fake_mnist(root: Path, n_train: int = 60, size: int = 28, labels: np.ndarray | None = None) -> Path:
    """Random MNIST files under ``root`` (``n_train`` training and 20 test images); the raw folder."""
    rng = np.random.default_rng(0)
    splits = {}
    for prefix, n in (("train", n_train), ("t10k", 20)):
        images = rng.integers(0, 256, (n, size, size))
        splits[prefix] = (
            images,
            labels if labels is not None and prefix == "train" else rng.integers(0, 10, n),
        )
    return write_mnist(root, splits)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] = 0x99
    path.write_bytes(bytes(data))


# case: (fake_mnist's keyword arguments, or None for no files at all; what is then done to the raw
# folder; the fragments of the one-line error, "{raw}" standing for the raw folder; whether train.py
# is run on it too).
BAD_DATA = {
    "missing files": (
        None,
        None,
        ("data not found", "{raw}", "missing train-images-idx3-ubyte", "QGTRAIN_DATA"),
        True,
    ),
    "truncated images": (
        {},
        lambda raw: _truncate(raw / "train-images-idx3-ubyte", 1000),
        ("train-images-idx3-ubyte is truncated or corrupt: its header says 60x28x28 = 47040 bytes",),
        True,
    ),
    "truncated labels": (
        {},
        lambda raw: _truncate(raw / "train-labels-idx1-ubyte", 30),
        ("train-labels-idx1-ubyte is truncated or corrupt",),
        False,
    ),
    "corrupt header": (
        {},
        lambda raw: _corrupt_magic(raw / "train-labels-idx1-ubyte"),
        ("train-labels-idx1-ubyte is not a uint8 IDX file",),
        False,
    ),
    "empty file": (
        {},
        lambda raw: (raw / "t10k-images-idx3-ubyte").write_bytes(b""),
        ("t10k-images-idx3-ubyte is not a uint8 IDX file",),
        False,
    ),
    "wrong image shape": (
        {"size": 32},
        None,
        ("images have shape (1, 32, 32), expected (1, 28, 28)",),
        False,
    ),
    "one class": (
        {"labels": np.full(60, 3)},
        None,
        ("every label is 3; a classifier cannot be trained on one class",),
        True,
    ),
    "labels out of range": (
        {"labels": np.arange(60) % 12},
        None,
        ("labels outside [0, 10) (found 0..11)",),
        False,
    ),
    "count mismatch": (
        {},
        lambda raw: write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10),
        ("60 images but 50 labels",),
        False,
    ),
}


def make_bad_data(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """The data root of ``case`` under ``tmp_path / "data"`` and the fragments its error must contain."""
    kwargs, corrupt, fragments, _ = BAD_DATA[case]
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    if kwargs is not None:
        fake_mnist(root, **kwargs)
    if corrupt is not None:
        corrupt(raw)
    return root, [fragment.replace("{raw}", str(raw)) for fragment in fragments]


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
    root, fragments = make_bad_data(tmp_path, case)
    dm = MNISTDataModule(data_dir=str(root), val_size=10, download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
        dm.setup(None)
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("case", [case for case, row in BAD_DATA.items() if row[3]])
def test_bad_data_stops_train_before_any_training_step(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """train.py exits with status 1 and the data module's line; nothing is written (the output roots
    default to the working folder)."""
    root, fragments = make_bad_data(tmp_path, case)
    data_files = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(AdversarialTraining, "training_step", no_training)
    monkeypatch.chdir(tmp_path)
    argv = [*REFUSED_RUN_ARGS, "--data-dir", str(root), "--data.init_args.download=false"]
    assert call_main(train_main, [*argv, "--data.init_args.val_size=10"]) == 1
    stderr = capsys.readouterr().err
    lines = error_lines(stderr)
    assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), stderr
    assert "Traceback" not in stderr
    assert sorted(tmp_path.rglob("*")) == data_files  # no logs/, checkpoints/, data/ created


def test_cifar10_on_generated_files(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=8, num_workers=0, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y.max() < 10
    # Training images are augmented (random crop + flip), validation images are not.
    torch.manual_seed(0)
    a = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 8))
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_cifar10_refuses_pickled_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": [0]}, handle)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, download=False)
    with pytest.raises(DataError, match="data_batch_1"):
        dm.setup("fit")
    assert not marker.exists()


def test_build_datamodule_unknown_name() -> None:
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        build_datamodule("svhn")


def test_a_failed_download_names_its_cause_on_the_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision puts the cause of a failed download on the lines after ``Error downloading <file>:``;
    the one-line error keeps it. Control: the first line alone, as the message used to read, has none."""
    torchvision_message = (
        "Error downloading train-images-idx3-ubyte.gz:\n"
        "Tried https://ossci-datasets.s3.amazonaws.com/mnist/, got:\n"
        "<urlopen error [Errno -3] Temporary failure in name resolution>\n"
    )

    def offline(self: MNISTDataModule, train: bool, download: bool) -> None:
        raise RuntimeError(torchvision_message)

    monkeypatch.setattr(MNISTDataModule, "_torchvision_dataset", offline)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10, download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert "Temporary failure in name resolution" in message, message
    assert "Temporary failure" not in torchvision_message.splitlines()[0]  # the control
