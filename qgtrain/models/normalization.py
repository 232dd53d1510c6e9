"""Per-dataset input statistics; models normalise inside so attacks work in pixel units."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about its dataset."""

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(1, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec(1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a known dataset, or a one-line error listing the known ones."""
    try:
        return DATASET_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_SPECS)}") from None


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for inputs in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
