"""PointNet (Qi et al., CVPR 2017) for point-cloud classification, without the T-nets.

A shared per-point MLP (1 x 1 convolutions with batch norm and ReLU) lifts every point
:math:`p_i \\in \\mathbb{R}^3` to a feature :math:`h(p_i)`; a symmetric max-pool over the
points gives the global feature :math:`g = \\max_i h(p_i)` (coordinate-wise), so the output
does not depend on the order of the points; an MLP head maps :math:`g` to class logits.

Widths ``w, w, w, 2w, 16w`` per point and ``8w, 4w`` in the head (``w = 64`` is the paper's
64-64-64-128-1024 / 512-256), dropout 0.3 before the last layer. The paper's input and
feature transform networks (T-nets) are left out: they add little on ModelNet (the paper
reports +0.8 / +2 points) and cost a second network per forward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .registry import MODELS


def check_points(x: torch.Tensor, channels: int, arch: str) -> None:
    """One-line DataError unless ``x`` is a batch of clouds ``B x N x channels``."""
    if x.ndim != 3 or x.shape[2] != channels:
        raise DataError(f"{arch} takes point clouds B x N x {channels}, got shape {tuple(x.shape)}")


class PointNet(nn.Module):
    """PointNet classifier; takes ``(B, N, in_channels)`` clouds, returns ``(B, num_classes)`` logits.

    Args:
        num_classes: number of output logits.
        in_channels: coordinates per point (3 for x, y, z).
        input_size: nominal points per cloud (recorded for rebuilding; any N works).
        width: ``w`` above (64 in the paper).
        dropout: dropout probability before the classifier (0.3 in the paper).
        mean, std: accepted because :func:`~fipurify.models.create` passes them to every model;
            not applied (the datasets centre and scale each cloud into the unit sphere).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 1024, width: int = 64,
                 dropout: float = 0.3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"pointnet width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"pointnet dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.input_size = input_size
        layers: list[nn.Module] = []
        c = in_channels
        for out in (width, width, width, 2 * width, 16 * width):
            layers += [nn.Conv1d(c, out, 1, bias=False), nn.BatchNorm1d(out), nn.ReLU()]
            c = out
        self.point_mlp = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(c, 8 * width, bias=False), nn.BatchNorm1d(8 * width), nn.ReLU(),
            nn.Linear(8 * width, 4 * width, bias=False), nn.BatchNorm1d(4 * width), nn.ReLU(),
            nn.Dropout(dropout))
        self.classifier = nn.Linear(4 * width, num_classes)

    def point_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point features before the max-pool, shape ``(B, 16w, N)``."""
        check_points(x, self.in_channels, "pointnet")
        return self.point_mlp(x.transpose(1, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(B, 4w)``."""
        return self.head(self.point_features(x).amax(dim=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("pointnet", PointNet)

__all__ = ["PointNet", "check_points"]
