"""Datasets: CIFAR-10, GTSRB, any image folder and a synthetic set, all as ArrayDataset.

``load(name, root=None, split="train", **kw)`` is the one entry point; the data root is
found by :func:`resolve_root` (explicit root, ``$FIPURIFY_DATA``, or ``../shared/data``)
and decoded arrays are cached under :func:`cache_dir`.
"""
from __future__ import annotations

from pathlib import Path

from ..registry import discover
from .base import DATASETS, ArrayDataset, DatasetInfo
from .cifar10 import CIFAR10_CLASSES, download_cifar10, load_cifar10
from .gtsrb import GTSRB_CLASSES, load_gtsrb
from .imagefolder import load_imagefolder
from .roots import cache_dir, resolve_root
from .split import draw_clean_subset, indices_digest, split_reserve
from .synthetic import synthetic

discover(__name__)  # any other dataset module registers itself too


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, image size (pixels per side) and channels of a named dataset."""
    return DATASETS.entry(name).info


def load(name: str, root: str | Path | None = None, split: str | None = "train", **kw) -> ArrayDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as an ArrayDataset.

    * ``cifar10`` / ``gtsrb``: ``root`` is the data root (see :func:`resolve_root`);
      extra keywords: ``cache`` (and ``size`` for gtsrb).
    * ``imagefolder``: ``root`` (or ``path=``) is the folder holding ``split/<class>/*``
      (``split=None`` for ``root/<class>/*``); keywords ``classes``, ``size``, ``cache``.
    * ``synthetic``: keywords go to :func:`synthetic`; ``root`` is ignored.

    Missing data raises DataError naming what was looked for and where.
    """
    return DATASETS.get(name)(root, split, **kw)


__all__ = ["ArrayDataset", "DATASETS", "DatasetInfo", "dataset_info", "load", "synthetic",
           "split_reserve", "draw_clean_subset", "indices_digest", "resolve_root", "cache_dir",
           "download_cifar10", "load_cifar10", "load_gtsrb", "load_imagefolder"]
