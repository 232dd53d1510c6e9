"""Data modules over torchvision datasets, held in memory as uint8 tensors.

Root folder: ``data_dir`` argument, else ``$QGTRAIN_DATA``, else ``./data`` (torchvision layout:
``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-py``). A seeded split of the training set is
held out for validation (checkpoint selection); the test split is for ``evaluate.py`` only.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from qgtrain.models.normalization import dataset_spec

log = logging.getLogger(__name__)

DATA_ENV = "QGTRAIN_DATA"


CROP_PADDING = 4
"""Pixels of zero padding around an image before its random crop (CIFAR-10's pad-4 crop)."""


class DataError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message says which file and how to fix it."""


def exception_summary(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line: the message's lines joined (torchvision's download error puts
    its cause on the lines after ``Error downloading <file>:``), cut at ``limit`` characters."""
    text = " ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$QGTRAIN_DATA``, else ``./data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(DATA_ENV) or "data").expanduser()


class SeededRandomSampler(DistributedSampler):
    """Random order drawn from ``(seed, epoch)`` alone, sharded over ``num_replicas`` processes.

    Stateful (torchdata's ``Stateful`` protocol): :meth:`state_dict` records the epoch and how many
    indices this process has drawn, so a :class:`StatefulDataLoader` restored from a mid-epoch
    checkpoint continues at the next batch of the same order, without drawing the skipped batches.
    A restored position applies only to the epoch it was saved in (Lightning sets the epoch with
    :meth:`set_epoch` after restoring; a checkpoint taken at an epoch's last batch then starts the
    next epoch from its beginning). With several processes each takes every ``num_replicas``-th
    index of the padded order, as :class:`~torch.utils.data.DistributedSampler` does; being one,
    Lightning does not replace it under DDP. The position is per process, so a run checkpointed with
    ``num_replicas`` processes must resume with as many (:meth:`load_state_dict` checks).
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.yielded = 0
        self._restored: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.yielded = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn at the first ``next``, after Lightning's ``set_epoch``.
        start, self._restored = (self._restored or (self.epoch, 0)), None
        skip = start[1] if start[0] == self.epoch else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        if self.num_replicas > 1:
            order += order[: self.total_size - len(order)]
            order = order[self.rank : self.total_size : self.num_replicas]
        self.yielded = skip
        for index in order[skip:]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = state.get("num_replicas", 1)
        if saved != self.num_replicas:
            raise DataError(
                f"the checkpoint was written by {saved} training process(es), this run has "
                f"{self.num_replicas}: resume with the same --devices and --num-nodes"
            )
        self._restored = (state["epoch"], state["yielded"])


class ImageTensorDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` served as float in [0, 1]; optional pad-4 crop + flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment
        self.padding = CROP_PADDING if augment else 0  # of the canvas the crops are taken from

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label, _ = self.item(index)
        return image, label

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image, its label and its view ``(top, left, flipped)``: the ``H x W`` window of the image
        zero-padded by ``padding`` on each side, then mirrored if ``flipped`` ((0, 0, 0) without
        augmentation)."""
        image = self.images[index].float().div_(255.0)
        if not self.augment:
            return image, self.labels[index], torch.zeros(3, dtype=torch.long)
        _, h, w = image.shape
        pad = self.padding
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top : top + h, left : left + w]
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            image = image.flip(-1)
        return image, self.labels[index], torch.tensor([top, left, int(flipped)])


