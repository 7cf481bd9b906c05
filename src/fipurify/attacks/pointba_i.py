"""PointBA-I (Li et al., ICCV 2021, "PointPBA-I"): an interaction trigger, a small ball of points at a fixed place.

Poison-label, all-to-one by default: 5 % of the non-target training clouds get the trigger and
the target label. The trigger is a :class:`~fipurify.attacks.point_base.ClusterTrigger`:
``n_points`` points uniform in a ball of radius ``radius`` around ``center`` (in the unit-sphere
coordinates the datasets give) replace the cloud's points nearest to ``center``, so the cloud
keeps its ``N`` points. The default centre, ``(0, 0, 0.9)``, lies on the up (z) axis, which the
training augmentation (rotation about z) leaves fixed; the ball pattern is drawn from ``seed``.

The ball's points replace existing ones rather than being added, so every cloud keeps the same
number of points (which batching needs); the replaced points are the nearest to the centre, a
choice that depends on the set of points, not on their order.
"""
from __future__ import annotations

from typing import Sequence

from .base import ATTACKS, Attack
from .point_base import ClusterTrigger


class PointBAI(Attack):
    """PointBA-I: a ball of ``n_points`` points of radius ``radius`` at ``center``."""

    name = "pointba-i"
    summary = "ball of points at a fixed place"
    task = "pointcloud-classification"
    default_poison_rate = 0.05

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, center: Sequence[float] = (0.0, 0.0, 0.9),
                 radius: float = 0.05, n_points: int = 32):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.trigger: ClusterTrigger = ClusterTrigger(center, radius, n_points, "ball", self.seed)

    def _spec_args(self) -> dict:
        t = self.trigger
        return {"center": list(t.center), "radius": t.radius, "n_points": t.n_points}


ATTACKS.register(PointBAI.name, PointBAI)
ATTACKS.alias("pointpba-i", PointBAI.name)  # the paper's name for the poison-label attacks
