"""Loss-surface smoothness analysis (paper section 4, 6.3.1): Hessian spectra, traces, Tr(F), pictures.

Numbers (matrix-free, eval mode, seeded)::

    from fipurify import analysis
    analysis.lambda_max(model, (x, y)).lambda_max          # top Hessian eigenvalue
    analysis.hessian_trace(model, loader)                   # Tr(H) +- standard error
    analysis.eigen_density(model, dataset, params="spectral")   # w.r.t. f-FIP's shifts
    analysis.fisher_trace(model, (x, y))                    # Tr(F)
    analysis.smoothness_report(model, (x, y))               # all of them at once

Tracking during training or purification: :class:`SmoothnessTracker`. Pictures:
:mod:`fipurify.analysis.plot_density`, ``plot_curves``, ``plot_tsne``, ``plot_examples``.
"""
from .data import as_batches
from .density import SpectralDensity, slq, smooth
from .eigen import EigenResult, top_eigenvalues
from ..curvature.hvp import BACKENDS, HessianOperator
from .lanczos import LanczosResult, lanczos, power_iteration
from .measures import (MEASURES, SmoothnessReport, eigen_density, fisher_trace, hessian_operator, hessian_trace,
                       lambda_max, smoothness_report)
from .params import plain_model, spectral_view
from .trace import TraceEstimate, hutchinson
from .tracking import SmoothnessTracker

__all__ = ["BACKENDS", "EigenResult", "HessianOperator", "LanczosResult", "MEASURES", "SmoothnessReport", "SmoothnessTracker",
           "SpectralDensity", "TraceEstimate", "as_batches", "eigen_density", "fisher_trace", "hessian_operator",
           "hessian_trace", "hutchinson", "lambda_max", "lanczos", "plain_model", "power_iteration", "slq",
           "smooth", "smoothness_report", "spectral_view", "top_eigenvalues"]