class WithIndex(Dataset):
    """``dataset``'s items followed by their index: ``(image, label, index)`` (ATTA's buffer key), and by
    the view the image was cut from, ``(image, label, index, view)``, when ``dataset`` augments
    (:meth:`ImageTensorDataset.item`), so the buffer can follow the crop and the flip."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.padding: int = getattr(dataset, "padding", 0)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.padding:
            image, label, view = self.dataset.item(index)  # type: ignore[attr-defined]
            return image, label, index, view
        return (*self.dataset[index], index)


class VisionDataModule(L.LightningDataModule):
    """Common base: download/check, load into memory, validate, split, loaders."""

    name: ClassVar[str]
    folder: ClassVar[str]
    expected_files: ClassVar[tuple[str, ...]]
    augment_train: ClassVar[bool] = False

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 50,
        eval_batch_size: int = 200,
        val_size: int = 5000,
        train_subset: int | None = None,
        num_workers: int | None = None,
        download: bool = True,
        seed: int = 0,
        yield_indices: bool = False,
    ) -> None:
        """Check the arguments; the files are read in :meth:`prepare_data` and :meth:`setup`.

        Args:
            data_dir: Root holding the dataset folder (null: $QGTRAIN_DATA, else ./data).
            batch_size: Training batch size.
            eval_batch_size: Batch size of validation and test.
            val_size: Training examples held out (seeded) for validation.
            train_subset: Train on only the first N of the remaining examples (null: all).
            num_workers: DataLoader worker processes (null: 4 with augmentation, else 0).
            download: Download the files when missing (torchvision's mirrors).
            seed: Seed of the validation split and of the training order per epoch.
            yield_indices: Training batches are ``(x, y, index)``, index = position in the training
                split (set by ``AdversarialTraining(atta=True)``).
        """
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size} / {eval_batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 or null, got {train_subset}")
        self.save_hyperparameters()
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.num_workers = num_workers
        self.download = download
        self.seed = seed
        self.yield_indices = bool(yield_indices)
        self.spec = dataset_spec(self.name)
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

    # ----------------------------------------------------------------- files
    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.folder

    def missing_files(self) -> list[str]:
        return [f for f in self.expected_files if not (self.raw_dir / f).exists()]

    def _torchvision_dataset(self, train: bool, download: bool) -> Any:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download when files are missing and ``download`` is on; else a one-line error."""
        if not self.missing_files():
            return
        reason = "download disabled"
        created = [p for p in (self.raw_dir, *self.raw_dir.parents) if not p.exists()]  # deepest first
        if self.download:
            try:
                for train in (True, False):
                    self._torchvision_dataset(train=train, download=True)
            except Exception as exc:  # no network, mirror down, disk full...
                reason = f"download failed: {exception_summary(exc)}"
        missing = self.missing_files()
        if missing:
            for folder in created:  # a failed download leaves no empty folders behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise DataError(
                f"{self.name} data not found in {self.raw_dir} (missing {', '.join(missing)}; {reason}); "
                f"put the files there or point --data-dir / ${DATA_ENV} at the folder that holds {self.folder}/"
            )

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The split as ``(uint8 images (N, C, H, W), int64 labels)``, validated."""
        split = "train" if train else "test"
        missing = self.missing_files()
        if missing:
            raise DataError(
                f"{self.name} data not found in {self.raw_dir} (missing {', '.join(missing)}); "
                f"run with download enabled online, or point --data-dir / ${DATA_ENV} at it"
            )
        try:
            images, labels = self._read_split(train)
        except (DataError, OSError):  # OSError: a permission or the disk, not the file's content
            raise
        except Exception as exc:
            raise DataError(
                f"cannot read the {self.name} {split} split from {self.raw_dir} "
                f"({exception_summary(exc) if str(exc) else type(exc).__name__ + ': corrupt file'}); "
                "the files are truncated or corrupt: delete them and download again"
            ) from None
        self._validate(images, labels, split)
        return images, labels

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(images, labels)`` of a split (through torchvision unless a subclass reads the files)."""
        return self._as_tensors(self._torchvision_dataset(train=train, download=False))

    def _as_tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _validate(self, images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        spec = self.spec
        expected = (spec.channels, spec.size, spec.size)
        where = f"{self.name} {split} split in {self.raw_dir}"
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise DataError(f"{where}: images have shape {tuple(images.shape[1:])}, expected {expected}")
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataError(
                f"{where}: labels outside [0, {spec.num_classes}) "
                f"(found {int(labels.min())}..{int(labels.max())})"
            )
        if split == "train" and labels.unique().numel() < 2:
            raise DataError(
                f"{where}: every label is {int(labels[0])}; a classifier cannot be trained on one class"
            )

    # ----------------------------------------------------------------- splits
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load_split(train=True)
            if self.val_size >= images.shape[0]:
                raise DataError(
                    f"val_size={self.val_size} leaves no training data ({images.shape[0]} images)"
                )
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = order[: self.val_size], order[self.val_size :]
            if self.train_subset is not None:
                train_idx = train_idx[: self.train_subset]
            self.train_set = ImageTensorDataset(images[train_idx], labels[train_idx], self.augment_train)
            self.val_set = ImageTensorDataset(images[val_idx], labels[val_idx])
            log.info("%s: %d training, %d validation examples", self.name, len(train_idx), len(val_idx))
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = ImageTensorDataset(*self._load_split(train=False))

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers if self.num_workers is not None else (4 if self.augment_train else 0)
        return {
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": workers > 0,
        }

    def train_dataloader(self) -> StatefulDataLoader:
        """Batches in :class:`SeededRandomSampler` order from a torchdata ``StatefulDataLoader``,
        whose position Lightning saves in every checkpoint and restores on resume."""
        assert self.train_set is not None, "call setup('fit') first"
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = SeededRandomSampler(len(self.train_set), self.seed, num_replicas=replicas, rank=rank)
        dataset = WithIndex(self.train_set) if self.yield_indices else self.train_set
        return StatefulDataLoader(
            dataset, self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup('fit') first"
        return DataLoader(self.val_set, self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup('test') first"
        return DataLoader(self.test_set, self.eval_batch_size, shuffle=False, **self._loader_kwargs())


class MNISTDataModule(VisionDataModule):
    """MNIST (LeCun et al.); files in ``<root>/MNIST/raw``."""

    name = "mnist"
    folder = "MNIST/raw"
    expected_files = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def _torchvision_dataset(self, train: bool, download: bool) -> Any:
        from torchvision.datasets import MNIST

        return MNIST(str(self.data_dir), train=train, download=download)

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = "train" if train else "t10k"
        images = read_idx(self.raw_dir / f"{prefix}-images-idx3-ubyte", ndim=3)
        labels = read_idx(self.raw_dir / f"{prefix}-labels-idx1-ubyte", ndim=1)
        return images.unsqueeze(1).contiguous(), labels.long()

    def _as_tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al.); files in ``<root>/FashionMNIST/raw``."""

    name = "fashion_mnist"
    folder = "FashionMNIST/raw"

    def _torchvision_dataset(self, train: bool, download: bool) -> Any:
        from torchvision.datasets import FashionMNIST

        return FashionMNIST(str(self.data_dir), train=train, download=download)


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10; files in ``<root>/cifar-10-batches-py``; training with pad-4 random crop and flip."""

    name = "cifar10"
    folder = "cifar-10-batches-py"
    expected_files = (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    )
    augment_train = True

    def _torchvision_dataset(self, train: bool, download: bool) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.data_dir), train=train, download=download)

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Read the batch files directly (torchvision's class insists on the official md5s, which
        # generated test data cannot have) with an unpickler that only admits NumPy arrays.
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = self.missing_files()
        if missing:
            raise DataError(
                f"{self.name} data not found in {self.raw_dir} (missing {', '.join(missing)}); "
                f"run with download enabled online, or point --data-dir / ${DATA_ENV} at it"
            )
        images, labels = [], []
        for name in names:
            path = self.raw_dir / name
            try:
                with open(path, "rb") as handle:
                    batch = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
                data = torch.as_tensor(np.asarray(batch["data"], dtype=np.uint8))
                images.append(data.reshape(-1, 3, 32, 32))
                labels.append(torch.as_tensor(np.asarray(batch["labels"]), dtype=torch.long))
            except Exception as exc:
                raise DataError(
                    f"cannot read {path} ({type(exc).__name__}: {str(exc)[:200] or 'corrupt file'}); "
                    "the file is truncated, corrupt or not a CIFAR-10 batch: delete it and download again"
                ) from None
        images_t, labels_t = torch.cat(images), torch.cat(labels)
        self._validate(images_t, labels_t, "train" if train else "test")
        return images_t, labels_t


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """A uint8 IDX file (LeCun's MNIST format: magic ``0x0000080<ndim>``, big-endian int32 dims, data).

    Raises :class:`DataError` naming ``path`` when the header is wrong or the data is truncated.
    """
    fix = "delete it and download again"
    data = path.read_bytes()
    magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = f"0x{int.from_bytes(data[:4], 'big'):08x}" if len(data) >= 4 else f"{len(data)} bytes"
        raise DataError(
            f"{path} is not a uint8 IDX file with {ndim} dims (magic {found}, expected 0x{magic:08x}); {fix}"
        )
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its header; {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header says {'x'.join(map(str, dims))} = {expected} bytes "
            f"of data, found {len(data) - header}; {fix}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches (dicts of lists, bytes and NumPy arrays) and refuses anything else."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


DATAMODULES: dict[str, type[VisionDataModule]] = {
    cls.name: cls for cls in (MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule)
}


def build_datamodule(name: str, **kwargs: Any) -> VisionDataModule:
    try:
        cls = DATAMODULES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATAMODULES)}") from None
    return cls(**kwargs)


def test_split(name: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of dataset ``name`` as stored: uint8 images ``(N, C, H, W)`` and labels."""
    datamodule = build_datamodule(name, data_dir=data_dir, download=False)
    datamodule.setup("test")
    assert datamodule.test_set is not None
    return datamodule.test_set.images, datamodule.test_set.labels
