"""LightningDataModules for MNIST, Fashion-MNIST and CIFAR-10, with data-root resolution and validation."""

from qgtrain.data.datamodules import (
    DATAMODULES,
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SeededRandomSampler,
    VisionDataModule,
    build_datamodule,
    resolve_data_dir,
    test_split,
)

__all__ = [
    "CIFAR10DataModule",
    "DATAMODULES",
    "DataError",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "SeededRandomSampler",
    "VisionDataModule",
    "build_datamodule",
    "resolve_data_dir",
    "test_split",
]
