"""Data modules: root resolution, seeded held-out split, shapes and ranges, CIFAR-10 on generated files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qgtrain.data import (
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SeededRandomSampler,
    build_datamodule,
    resolve_data_dir,
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


def test_missing_files_offline_give_one_line_error(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "QGTRAIN_DATA" in message


def _write_cifar(root: Path, n_per_batch: int = 20) -> None:
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


def test_cifar10_on_generated_files(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
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
    _write_cifar(tmp_path)
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
