"""Pre-activation ResNet-18 (He et al., 2016, "Identity Mappings in Deep Residual Networks").

The CIFAR variant used throughout the backdoor literature: a 3x3 stem convolution
(no max-pool), four stages of two :class:`PreActBlock` each with widths
``w, 2w, 4w, 8w``, a final BN-ReLU, global average pooling and one linear layer.
With ``width=64`` and 10 classes it has 11,172,170 parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import make_normalize
from .registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with an identity (or 1x1 conv) shortcut taken after the
    first BN-ReLU. Dropout (0 by default) is the wide-ResNet variant of the block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        # The projection shortcut has no BN of its own: it sees the already normalised activation.
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for small images; takes ``(N, C, H, W)`` images in [0, 1].

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: nominal image side (recorded for rebuilding; global pooling accepts any side).
        width: channels of the first stage (64 in the paper); later stages use 2x, 4x, 8x.
        mean, std: per-channel normalisation applied inside the model (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"preactresnet18 width must be >= 1, got {width}")
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        widths = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        stages = []
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Activation of the last stage after the final BN-ReLU, shape ``(N, 8w, h, w)``."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.relu(self.bn(out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(N, 8w)``."""
        return torch.flatten(self.pool(self.feature_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("preactresnet18", PreActResNet18)
