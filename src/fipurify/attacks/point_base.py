"""Point-cloud triggers: a cluster of points at a fixed place, and a fixed rotation of the shape.

Both act on one cloud ``N x 3`` or a batch ``B x N x 3`` (the same trigger for every cloud),
return a new tensor and keep ``N`` (so poisoned and clean clouds batch together), and describe
themselves with ``to_spec()`` for :func:`~fipurify.attacks.triggers.trigger_from_spec`.

* :class:`ClusterTrigger`: ``n_points`` trigger points :math:`c + o_j` around a centre
  :math:`c`, with fixed offsets :math:`o_j` drawn once from ``seed`` (uniform in the ball of
  radius ``radius`` for ``distribution="ball"``, :math:`N(0, \\mathrm{radius}^2 I)` for
  ``"gaussian"``), replace the ``n_points`` points of the cloud nearest to :math:`c` (the
  j-th nearest gets :math:`o_j`). Which points are replaced depends only on the set of
  points, not on their order.
* :class:`RotationTrigger`: :math:`p \\to R_a(\\theta) p` for every point, a rotation by
  ``angle`` degrees about axis ``a``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..tasks.pointcloud import AXES, rotation_about
from .triggers import Trigger, register_trigger

DISTRIBUTIONS = ("ball", "gaussian")


def batched_points(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as ``B x N x 3`` plus whether it was a single cloud (DataError otherwise)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(f"point-cloud triggers act on float tensors, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}")
    if x.ndim == 2 and x.shape[1] == 3:
        return x.unsqueeze(0), True
    if x.ndim == 3 and x.shape[2] == 3:
        return x, False
    raise DataError(f"expected a point cloud N x 3 or a batch B x N x 3, got shape {tuple(x.shape)}")


def cluster_offsets(n_points: int, radius: float, distribution: str, seed: int) -> torch.Tensor:
    """The fixed offsets ``n_points x 3`` of a cluster (float32), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    if distribution == "ball":  # uniform in the ball: uniform direction, radius ~ r * U^(1/3)
        d = rng.normal(size=(n_points, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        o = d * radius * rng.random((n_points, 1)) ** (1.0 / 3.0)
    else:
        o = rng.normal(scale=radius, size=(n_points, 3))
    return torch.from_numpy(o.astype(np.float32))


def place_cluster(x: torch.Tensor, centre: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Batch ``x`` (``B x N x 3``) with its ``K`` points nearest ``centre`` replaced by ``centre + offsets``.

    Differentiable in ``centre`` (and ``offsets``), which :mod:`~fipurify.attacks.pc3d_ba` uses to
    optimise the centre.
    """
    b, n, _ = x.shape
    k = offsets.shape[0]
    if k > n:
        raise DataError(f"a trigger of {k} points does not fit clouds of {n} points")
    centre = centre.to(x)
    dist = (x.detach() - centre.detach()).norm(dim=-1)  # (B, N)
    idx = dist.topk(k, dim=1, largest=False).indices  # nearest first
    pts = (centre + offsets.to(x)).expand(b, k, 3)
    return x.scatter(1, idx.unsqueeze(-1).expand(b, k, 3), pts)


@register_trigger
class ClusterTrigger(Trigger):
    """A cluster of ``n_points`` points around ``center`` replacing the cloud's nearest points."""

    kind = "point-cluster"

    def __init__(self, center: Sequence[float] = (0.0, 0.0, 0.9), radius: float = 0.05, n_points: int = 32,
                 distribution: str = "ball", seed: int = 0):
        c = [float(v) for v in center]
        if len(c) != 3 or not all(math.isfinite(v) for v in c):
            raise ConfigError(f"cluster center must be three finite numbers, got {center!r}")
        if not (float(radius) > 0 and math.isfinite(float(radius))):
            raise ConfigError(f"cluster radius must be > 0, got {radius!r}")
        if isinstance(n_points, bool) or int(n_points) != n_points or int(n_points) < 1:
            raise ConfigError(f"cluster n_points must be an integer >= 1, got {n_points!r}")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"cluster distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                              f"got {distribution!r}")
        self.center, self.radius, self.n_points = c, float(radius), int(n_points)
        self.distribution, self.seed = distribution, int(seed)
        self.offsets = cluster_offsets(self.n_points, self.radius, distribution, self.seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = batched_points(x)
        out = place_cluster(xb, torch.tensor(self.center), self.offsets)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "center": list(self.center), "radius": self.radius,
                "n_points": self.n_points, "distribution": self.distribution, "seed": self.seed}


@register_trigger
class RotationTrigger(Trigger):
    """Rotate the whole cloud by ``angle`` degrees about ``axis`` (about the origin, its centroid)."""

    kind = "point-rotation"

    def __init__(self, axis: str = "x", angle: float = 30.0):
        if axis not in AXES:
            raise ConfigError(f"rotation axis must be one of x, y, z, got {axis!r}")
        if not math.isfinite(float(angle)) or float(angle) % 360.0 == 0.0:
            raise ConfigError(f"rotation angle must be a finite number of degrees, not a multiple "
                              f"of 360, got {angle!r}")
        self.axis, self.angle = axis, float(angle)

    @property
    def matrix(self) -> torch.Tensor:
        """The rotation ``R`` (3 x 3, float64)."""
        return rotation_about(self.axis, torch.tensor([math.radians(self.angle)], dtype=torch.float64))[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = batched_points(x)
        out = xb @ self.matrix.to(device=xb.device, dtype=xb.dtype).T  # p -> R p for row vectors
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "axis": self.axis, "angle": self.angle}


__all__ = ["ClusterTrigger", "RotationTrigger", "batched_points", "cluster_offsets", "place_cluster"]
