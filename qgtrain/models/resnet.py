"""CIFAR-sized networks: PreAct ResNet-18 (fast adversarial training) and WideResNet (Madry's CIFAR model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qgtrain.models.base import Network
from qgtrain.models.normalization import Normalize, dataset_spec


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Network):
    """PreAct ResNet-18 (He et al. 2016), the standard of Wong et al.'s fast adversarial training."""

    def __init__(self, dataset: str = "cifar10") -> None:
        super().__init__()
        spec = dataset_spec(dataset)
        self.dataset = dataset
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out)))))
        return out + shortcut


class WideResNet(Network):
    """WideResNet-``depth``-``widen_factor``; the default 34-10 has widths 16/160/320/640 (Madry's CIFAR model).

    Args:
        depth: Layers, 6n+4 (n blocks per stage).
        widen_factor: Width multiplier of the three stages.
        dropout: Dropout probability inside each block.
    """

    def __init__(
        self, dataset: str = "cifar10", depth: int = 34, widen_factor: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 28, 34), got {depth}")
        spec = dataset_spec(dataset)
        self.dataset = dataset
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, dropout
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.channels, widths[0], 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], widths[0]
        for stage, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(blocks):
                layers.append(WideBasic(in_planes, stage, stride if i == 0 else 1, dropout))
                in_planes = stage
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)
