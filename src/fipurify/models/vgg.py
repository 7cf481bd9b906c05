"""A small VGG-11 with batch norm (Simonyan & Zisserman, 2015), sized for small images.

Eight 3x3 conv-BN-ReLU layers with widths ``w, 2w, 4w, 4w, 8w, 8w, 8w, 8w`` and
five 2x2 max-pools, then global average pooling and one linear classifier (the
CIFAR-style head; the ImageNet 4096-wide MLP head would dwarf the rest). The pools
use ``ceil_mode`` so a 1x1 map stays 1x1: any input side >= 1 works, so images as
small as 8x8 are fine.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import make_normalize
from .registry import MODELS

# Channel multipliers of VGG-11 ("A" configuration) relative to the first layer; "M" is a max-pool.
_VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


class VGG(nn.Module):
    """VGG-11-BN for small images; takes ``(N, C, H, W)`` images in [0, 1].

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: nominal image side (recorded for rebuilding; any side works).
        width: channels of the first conv layer (64 in the paper).
        mean, std: per-channel normalisation applied inside the model (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"vgg11 width must be >= 1, got {width}")
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for item in _VGG11:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = int(item) * width
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Activation after the last conv block's pool, shape ``(N, 8w, h, w)``."""
        return self.body(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(N, 8w)``."""
        return torch.flatten(self.pool(self.feature_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("vgg11", VGG)
MODELS.alias("vgg", "vgg11")
