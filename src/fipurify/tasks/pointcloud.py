"""Point-cloud classification: items ``(N x 3 float tensor, int label)``, e.g. ModelNet.

Loss, Fisher targets and metric are those of :class:`~fipurify.tasks.image.Classification`
(cross-entropy, softmax sampling, accuracy). The valid augmentations, applied per cloud of a
batch ``B x N x 3`` (the PointNet / PointNet++ training recipe):

* a rotation by :math:`\\theta \\sim U[0, 2\\pi)` about the up axis (``z`` in ModelNet's raw
  files: chairs are tallest along z), :math:`p \\to R p`; about z,
  :math:`R = ((\\cos\\theta, -\\sin\\theta, 0), (\\sin\\theta, \\cos\\theta, 0), (0, 0, 1))` (rows);
* an anisotropic scaling, :math:`p_a \\to s_a p_a` with :math:`s_a \\sim U[0.8, 1.25]` per axis;
* a jitter, :math:`p \\to p + \\mathrm{clip}(\\epsilon, -0.05, 0.05)` with
  :math:`\\epsilon \\sim N(0, 0.01^2)` per coordinate.

All random numbers come from the given ``torch.Generator`` (CPU), so a seeded generator gives
the same augmented batch.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .base import TASKS
from .image import Classification

AXES = {"x": 0, "y": 1, "z": 2}


def rotation_about(axis: str, angles: Tensor) -> Tensor:
    """Rotation matrices ``(B, 3, 3)`` by ``angles`` (radians, ``B``) about ``axis`` (x, y or z)."""
    if axis not in AXES:
        raise ConfigError(f"rotation axis must be one of x, y, z, got {axis!r}")
    a = AXES[axis]
    i, j = [k for k in range(3) if k != a]
    c, s = torch.cos(angles), torch.sin(angles)
    r = torch.zeros(len(angles), 3, 3, dtype=angles.dtype)
    r[:, a, a] = 1.0
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


@TASKS.register("pointcloud-classification")
class PointCloudClassification(Classification):
    """Classification of ``N x 3`` point clouds; rotation about the up axis, scaling and jitter."""

    name = "pointcloud-classification"
    feature_map_ndim = 3  # PointNet's shared MLP: 1 x 1 Conv1d outputs (N, C, P)

    def check_sample(self, x: Any, y: Any) -> None:
        super().check_sample(x, y)
        if x.ndim != 2 or x.shape[1] != 3 or not x.is_floating_point():
            raise DataError(f"clean point clouds must be N x 3 float tensors, got shape {tuple(x.shape)} "
                            f"of {x.dtype}")

    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, up: str = "z",
                rotate: bool = True, scale: tuple[float, float] = (0.8, 1.25), sigma: float = 0.01,
                clip: float = 0.05, **options: Any) -> Tensor:
        single = x.ndim == 2
        xb = x.unsqueeze(0) if single else x
        if xb.ndim != 3 or xb.shape[2] != 3:
            raise DataError(f"point-cloud augmentation takes B x N x 3 or N x 3, got {tuple(x.shape)}")
        b, n, _ = xb.shape
        out = xb
        if rotate:
            angles = torch.rand(b, generator=generator, dtype=torch.float64) * (2 * math.pi)
            r = rotation_about(up, angles).to(device=x.device, dtype=x.dtype)
            out = out @ r.transpose(1, 2)  # p -> R p for row vectors
        lo, hi = scale
        s = lo + (hi - lo) * torch.rand(b, 1, 3, generator=generator)
        out = out * s.to(device=x.device, dtype=x.dtype)
        if sigma > 0:
            eps = (torch.randn(b, n, 3, generator=generator) * sigma).clamp_(-clip, clip)
            out = out + eps.to(device=x.device, dtype=x.dtype)
        return out[0] if single else out


__all__ = ["PointCloudClassification", "rotation_about"]
