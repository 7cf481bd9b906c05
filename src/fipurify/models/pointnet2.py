"""PointNet++ with single-scale grouping (Qi et al., NeurIPS 2017), in plain torch (no CUDA ops).

A set-abstraction (SA) layer turns ``N`` points with features into ``S`` centroids with features:

1. farthest-point sampling picks the centroids: start from point 0, then repeatedly the point
   farthest from those already chosen, :math:`c_{j+1} = \\arg\\max_i \\min_{l \\le j} \\lVert p_i - c_l \\rVert`;
2. a ball query lists, for each centroid, the first ``k`` points (in index order) within radius
   ``r`` of it, repeating the first one when fewer are found (the centroid itself always is);
3. each neighbourhood is expressed relative to its centroid, :math:`(p_i - c_j, f_i)`, passed
   through a shared MLP and max-pooled: :math:`f'_j = \\max_{i \\in B(c_j, r)} h(p_i - c_j, f_i)`.

Two SA layers and a global SA (one MLP over all remaining points, max-pooled) give a global
feature; an MLP head maps it to logits. The paper's SSG classifier uses 512 / 128 centroids,
32 / 64 neighbours and widths 64-64-128 / 128-128-256 / 256-512-1024; the defaults here are
smaller (128 / 32 centroids, 16 neighbours, widths ``w, w, 2w / 2w, 2w, 4w / 4w, 8w, 16w``
with ``w = 32``, head ``8w, 4w``) so a forward pass is cheap on one CPU thread.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .pointnet import check_points
from .registry import MODELS


def farthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Indices ``(B, npoint)`` of the farthest-point sample of clouds ``xyz`` ``(B, N, 3)``, from point 0."""
    b, n, _ = xyz.shape
    if not 1 <= npoint <= n:
        raise ConfigError(f"cannot sample {npoint} of {n} points")
    idx = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    rows = torch.arange(b, device=xyz.device)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    for j in range(npoint):
        idx[:, j] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)  # (B, 1, 3)
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        farthest = dist.argmax(-1)
    return idx


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, k: int) -> torch.Tensor:
    """Indices ``(B, S, k)`` of the first ``k`` points of ``xyz`` within ``radius`` of each centre."""
    b, n, _ = xyz.shape
    d2 = torch.cdist(centres, xyz) ** 2  # (B, S, N)
    idx = torch.arange(n, device=xyz.device).expand_as(d2).clone()
    idx[d2 > radius * radius] = n
    idx = idx.sort(dim=-1).values[..., :min(k, n)]
    if idx.shape[-1] < k:  # fewer points than k in the whole cloud: pad with "none found"
        idx = torch.cat([idx, idx.new_full((*idx.shape[:2], k - idx.shape[-1]), n)], dim=-1)
    first = idx[..., :1].expand_as(idx)
    return torch.where(idx == n, first, idx)


def gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[b, idx[b, ...]]`` for ``values`` ``(B, N, C)`` and ``idx`` ``(B, ...)``."""
    b = values.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(values, 1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*idx.shape, values.shape[-1])


def _mlp2d(c: int, widths: Sequence[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for out in widths:
        layers += [nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers), c


class SetAbstraction(nn.Module):
    """One SA layer: ``npoint`` centroids, ball query of ``k`` within ``radius``, shared MLP, max.

    ``npoint = None`` is the global SA: all points form one group around the origin.
    """

    def __init__(self, npoint: int | None, radius: float, k: int, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.npoint, self.radius, self.k = npoint, float(radius), int(k)
        self.mlp, self.out_features = _mlp2d(in_features + 3, widths)

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, 3)`` points and ``(B, N, C)`` features -> ``(B, S, 3)`` centroids, ``(B, S, C')``."""
        if self.npoint is None:
            grouped = xyz.unsqueeze(1)  # (B, 1, N, 3)
            centres = xyz.new_zeros(xyz.shape[0], 1, 3)
            if feats is not None:
                grouped = torch.cat([grouped, feats.unsqueeze(1)], dim=-1)
        else:
            centres = gather(xyz, farthest_point_sample(xyz.detach(), min(self.npoint, xyz.shape[1])))
            idx = ball_query(xyz.detach(), centres.detach(), self.radius, self.k)  # (B, S, k)
            grouped = gather(xyz, idx) - centres.unsqueeze(2)
            if feats is not None:
                grouped = torch.cat([grouped, gather(feats, idx)], dim=-1)
        h = self.mlp(grouped.permute(0, 3, 1, 2))  # (B, C', S, k)
        return centres, h.amax(dim=3).transpose(1, 2)


class PointNet2(nn.Module):
    """PointNet++ SSG classifier; takes ``(B, N, in_channels)`` clouds, returns ``(B, num_classes)``.

    Args:
        num_classes: number of output logits.
        in_channels: coordinates per point (3: x, y, z; only 3 is supported).
        input_size: nominal points per cloud (recorded for rebuilding).
        width: ``w`` in the module docstring.
        centroids1, centroids2: centroids of the two SA layers.
        radius1, radius2: their ball radii (the clouds lie in the unit sphere).
        neighbours: points per ball.
        dropout: dropout before the classifier (the paper uses 0.5 after each head layer).
        mean, std: accepted for :func:`~fipurify.models.create`, not applied (coordinates are
            geometry here: the ball radii refer to the unit-sphere clouds the datasets give).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 1024, width: int = 32,
                 centroids1: int = 128, centroids2: int = 32, radius1: float = 0.2, radius2: float = 0.4,
                 neighbours: int = 16, dropout: float = 0.4, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        if in_channels != 3:
            raise ConfigError(f"pointnet2 takes x, y, z points (in_channels=3), got {in_channels}")
        for key, v in (("width", width), ("centroids1", centroids1), ("centroids2", centroids2),
                       ("neighbours", neighbours)):
            if v < 1:
                raise ConfigError(f"pointnet2 {key} must be >= 1, got {v}")
        if not (radius1 > 0 and radius2 > 0):
            raise ConfigError(f"pointnet2 radii must be > 0, got {radius1}, {radius2}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"pointnet2 dropout must be in [0, 1), got {dropout}")
        w = width
        self.in_channels = in_channels
        self.input_size = input_size
        self.sa1 = SetAbstraction(centroids1, radius1, neighbours, 0, (w, w, 2 * w))
        self.sa2 = SetAbstraction(centroids2, radius2, neighbours, self.sa1.out_features, (2 * w, 2 * w, 4 * w))
        self.sa3 = SetAbstraction(None, 0.0, 0, self.sa2.out_features, (4 * w, 8 * w, 16 * w))
        self.head = nn.Sequential(
            nn.Linear(self.sa3.out_features, 8 * w, bias=False), nn.BatchNorm1d(8 * w), nn.ReLU(),
            nn.Linear(8 * w, 4 * w, bias=False), nn.BatchNorm1d(4 * w), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (the classifier's input), shape ``(B, 4w)``."""
        check_points(x, self.in_channels, "pointnet2")
        xyz, f = self.sa1(x, None)
        xyz, f = self.sa2(xyz, f)
        _, f = self.sa3(xyz, f)
        return self.head(f.squeeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("pointnet2", PointNet2)
MODELS.alias("pointnet++", "pointnet2")

__all__ = ["PointNet2", "SetAbstraction", "farthest_point_sample", "ball_query", "gather"]
