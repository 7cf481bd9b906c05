"""Wide Residual Network (Zagoruyko & Komodakis, 2016); WRN-16-1 by default.

A 3x3 stem with 16 channels, three groups of ``(depth - 4) / 6`` pre-activation
blocks with widths ``16k, 32k, 64k`` (``k`` = widen factor), dropout between the
two convolutions of each block, final BN-ReLU, global average pooling, linear.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import make_normalize
from .registry import MODELS
from .preact_resnet import PreActBlock


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; takes ``(N, C, H, W)`` images in [0, 1].

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: nominal image side (recorded for rebuilding; global pooling accepts any side).
        depth: total depth, ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: channel multiplier ``k``.
        dropout: dropout probability inside each block.
        mean, std: per-channel normalisation applied inside the model (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, depth: int = 16,
                 widen_factor: int = 1, dropout: float = 0.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"wideresnet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ConfigError(f"wideresnet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"wideresnet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        groups = []
        for i, planes in enumerate([16 * widen_factor, 32 * widen_factor, 64 * widen_factor]):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Activation of the last group after the final BN-ReLU, shape ``(N, 64k, h, w)``."""
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        return self.relu(self.bn(out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(N, 64k)``."""
        return torch.flatten(self.pool(self.feature_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("wideresnet16_1", WideResNet)
