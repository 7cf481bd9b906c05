"""Datasets: CIFAR-10, GTSRB, any image folder and a synthetic set, all as ArrayDataset.

``load(name, root=None, split="train", **kw)`` is the one entry point; the data root is
found by :func:`resolve_root` (explicit root, ``$FIPURIFY_DATA``, or ``../shared/data``)
and decoded arrays are cached under :func:`cache_dir`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .base import ArrayDataset
from .cifar10 import CIFAR10_CLASSES, download_cifar10, load_cifar10
from .gtsrb import GTSRB_CLASSES, load_gtsrb
from .imagefolder import load_imagefolder
from .roots import cache_dir, resolve_root
from .split import draw_clean_subset, indices_digest, split_reserve
from .synthetic import synthetic

DATASETS = ("cifar10", "gtsrb", "imagefolder", "synthetic")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset; None where they depend on the files."""

    name: str
    num_classes: int | None
    image_size: int | None
    channels: int | None

    def __getitem__(self, key: str):
        # Also usable like a dict: info["num_classes"].
        return getattr(self, key)


_INFO = {
    "cifar10": DatasetInfo("cifar10", len(CIFAR10_CLASSES), 32, 3),
    "gtsrb": DatasetInfo("gtsrb", len(GTSRB_CLASSES), 32, 3),
    "imagefolder": DatasetInfo("imagefolder", None, None, 3),
    "synthetic": DatasetInfo("synthetic", 4, 16, 3),  # synthetic()'s defaults
}


def _check_name(name: str) -> str:
    key = str(name).lower()
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, image size (pixels per side) and channels of a named dataset."""
    return _INFO[_check_name(name)]


def load(name: str, root: str | Path | None = None, split: str | None = "train", **kw) -> ArrayDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as an ArrayDataset.

    * ``cifar10`` / ``gtsrb``: ``root`` is the data root (see :func:`resolve_root`);
      extra keywords: ``cache`` (and ``size`` for gtsrb).
    * ``imagefolder``: ``root`` (or ``path=``) is the folder holding ``split/<class>/*``
      (``split=None`` for ``root/<class>/*``); keywords ``classes``, ``size``, ``cache``.
    * ``synthetic``: keywords go to :func:`synthetic`; ``root`` is ignored.

    Missing data raises DataError naming what was looked for and where.
    """
    key = _check_name(name)
    if key == "cifar10":
        return _call(key, load_cifar10, root, split=split, **kw)
    if key == "gtsrb":
        return _call(key, load_gtsrb, root, split=split, **kw)
    if key == "imagefolder":
        path = kw.pop("path", None)
        folder = root if root is not None else path
        if folder is None:
            raise ConfigError("imagefolder needs a folder: load('imagefolder', root=PATH)")
        return _call(key, load_imagefolder, folder, split=split, **kw)
    return _call(key, synthetic, split=split or "train", **kw)


def _call(name: str, fn, *args, **kw):
    """Call a loader, turning unknown keyword options into a ConfigError."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        accepted = [p for p in params if p not in ("root", "split")]
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for dataset {name}; "
                          f"accepted: {', '.join(accepted)}")
    return fn(*args, **kw)


__all__ = ["ArrayDataset", "DATASETS", "DatasetInfo", "dataset_info", "load", "synthetic",
           "split_reserve", "draw_clean_subset", "indices_digest", "resolve_root", "cache_dir",
           "download_cifar10", "load_cifar10", "load_gtsrb", "load_imagefolder"]
