"""ResNet-18, CIFAR variant (He et al., 2016): 3x3 stem convolution and no max-pool.

Post-activation basic blocks (conv-BN-ReLU-conv-BN, add, ReLU) in four stages of two
with widths ``w, 2w, 4w, 8w``; projection shortcuts are 1x1 conv + BN.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import make_normalize
from .registry import MODELS


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images; takes ``(N, C, H, W)`` images in [0, 1].

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: nominal image side (recorded for rebuilding; global pooling accepts any side).
        width: channels of the first stage (64 in the paper).
        mean, std: per-channel normalisation applied inside the model (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"resnet18 width must be >= 1, got {width}")
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes = width
        stages = []
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage, shape ``(N, 8w, h, w)``."""
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(N, 8w)``."""
        return torch.flatten(self.pool(self.feature_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("resnet18", ResNet18)
