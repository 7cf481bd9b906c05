"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

For a random unit vector ``q``, ``m`` Lanczos steps give nodes ``theta_j`` and weights
``tau_j`` with ``sum_j tau_j f(theta_j) ~ q^T f(H) q`` (exact for polynomials of degree
< 2m). Averaged over probes, this approximates ``(1/N) sum_i f(lambda_i)``: the spectral
density, smoothed here with a Gaussian kernel (Ghorbani et al., 2019; Yao et al., 2020).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .lanczos import MatVec, lanczos, rademacher


@dataclass
class SpectralDensity:
    """A smoothed eigenvalue density and the raw quadrature it was made from.

    ``grid`` / ``density``: the density on an even grid (integrates to about 1).
    ``ritz_values[r]`` / ``ritz_weights[r]``: nodes and weights of probe ``r`` (each
    weight vector sums to 1). ``sigma``: the kernel's standard deviation.
    ``dim``: the number of parameters (the Hessian's size).
    """
    grid: np.ndarray
    density: np.ndarray
    ritz_values: list[np.ndarray]
    ritz_weights: list[np.ndarray]
    sigma: float
    dim: int

    def moment(self, k: int) -> float:
        """Quadrature estimate of ``(1/N) Tr(H^k)`` (k = 1: the mean eigenvalue)."""
        return float(np.mean([np.sum(w * v ** k) for v, w in zip(self.ritz_values, self.ritz_weights)]))

    def trace(self) -> float:
        """The SLQ estimate of ``Tr(H) = N * moment(1)``."""
        return self.dim * self.moment(1)

    def support(self) -> tuple[float, float]:
        """Smallest and largest Ritz value over all probes."""
        allv = np.concatenate(self.ritz_values)
        return float(allv.min()), float(allv.max())

    def to_dict(self) -> dict:
        return {"grid": self.grid.tolist(), "density": self.density.tolist(),
                "ritz_values": [v.tolist() for v in self.ritz_values],
                "ritz_weights": [w.tolist() for w in self.ritz_weights], "sigma": self.sigma, "dim": self.dim}


def slq(matvec: MatVec, dim: int, runs: int = 3, steps: int = 40, generator: torch.Generator | None = None,
        grid_points: int = 1000, bandwidth: float = 0.01, progress: bool = False) -> SpectralDensity:
    """Run ``runs`` Lanczos probes of ``steps`` steps and smooth the quadrature into a density.

    ``bandwidth`` sets the Gaussian kernel width relative to the spectrum's range.
    """
    if runs < 1:
        raise ConfigError(f"SLQ needs at least 1 run, got {runs}")
    values, weights = [], []
    for r in tqdm(range(runs), desc="density (SLQ)", disable=not progress or runs == 1, leave=False, unit="run"):
        res = lanczos(matvec, dim, steps, v0=rademacher(dim, generator), progress=progress,
                      desc=f"SLQ run {r + 1}/{runs}")
        values.append(res.ritz_values.numpy())
        weights.append(res.ritz_weights.numpy())
    return smooth(values, weights, dim, grid_points, bandwidth)


def smooth(values: list[np.ndarray], weights: list[np.ndarray], dim: int, grid_points: int = 1000,
           bandwidth: float = 0.01) -> SpectralDensity:
    """Gaussian-kernel density from quadrature nodes/weights, averaged over probes."""
    if not bandwidth > 0 or grid_points < 2:
        raise ConfigError("bandwidth must be > 0 and grid_points >= 2")
    allv = np.concatenate(values)
    lo, hi = float(allv.min()), float(allv.max())
    width = max(hi - lo, 1e-12 * max(1.0, abs(hi)), 1e-12)
    sigma = bandwidth * width
    pad = 5 * sigma  # nearly all kernel mass falls inside the grid
    grid = np.linspace(lo - pad, hi + pad, grid_points)
    dens = np.zeros_like(grid)
    for v, w in zip(values, weights):
        z = (grid[:, None] - v[None, :]) / sigma
        dens += (np.exp(-0.5 * z ** 2) * w[None, :]).sum(1)
    dens /= len(values) * sigma * math.sqrt(2 * math.pi)
    return SpectralDensity(grid, dens, [np.asarray(v) for v in values], [np.asarray(w) for w in weights],
                           sigma, dim)
