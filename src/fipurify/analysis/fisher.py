"""Tr(F) of a model on a sample, through :func:`fipurify.curvature.fisher.fisher_trace`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..curvature.fisher import fisher_trace
from ..curvature.mode import analysis_mode
from ..errors import ConfigError
from .data import Batch
from .trace import TraceEstimate, summarize


def fisher_trace_on(model: nn.Module, batches: list[Batch], params: Sequence[Tensor],
                    estimator: str = "exact", chunk: int = 32, generator: torch.Generator | None = None,
                    progress: bool = False) -> TraceEstimate:
    """Per-example ``Tr(F)`` averaged over every example of ``batches``, in eval mode.

    The sample is cut into chunks of ``chunk`` examples; each chunk's mean comes from
    ``fisher_trace(..., estimator, create_graph=False)`` (``"exact"``: per-example
    gradients with labels drawn from the model; ``"exact-expected"``: summed over all
    classes, no sampling, C times the cost). ``value`` is the example-weighted mean and
    ``stderr`` the spread of the chunk means (``nan`` with one chunk). ``samples`` are the
    chunk means.
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be at least 1, got {chunk}")
    pieces = [(x[i:i + chunk], y[i:i + chunk]) for x, y in batches for i in range(0, len(x), chunk)]
    means, sizes = [], []
    with analysis_mode(model, params):
        for x, y in tqdm(pieces, desc="Tr(F)", disable=not progress, leave=False, unit="chunk"):
            v = fisher_trace(model, x, list(params), estimator=estimator, create_graph=False,
                             sub_batch=len(x), generator=generator, y=y)
            means.append(float(v))
            sizes.append(len(x))
    est = summarize(means)
    total = sum(sizes)
    est.value = sum(m * s for m, s in zip(means, sizes)) / total
    return est
