"""Turn what the user has (a batch, a DataLoader, a Dataset) into a fixed list of batches.

Curvature is measured on a *fixed* sample: a shuffling or augmenting loader would give a
different loss (and Hessian) at every pass, so the batches are drawn once and kept.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..curvature.hvp import Batch
from ..errors import DataError

DEFAULT_BATCH = 256


def _check(x: Any, y: Any) -> Batch:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise DataError("inputs must be a tensor with a batch dimension (B x ...)")
    y = torch.as_tensor(y)
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"labels must be a vector with one label per input, got shape {tuple(y.shape)} "
                        f"for {len(x)} inputs")
    return x, y.long()


def as_batches(data: Any, batch_size: int | None = None, device: torch.device | str | None = None,
               limit: int | None = None) -> list[Batch]:
    """A list of ``(x, y)`` batches from ``data``, moved to ``device``.

    ``data`` may be one ``(x, y)`` pair of tensors (kept whole unless ``batch_size`` is
    given), a ``DataLoader`` or any iterable of ``(x, y)`` batches (read once, in order), or
    a map-style ``Dataset`` of ``(image, label)`` (read in order in batches of
    ``batch_size``, default 256). ``limit`` keeps only the first ``limit`` examples.
    Raises :class:`DataError` for anything else or for no data at all.
    """
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = _check(*data)
        step = batch_size or max(len(x), 1)
        batches: Iterable = [(x[i:i + step], y[i:i + step]) for i in range(0, len(x), step)]
    elif isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
            and hasattr(data, "__len__"):
        batches = DataLoader(data, batch_size=batch_size or DEFAULT_BATCH, shuffle=False)
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise DataError("data must be an (inputs, labels) pair, a DataLoader, a list of batches or a Dataset, "
                        f"not {type(data).__name__}")
    out: list[Batch] = []
    seen = 0
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError("every batch must be an (inputs, labels) pair")
        x, y = _check(item[0], item[1])
        if limit is not None:
            x, y = x[:limit - seen], y[:limit - seen]
        if len(x):
            # Contiguous (NCHW) inputs: images permuted from NHWC arrays are channels-last in memory, and
            # torch 2.13's CPU double backward of a convolution on such an input corrupts the heap
            # (seen as "corrupted size vs. prev_size" / a segfault in the first Hessian-vector product).
            x = x.contiguous()
            out.append((x.to(device) if device is not None else x, y.to(device) if device is not None else y))
            seen += len(x)
        if limit is not None and seen >= limit:
            break
    if not out:
        raise DataError("no data to analyse: the batch or dataset is empty")
    return out

