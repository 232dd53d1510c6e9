"""MNIST-sized networks: Madry et al.'s MNIST-challenge CNN and a tiny CNN for tests and CPU runs."""

from __future__ import annotations

import torch
from torch import nn

from qgtrain.models.base import Network
from qgtrain.models.normalization import Normalize, dataset_spec


class MadryMNIST(Network):
    """conv5x5-32 -> maxpool -> conv5x5-64 -> maxpool -> fc1024 -> fc10 (MNIST challenge).

    Takes inputs in [0, 1] and normalises inside with the statistics of ``dataset``.
    """

    def __init__(self, dataset: str = "mnist") -> None:
        super().__init__()
        spec = dataset_spec(dataset)
        self.dataset = dataset
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = spec.size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class TinyCNN(Network):
    """conv3x3-``width`` -> pool -> conv3x3-2``width`` -> pool -> fc: seconds per epoch on a CPU.

    Args:
        width: Channels of the first convolution (the second has twice as many).
    """

    def __init__(self, dataset: str = "mnist", width: int = 16) -> None:
        super().__init__()
        spec = dataset_spec(dataset)
        self.dataset = dataset
        self.width = width
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = spec.size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))
