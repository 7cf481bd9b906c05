"""3DPC-BA (Xiang et al., ICCV 2021, "A backdoor attack against 3D point cloud classifiers").

The backdoor pattern is a small cluster of points (here ``n_points`` offsets drawn once from
:math:`N(0, \\sigma^2 I)`, :math:`\\sigma` = ``radius``) whose spatial location :math:`c` is
chosen against a surrogate classifier trained on clean data. Poison-label, all-to-one,
5 % of the non-target training clouds by default.

What :meth:`PC3DBA.prepare` does (a cheap stand-in for the paper's location optimisation):

1. train a small PointNet surrogate (width ``surrogate_width``) on at most ``surrogate_samples``
   clean training clouds for ``surrogate_epochs`` epochs (Adam, rotation / scaling / jitter
   augmentation), seeded;
2. starting from ``init_center``, take ``steps`` Adam steps (rate ``step_size``) on
   :math:`c` to minimise the surrogate's cross-entropy towards the target class over
   non-target clouds carrying the cluster,
   :math:`\\min_c \\frac1m \\sum_i -\\log p_s(t \\mid x_i \\oplus (c + o))`, keeping
   :math:`\\lVert c \\rVert \\le` ``max_norm`` (projection after each step): the cluster goes where
   it already pushes clouds towards the target, so the victim learns it easily.

The resulting centre is recorded in the spec (``center``), so :func:`~fipurify.attacks.from_spec`
rebuilds the same trigger without the surrogate. Differences from the paper: the paper
inserts the cluster (the cloud grows by ``n_points``), here it replaces the cloud's points
nearest to :math:`c` (clouds keep ``N`` points, which batching needs); the paper also shapes
the cluster's local geometry to evade point-cloud anomaly detectors and preprocessing, which
is not done here (a plain Gaussian cluster); the surrogate is small and briefly trained.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError
from .base import ATTACKS, Attack, BackdoorTestSet, PoisonedDataset, dataset_labels
from .point_base import ClusterTrigger, place_cluster

INIT_CENTER = (0.0, 0.0, 0.9)


def _positive_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or int(v) != v or int(v) < 1:
        raise ConfigError(f"3dpc-ba {key} must be an integer >= 1, got {v!r}")
    return int(v)


class PC3DBA(Attack):
    """3DPC-BA: a Gaussian cluster of ``n_points`` points at a surrogate-optimised centre."""

    name = "3dpc-ba"
    summary = "Gaussian cluster of points at a surrogate-optimised place"
    task = "pointcloud-classification"
    default_poison_rate = 0.05
    needs_preparation = True

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, n_points: int = 32, radius: float = 0.05,
                 center: Sequence[float] | None = None, init_center: Sequence[float] = INIT_CENTER,
                 max_norm: float = 1.0, steps: int = 30, step_size: float = 0.05,
                 surrogate_width: int = 8, surrogate_epochs: int = 5, surrogate_samples: int = 1024,
                 surrogate_lr: float = 1e-3, batch_size: int = 32):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.n_points, self.radius = _positive_int("n_points", n_points), float(radius)
        self.init_center = [float(v) for v in init_center]
        self.center = None if center is None else [float(v) for v in center]
        self.max_norm, self.step_size = float(max_norm), float(step_size)
        if not (self.max_norm > 0 and self.step_size > 0 and math.isfinite(self.max_norm)):
            raise ConfigError(f"3dpc-ba max_norm and step_size must be > 0, got {max_norm}, {step_size}")
        self.steps = int(steps)
        if self.steps < 0:
            raise ConfigError(f"3dpc-ba steps must be >= 0, got {steps}")
        self.surrogate_width = _positive_int("surrogate_width", surrogate_width)
        self.surrogate_epochs = _positive_int("surrogate_epochs", surrogate_epochs)
        self.surrogate_samples = _positive_int("surrogate_samples", surrogate_samples)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.surrogate_lr = float(surrogate_lr)
        self._build_trigger()

    def _build_trigger(self) -> None:
        where = self.center if self.center is not None else self.init_center
        self.trigger: ClusterTrigger = ClusterTrigger(where, self.radius, self.n_points, "gaussian", self.seed)

    @property
    def prepared(self) -> bool:
        """Whether the cluster centre has been optimised (or given)."""
        return self.center is not None

    # -- preparation ----------------------------------------------------------------------
    def _train_surrogate(self, train_set: Any, n_classes: int, device: Any) -> torch.nn.Module:
        from ..models import create
        from ..tasks.pointcloud import PointCloudClassification

        rng = np.random.default_rng(self.seed)
        n = len(train_set)
        idx = rng.choice(n, size=min(n, self.surrogate_samples), replace=False)
        model = create("pointnet", num_classes=n_classes, width=self.surrogate_width).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=self.surrogate_lr)
        task, gen = PointCloudClassification(), torch.Generator().manual_seed(self.seed)
        loader = DataLoader(Subset(train_set, idx.tolist()), batch_size=self.batch_size, shuffle=True,
                            generator=gen, drop_last=len(idx) > self.batch_size)
        model.train()
        for _ in range(self.surrogate_epochs):
            for x, y in loader:
                x = task.augment(x, gen).to(device)
                loss = F.cross_entropy(model(x), y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    def optimise_center(self, model: torch.nn.Module, clouds: torch.Tensor) -> list[float]:
        """The centre after :attr:`steps` projected Adam steps on the surrogate ``model``."""
        device = next(model.parameters()).device
        clouds = clouds.to(device)
        offsets = self.trigger.offsets.to(device)
        c = torch.tensor(self.init_center, device=device, requires_grad=True)
        opt = torch.optim.Adam([c], lr=self.step_size)
        target = torch.full((len(clouds),), self.target, dtype=torch.long, device=device)
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(self.steps):
            loss = F.cross_entropy(model(place_cluster(clouds, c, offsets)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                norm = c.norm()
                if norm > self.max_norm:
                    c.mul_(self.max_norm / norm)
        return [float(v) for v in c.detach().cpu()]

    def prepare(self, train_set: Any, *, cache_dir: Any = None, device: Any = "cpu",
                progress: bool = False) -> None:
        """Train the surrogate on the clean ``train_set`` and optimise the cluster centre.

        Nothing happens when the centre is already known. ``cache_dir`` is unused (the
        result is three numbers, kept in the spec).
        """
        if self.prepared:
            return
        n_classes = self._bind(train_set)
        labels = dataset_labels(train_set)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self._train_surrogate(train_set, n_classes, device)
            rng = np.random.default_rng(self.seed + 1)
            pool = np.flatnonzero(labels != self.target)
            pick = rng.choice(pool, size=min(len(pool), 4 * self.batch_size), replace=False)
            clouds = torch.stack([train_set[int(i)][0] for i in pick])
            self.center = self.optimise_center(model, clouds)
        self._build_trigger()

    # -- datasets -------------------------------------------------------------------------
    def poison(self, dataset: Any) -> PoisonedDataset:
        """Poison ``dataset`` (running :meth:`prepare` on it first when needed)."""
        self.prepare(dataset)
        return super().poison(dataset)

    def backdoor_test_set(self, dataset: Any) -> BackdoorTestSet:
        if not self.prepared:
            raise ConfigError("3dpc-ba: optimise the cluster first (attack.prepare(train_set) or "
                              "attack.poison(train_set)), or give center=")
        return super().backdoor_test_set(dataset)

    def _spec_args(self) -> dict:
        return {"n_points": self.n_points, "radius": self.radius, "center": self.center,
                "init_center": list(self.init_center), "max_norm": self.max_norm, "steps": self.steps,
                "step_size": self.step_size, "surrogate_width": self.surrogate_width,
                "surrogate_epochs": self.surrogate_epochs, "surrogate_samples": self.surrogate_samples,
                "surrogate_lr": self.surrogate_lr, "batch_size": self.batch_size}


ATTACKS.register(PC3DBA.name, PC3DBA)
