"""PointCBA (Li et al., ICCV 2021, "PointBA"): clean-label; here with a stronger PointBA-I ball trigger.

Only clouds of the target class are poisoned and no label changes: the model learns the
trigger as a feature of the target class because every triggered training cloud is one.
A clean-label trigger competes with the class's own shape features, so it is stronger than
PointBA-I's: by default 64 points (of 1,024) in a ball of radius 0.1 at ``(0, 0, 0.9)`` (on
the up axis, fixed by the rotation augmentation), placed as
:class:`~fipurify.attacks.point_base.ClusterTrigger` does.

``poison_rate`` is the share of the WHOLE training set that is poisoned (5 % by default, as for
the poison-label attacks), all drawn from the target class: ``round(poison_rate * n)`` clouds,
a ConfigError if the target class has fewer. (The image clean-label attacks count a share of
the target class instead.) The backdoor test set is the non-target test clouds with the trigger.

Difference from the paper: Li et al.'s PointCBA also optimises the poisoned target-class clouds
("feature disentanglement": a bounded perturbation against a surrogate so that the trigger,
not the shape, carries the class) and reports about 50 % ASR; that optimisation is not done
here, only the trigger (the interaction ball, enlarged) is added to unmodified clouds.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack, PoisonedDataset, dataset_labels
from .point_base import ClusterTrigger


class PointCBA(Attack):
    """Clean-label ball trigger: ``n_points`` points of radius ``radius`` at ``center``."""

    name = "pointcba"
    summary = "clean-label: ball of points at a fixed place"
    task = "pointcloud-classification"
    clean_label = True
    default_poison_rate = 0.05

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, center: Sequence[float] = (0.0, 0.0, 0.9),
                 radius: float = 0.1, n_points: int = 64):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.trigger: ClusterTrigger = ClusterTrigger(center, radius, n_points, "ball", self.seed)

    def choose(self, labels: np.ndarray) -> np.ndarray:
        """The sorted indices poisoned: ``round(poison_rate * n)`` target-class clouds, seeded."""
        candidates = np.flatnonzero(labels == self.target)
        k = round(self.poison_rate * len(labels))
        if k == 0:
            raise ConfigError(f"poison_rate {self.poison_rate} of {len(labels)} clouds poisons none; raise the rate")
        if len(candidates) == 0:
            raise DataError(f"{self.name}: the dataset has no samples of target class {self.target} to poison")
        if k > len(candidates):
            raise ConfigError(f"{self.name}: poison_rate {self.poison_rate} asks for {k} clouds but the "
                              f"target class {self.target} has {len(candidates)}")
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(candidates, size=k, replace=False))

    def poison(self, dataset: Any) -> PoisonedDataset:
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        flags = np.zeros(len(labels), dtype=bool)
        flags[self.choose(labels)] = True
        return PoisonedDataset(dataset, self.trigger, flags, labels.copy(), labels, n_classes)

    def _spec_args(self) -> dict:
        t = self.trigger
        return {"center": list(t.center), "radius": t.radius, "n_points": t.n_points}


ATTACKS.register(PointCBA.name, PointCBA)
