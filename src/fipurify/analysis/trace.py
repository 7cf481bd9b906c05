"""Hutchinson's estimator of a matrix trace from matrix-vector products."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .lanczos import MatVec, rademacher


@dataclass
class TraceEstimate:
    """``value`` = mean of ``samples`` (each ``v^T H v`` for a Rademacher ``v``), with its
    standard error ``stderr = std(samples) / sqrt(n)`` (``nan`` for a single probe)."""
    value: float
    stderr: float
    samples: list[float] = field(default_factory=list)

    @property
    def n_probes(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "n_probes": self.n_probes}


def summarize(samples: list[float]) -> TraceEstimate:
    """Mean and standard error of Hutchinson samples."""
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return TraceEstimate(mean, float("nan"), list(samples))
    var = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return TraceEstimate(mean, math.sqrt(var / n), list(samples))


def hutchinson(matvec: MatVec, dim: int, probes: int = 50, generator: torch.Generator | None = None,
               rtol: float | None = None, min_probes: int = 10, progress: bool = False) -> TraceEstimate:
    """Estimate ``Tr(H) = E[v^T H v]`` over Rademacher vectors ``v``.

    Unbiased; the variance is ``2 * sum_{i != j} H_ij^2`` (zero for a diagonal ``H``). Uses
    ``probes`` products, or stops early once ``stderr <= rtol * |value|`` after at least
    ``min_probes``.
    """
    if probes < 1:
        raise ConfigError(f"Hutchinson needs at least 1 probe, got {probes}")
    samples: list[float] = []
    for _ in tqdm(range(probes), desc="Tr(H)", disable=not progress, leave=False, unit="hvp"):
        v = rademacher(dim, generator)
        samples.append(float(torch.dot(matvec(v).to(torch.float64), v)))
        if rtol is not None and len(samples) >= max(2, min_probes):
            est = summarize(samples)
            if est.stderr <= rtol * abs(est.value):
                break
    return summarize(samples)
