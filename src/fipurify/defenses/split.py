"""Seeded hold-out split of a clean set (for per-epoch clean accuracy, never test data)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset


def holdout_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """``(train, holdout)`` with ``round(fraction * n)`` images held out (None when 0)."""
    n = len(data)
    k = int(round(fraction * n))
    if k == 0 or n - k < 1:
        return data, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train, hold = Subset(data, sorted(perm[k:])), Subset(data, sorted(perm[:k]))
    for s in (train, hold):  # keep the class count visible to checks downstream
        s.num_classes = getattr(data, "num_classes", None)
    return train, hold
