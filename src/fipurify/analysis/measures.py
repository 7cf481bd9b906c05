"""The smoothness measures of the paper (section 4, Table 6) on a model and a sample.

``lambda_max`` (top Hessian eigenvalues), ``hessian_trace`` (Hutchinson, with its
standard error), ``eigen_density`` (SLQ) and ``fisher_trace`` (Tr(F)), each with respect
to all weights (``params="all"``), f-FIP's spectral shifts (``params="spectral"``) or a
list of parameters. The Hessian is that of the mean cross-entropy over the sample with
its given labels, the model in eval mode; nothing about the model is changed.
:func:`smoothness_report` computes several of them on one shared operator.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..curvature.hvp import HessianOperator
from ..errors import ConfigError
from .data import as_batches
from .density import SpectralDensity, slq
from .eigen import EigenResult, top_eigenvalues
from .fisher import fisher_trace_on
from .params import ParamSpec, resolve
from .trace import TraceEstimate, hutchinson

# Independent random streams per measure, so a measure's value does not depend on
# which other measures were computed before it.
_STREAM = {"eigen": 0, "trace": 1, "density": 2, "fisher": 3}


def _gen(seed: int, measure: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1000003 + _STREAM[measure])


@contextlib.contextmanager
def hessian_operator(model: nn.Module, data: Any, params: ParamSpec = "all", batch_size: int | None = None,
                     limit: int | None = None, backend: str = "autograd",
                     cache_graph: bool | None = None) -> Iterator[HessianOperator]:
    """An :class:`HessianOperator` for ``model`` on ``data``, valid inside the block.

    ``params="spectral"`` attaches f-FIP's parametrisation for the block and removes it
    afterwards (the model is left bit-for-bit unchanged).
    """
    with resolve(model, params) as (m, plist):
        device = plist[0].device
        batches = as_batches(data, batch_size, device, limit)
        op = HessianOperator(m, batches, plist, backend=backend, cache_graph=cache_graph)
        try:
            yield op
        finally:
            op.release()


def lambda_max(model: nn.Module, data: Any, *, k: int = 1, method: str = "lanczos", steps: int = 30,
               max_iter: int = 100, tol: float = 1e-3, params: ParamSpec = "all", seed: int = 0,
               batch_size: int | None = None, backend: str = "autograd", progress: bool = False) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues (``.lambda_max`` is the first); see :func:`top_eigenvalues`."""
    with hessian_operator(model, data, params, batch_size, backend=backend) as op:
        return top_eigenvalues(op.matvec, op.dim, k, method, steps, max_iter, tol, _gen(seed, "eigen"), progress)


def hessian_trace(model: nn.Module, data: Any, *, probes: int = 50, rtol: float | None = None,
                  params: ParamSpec = "all", seed: int = 0, batch_size: int | None = None,
                  backend: str = "autograd", progress: bool = False) -> TraceEstimate:
    """``Tr(H)`` by Hutchinson's estimator with ``probes`` Rademacher vectors, and its standard error."""
    with hessian_operator(model, data, params, batch_size, backend=backend) as op:
        return hutchinson(op.matvec, op.dim, probes, _gen(seed, "trace"), rtol=rtol, progress=progress)


