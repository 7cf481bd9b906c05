"""Lanczos tridiagonalisation and power iteration for a symmetric operator given as ``matvec``.

Vectors are kept in float64 (the products may run in float32): the three-term recurrence
and the re-orthogonalisation lose accuracy quickly in single precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LanczosResult:
    """Output of :func:`lanczos`.

    ``alphas`` (m) and ``betas`` (m - 1) define the tridiagonal ``T``; ``ritz_values``
    are its eigenvalues (ascending) and ``ritz_weights`` the squared first components of
    its eigenvectors (they sum to 1): the nodes and weights of the Gauss quadrature of
    the start vector's spectral measure. ``residuals[j]`` bounds ``||H y_j - theta_j y_j||``
    for the Ritz vector ``y_j``. ``vectors`` (m x dim) is the Krylov basis when kept.
    """
    alphas: Tensor
    betas: Tensor
    ritz_values: Tensor
    ritz_weights: Tensor
    residuals: Tensor
    vectors: Tensor | None = None

    def ritz_vectors(self, idx: Tensor | list[int]) -> Tensor:
        """Ritz vectors (rows) for the given indices into ``ritz_values``; needs ``vectors``."""
        if self.vectors is None:
            raise ConfigError("the Krylov basis was not kept (pass keep_vectors=True)")
        _, s = torch.linalg.eigh(self.tridiagonal())
        return s[:, idx].T @ self.vectors

    def tridiagonal(self) -> Tensor:
        t = torch.diag(self.alphas)
        if len(self.betas):
            t += torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t


def lanczos(matvec: MatVec, dim: int, steps: int, v0: Tensor | None = None,
            generator: torch.Generator | None = None, keep_vectors: bool = False,
            reorthogonalize: bool = True, progress: bool = False, desc: str = "lanczos") -> LanczosResult:
    """``steps`` Lanczos iterations from ``v0`` (default: a Rademacher vector from ``generator``).

    Full re-orthogonalisation (default) keeps the basis orthogonal so that no spurious
    copies of converged eigenvalues appear; it stores ``steps`` vectors of length ``dim``.
    Stops early if the Krylov space becomes invariant (then fewer than ``steps`` Ritz
    values are returned; they are then exact eigenvalues).
    """
    if steps < 1:
        raise ConfigError(f"Lanczos needs at least 1 step, got {steps}")
    steps = min(steps, dim)
    if v0 is None:
        v0 = rademacher(dim, generator)
    q = v0.detach().to(torch.float64).flatten()
    if q.shape != (dim,):
        raise ConfigError(f"start vector has {q.numel()} entries, the operator {dim}")
    norm = q.norm()
    if not norm > 0:
        raise ConfigError("the Lanczos start vector is zero")
    q = q / norm
    basis: list[Tensor] = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    prev = torch.zeros_like(q)
    beta = q.new_zeros(())
    tol = 1e-10
    for j in tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="hvp"):
        w = matvec(q).to(torch.float64)
        alpha = torch.dot(w, q)
        alphas.append(alpha)
        w = w - alpha * q - beta * prev
        if reorthogonalize:
            qs = torch.stack(basis)
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                w = w - qs.T @ (qs @ w)
        beta = w.norm()
        if j == steps - 1:
            betas.append(beta)  # kept only for the residual bounds
            break
        if beta <= tol * max(1.0, float(alpha.abs())):
            betas.append(beta)
            break
        betas.append(beta)
        prev, q = q, w / beta
        if reorthogonalize or keep_vectors:
            basis.append(q)
        else:
            basis = [q]
    a = torch.stack(alphas)
    b_all = torch.stack(betas)
    b = b_all[:len(a) - 1]
    t = torch.diag(a)
    if len(b):
        t += torch.diag(b, 1) + torch.diag(b, -1)
    theta, s = torch.linalg.eigh(t)
    vectors = torch.stack(basis[:len(a)]) if keep_vectors else None
    return LanczosResult(alphas=a, betas=b, ritz_values=theta, ritz_weights=s[0] ** 2,
                         residuals=(b_all[len(a) - 1] * s[-1]).abs(), vectors=vectors)


def rademacher(dim: int, generator: torch.Generator | None = None) -> Tensor:
    """A float64 vector of independent +-1 entries (drawn on the CPU, so seeds agree across devices)."""
    return torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1


@dataclass
class PowerResult:
    """Top eigenvalues (by magnitude, deflated one after another) from :func:`power_iteration`."""
    values: list[float]
    vectors: list[Tensor]
    iterations: list[int]
    converged: list[bool]


def power_iteration(matvec: MatVec, dim: int, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    generator: torch.Generator | None = None, progress: bool = False) -> PowerResult:
    """The ``k`` eigenvalues of largest magnitude, by power iteration with deflation.

    Each later eigenvector is sought orthogonal to the earlier ones. Iteration stops when
    the Rayleigh quotient changes by less than ``tol`` relative to its size.
    """
    if k < 1 or max_iter < 1:
        raise ConfigError("k and max_iter must be at least 1")
    values: list[float] = []
    vectors: list[Tensor] = []
    iters: list[int] = []
    conv: list[bool] = []
    bar = tqdm(total=k * max_iter, desc="power iteration", disable=not progress, leave=False, unit="hvp")
    try:
        for _ in range(min(k, dim)):
            v = torch.randn(dim, generator=generator, dtype=torch.float64)
            v = _orth(v, vectors)
            v = v / v.norm()
            value, done, it = None, False, 0
            for it in range(1, max_iter + 1):
                hv = _orth(matvec(v).to(torch.float64), vectors)
                new = float(torch.dot(hv, v))
                bar.update(1)
                nrm = hv.norm()
                if not nrm > 0:
                    value, done = new, True
                    break
                v = hv / nrm
                if value is not None and abs(new - value) <= tol * (abs(value) + 1e-12):
                    value, done = new, True
                    break
                value = new
            values.append(float(value))
            vectors.append(v)
            iters.append(it)
            conv.append(done)
    finally:
        bar.close()
    return PowerResult(values, vectors, iters, conv)


def _orth(v: Tensor, basis: list[Tensor]) -> Tensor:
    for b in basis:
        v = v - torch.dot(v, b) * b
    return v
