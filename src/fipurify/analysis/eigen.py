"""Largest Hessian eigenvalues (lambda_max and the top k) from an operator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .lanczos import MatVec, lanczos, power_iteration, rademacher

METHODS = ("lanczos", "power")


@dataclass
class EigenResult:
    """Top eigenvalues, largest first. ``residuals`` (Lanczos: ``||H y - theta y||`` bound per
    Ritz pair) or ``converged`` (power iteration) tell how settled they are."""
    values: list[float]
    method: str
    n_products: int
    residuals: list[float] | None = None
    converged: list[bool] | None = None
    smallest: float | None = None

    @property
    def lambda_max(self) -> float:
        return self.values[0]

    def to_dict(self) -> dict:
        return {"lambda_max": self.lambda_max, "values": self.values, "method": self.method,
                "n_products": self.n_products, "residuals": self.residuals, "converged": self.converged,
                "smallest": self.smallest}


def top_eigenvalues(matvec: MatVec, dim: int, k: int = 1, method: str = "lanczos", steps: int = 30,
                    max_iter: int = 100, tol: float = 1e-3, generator: torch.Generator | None = None,
                    progress: bool = False) -> EigenResult:
    """The ``k`` largest eigenvalues of a symmetric operator.

    ``"lanczos"`` (default): ``max(steps, 2k + 10)`` Lanczos steps with full
    re-orthogonalisation; the top Ritz values (algebraically largest) converge first.
    ``"power"``: power iteration with deflation (``max_iter``, ``tol``), which finds the
    largest *magnitude* eigenvalues (the same for the positive-dominated Hessian at a
    trained minimum; use Lanczos if a large negative eigenvalue could be present).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if method == "lanczos":
        m = min(dim, max(steps, 2 * k + 10))
        res = lanczos(matvec, dim, m, v0=rademacher(dim, generator), progress=progress, desc="lambda_max")
        order = torch.argsort(res.ritz_values, descending=True)[:k]
        return EigenResult(values=[float(res.ritz_values[i]) for i in order], method=method,
                           n_products=len(res.alphas), residuals=[float(res.residuals[i]) for i in order],
                           smallest=float(res.ritz_values.min()))
    if method == "power":
        pr = power_iteration(matvec, dim, k, max_iter, tol, generator, progress)
        order = sorted(range(len(pr.values)), key=lambda i: -pr.values[i])
        return EigenResult(values=[pr.values[i] for i in order], method=method,
                           n_products=sum(pr.iterations), converged=[pr.converged[i] for i in order])
    raise ConfigError(f"unknown eigenvalue method {method!r}; choose one of {', '.join(METHODS)}")
