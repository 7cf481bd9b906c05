"""Deterministic, class-stratified splits: a clean reserve held out of the training set.

The defender's small clean set must never overlap the data the (possibly poisoned)
model was trained on, so the reserve is split off first and its indices are recorded
(with :func:`indices_digest`) for reproducibility.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ConfigError, DataError
from .base import ArrayDataset

# Distinct seed streams, so split_reserve(seed=s) and draw_clean_subset(seed=s) are
# independent draws.
_RESERVE_STREAM = 0x5E5E
_SUBSET_STREAM = 0xC1EA


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def stratified_indices(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices drawn without replacement, each class getting its proportional share.

    Shares are rounded by the largest-remainder rule (ties go to the lower class index),
    so the total is exactly ``k``. Returns the indices sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (k / n)
    take = np.floor(quota).astype(np.int64)
    remainder = k - int(take.sum())
    if remainder:
        # Stable sort on -fraction: equal fractions keep class order.
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:remainder]] += 1
    picked = []
    for cls, t in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        picked.append(members[rng.permutation(len(members))[:t]])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def strata(dataset) -> np.ndarray:
    """The labels a split is stratified by: ``dataset.labels`` when they are one class per item;
    otherwise (multi-hot labels, sentence pairs) one stratum, i.e. a plain seeded random draw."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and np.ndim(labels) == 1 and len(labels) == len(dataset):
        return np.asarray(labels, dtype=np.int64)
    return np.zeros(len(dataset), dtype=np.int64)


def split_reserve(dataset: ArrayDataset, reserve: int | float,
                  seed: int) -> tuple[ArrayDataset, ArrayDataset, np.ndarray]:
    """Split ``dataset`` into ``(train_part, clean_reserve, reserve_indices)``.

    ``reserve`` is a count (1 <= reserve < len) or a fraction in (0, 1). The split is
    stratified by class and fully determined by ``seed``; ``reserve_indices`` are the
    sorted positions of the reserve in ``dataset``. The two parts are disjoint and
    together cover the dataset.
    """
    n = len(dataset)
    seed = _check_seed(seed)
    if isinstance(reserve, bool):
        raise ConfigError(f"reserve must be a count or a fraction, got {reserve!r}")
    if isinstance(reserve, (float, np.floating)):
        if not 0.0 < reserve < 1.0:
            raise ConfigError(f"reserve fraction must lie in (0, 1), got {reserve}")
        k = int(round(float(reserve) * n))
    elif isinstance(reserve, (int, np.integer)):
        k = int(reserve)
    else:
        raise ConfigError(f"reserve must be a count or a fraction, got {reserve!r}")
    if not 1 <= k < n:
        raise DataError(f"cannot reserve {k} of {n} images from {dataset.name}: "
                        f"the reserve needs at least 1 and must leave at least 1 for training")
    rng = np.random.default_rng([seed, _RESERVE_STREAM])
    reserve_idx = stratified_indices(strata(dataset), k, rng)
    mask = np.ones(n, dtype=bool)
    mask[reserve_idx] = False
    train_idx = np.flatnonzero(mask)
    return (dataset.subset(train_idx, name=dataset.name),
            dataset.subset(reserve_idx, name=f"{dataset.name}-reserve"),
            reserve_idx)


def indices_digest(indices: np.ndarray | list[int]) -> str:
    """sha256 hex digest of the indices as little-endian int64 bytes."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def draw_clean_subset(reserve: ArrayDataset, n: int, seed: int, return_indices: bool = False):
    """``n`` images from the clean ``reserve``, stratified by class and fixed by ``seed``.

    With ``return_indices`` returns ``(subset, indices into reserve)``.
    """
    seed = _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"clean subset size must be an integer, got {n!r}")
    if not 1 <= n <= len(reserve):
        raise DataError(f"cannot draw {n} clean images: the reserve {reserve.name} "
                        f"holds {len(reserve)}")
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    idx = stratified_indices(strata(reserve), int(n), rng)
    subset = reserve.subset(idx, name=f"{reserve.name}-clean{int(n)}")
    return (subset, idx) if return_indices else subset


__all__ = ["split_reserve", "indices_digest", "draw_clean_subset", "stratified_indices", "strata"]