def eigen_density(model: nn.Module, data: Any, *, runs: int = 3, steps: int = 40, grid_points: int = 1000,
                  bandwidth: float = 0.01, params: ParamSpec = "all", seed: int = 0,
                  batch_size: int | None = None, backend: str = "autograd",
                  progress: bool = False) -> SpectralDensity:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (grid, density, raw Ritz data)."""
    with hessian_operator(model, data, params, batch_size, backend=backend) as op:
        return slq(op.matvec, op.dim, runs, steps, _gen(seed, "density"), grid_points, bandwidth, progress)


def fisher_trace(model: nn.Module, data: Any, *, params: ParamSpec = "all", estimator: str = "exact",
                 chunk: int = 32, seed: int = 0, batch_size: int | None = None,
                 progress: bool = False) -> TraceEstimate:
    """Per-example ``Tr(F)`` of the model's predictive distribution over the sample (see
    :func:`fipurify.analysis.fisher.fisher_trace_on`); the sample's labels are used only by
    ``estimator="empirical"``."""
    with resolve(model, params) as (m, plist):
        batches = as_batches(data, batch_size, plist[0].device)
        return fisher_trace_on(m, batches, plist, estimator, chunk, _gen(seed, "fisher"), progress)


@dataclass
class SmoothnessReport:
    """Everything :func:`smoothness_report` measured (``None`` where not asked for)."""
    n_examples: int
    n_params: int
    params: str
    loss: float
    eigen: EigenResult | None = None
    trace: TraceEstimate | None = None
    density: SpectralDensity | None = None
    fisher: TraceEstimate | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    n_products: int = 0

    @property
    def lambda_max(self) -> float | None:
        return self.eigen.lambda_max if self.eigen else None

    def to_dict(self, density: bool = True) -> dict[str, Any]:
        """JSON-ready numbers; ``density=False`` leaves the density arrays out."""
        return {"n_examples": self.n_examples, "n_params": self.n_params, "params": self.params,
                "loss": self.loss, "lambda_max": self.lambda_max,
                "eigen": self.eigen.to_dict() if self.eigen else None,
                "trace_h": self.trace.to_dict() if self.trace else None,
                "trace_f": self.fisher.to_dict() if self.fisher else None,
                "density": self.density.to_dict() if self.density and density else None,
                "seconds": self.seconds, "n_products": self.n_products}


MEASURES = ("lambda_max", "trace", "density", "fisher")


def smoothness_report(model: nn.Module, data: Any, *, measures: tuple[str, ...] = MEASURES,
                      params: ParamSpec = "all", top_k: int = 1, lanczos_steps: int = 30, probes: int = 50,
                      slq_runs: int = 3, slq_steps: int = 40, fisher_estimator: str = "exact", seed: int = 0,
                      batch_size: int | None = None, backend: str = "autograd",
                      progress: bool = False) -> SmoothnessReport:
    """Compute the chosen ``measures`` on one Hessian operator (one cached gradient graph).

    Costs about ``lanczos_steps + probes + slq_runs * slq_steps`` Hessian-vector products
    plus one per-example-gradient pass for Tr(F).
    """
    bad = sorted(set(measures) - set(MEASURES))
    if bad:
        raise ConfigError(f"unknown measure(s) {', '.join(bad)}; choose from {', '.join(MEASURES)}")
    label = params if isinstance(params, str) else ("all" if params is None else "custom")
    secs: dict[str, float] = {}
    with hessian_operator(model, data, params, batch_size, backend=backend) as op:
        rep = SmoothnessReport(op.n_examples, op.dim, label, op.loss_value())
        if "lambda_max" in measures:
            t0 = time.perf_counter()
            rep.eigen = top_eigenvalues(op.matvec, op.dim, top_k, "lanczos", lanczos_steps,
                                        generator=_gen(seed, "eigen"), progress=progress)
            secs["lambda_max"] = time.perf_counter() - t0
        if "trace" in measures:
            t0 = time.perf_counter()
            rep.trace = hutchinson(op.matvec, op.dim, probes, _gen(seed, "trace"), progress=progress)
            secs["trace"] = time.perf_counter() - t0
        if "density" in measures:
            t0 = time.perf_counter()
            rep.density = slq(op.matvec, op.dim, slq_runs, slq_steps, _gen(seed, "density"), progress=progress)
            secs["density"] = time.perf_counter() - t0
        rep.n_products = op.n_products
        if "fisher" in measures:
            op.release()  # free the gradient graph before the per-example pass
            t0 = time.perf_counter()
            rep.fisher = fisher_trace_on(op.model, op.batches, op.params, fisher_estimator,
                                         generator=_gen(seed, "fisher"), progress=progress)
            secs["fisher"] = time.perf_counter() - t0
    rep.seconds = secs
    return rep
