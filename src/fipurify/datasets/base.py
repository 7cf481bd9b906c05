"""In-memory image datasets: uint8 arrays in, float C x H x W tensors in [0, 1] out."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..registry import Registry


class ArrayDataset(Dataset):
    """Images held as one uint8 array of shape N x H x W x C and integer labels.

    ``dataset[i]`` returns ``(image, label)`` with ``image`` a float32 tensor of shape
    C x H x W in [0, 1] and ``label`` a Python int. Models carry their own input
    normalisation, so triggers can act directly in this pixel space.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                 classes: Sequence[str] | None = None, name: str = "array"):
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim == 3:  # grey-scale N x H x W
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(f"{name}: images must have shape N x H x W x C, got {images.shape}")
        if images.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8, got {images.dtype}")
        if classes is None:
            classes = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
        self._check_labels(name, len(images), labels, classes)
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.name = name

    @staticmethod
    def _check_labels(name: str, n: int, labels: np.ndarray, classes: Sequence[str], items: str = "images") -> None:
        """DataError unless ``labels`` has one class index in [0, len(classes) - 1] for each of ``n`` items."""
        if n != len(labels):
            raise DataError(f"{name}: {n} {items} but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{name}: labels must lie in [0, {len(classes) - 1}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one returned image, C x H x W."""
        n, h, w, c = self.images.shape
        return (c, h, w)

    def __len__(self) -> int:
        return len(self.labels)

    # Hooks for subclasses that store other items or targets (MultiLabelArrayDataset, VideoArrayDataset):
    #: the attribute holding the uint8 items, and the permutation of one stored item to the returned
    #: tensor (here H x W x C -> C x H x W).
    _items_attr = "images"
    _item_axes = (2, 0, 1)

    def _target(self, index: int):
        """The label returned with item ``index``."""
        return int(self.labels[index])

    def _subset_class(self) -> type:
        """The class :meth:`subset` builds (the first of the family, whose constructor it knows)."""
        return ArrayDataset

    def __getitem__(self, index: int):
        items = getattr(self, self._items_attr)
        img = torch.from_numpy(items[index]).permute(*self._item_axes).float().div_(255.0)
        return img, self._target(index)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "ArrayDataset":
        """A new dataset of the same kind (:meth:`_subset_class`) holding only ``indices`` (copies the rows)."""
        idx = np.asarray(indices, dtype=np.int64)
        items = getattr(self, self._items_attr)
        return self._subset_class()(items[idx], self.labels[idx], self.classes, name or self.name)

    def __repr__(self) -> str:
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, "
                f"shape={self.image_shape}, classes={self.num_classes})")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset; None where they depend on the files."""

    name: str
    num_classes: int | None
    image_size: int | None
    channels: int | None
    #: whether a horizontal flip keeps an image's label (False for traffic signs: a mirrored
    #: "keep left" is "keep right"); defenses named with this dataset then train without flips
    flip: bool = True

    def __getitem__(self, key: str):
        # Also usable like a dict: info["num_classes"].
        return getattr(self, key)


#: Datasets by name: each dataset module registers a loader ``(root, split, **options) -> ArrayDataset``
#: with its :class:`DatasetInfo` (``DATASETS.register("gtsrb", loader, info=DatasetInfo(...))``).
DATASETS = Registry("dataset", normalize=lambda name: str(name).lower())


def check_options(dataset: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """ConfigError naming the keyword ``options`` that loader ``fn`` does not take."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        accepted = [p for p in params if p not in ("root", "split")]
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for dataset {dataset}; "
                          f"accepted: {', '.join(accepted)}")


def loader(dataset: str, fn: Callable[..., ArrayDataset]) -> Callable[..., ArrayDataset]:
    """A registry loader calling ``fn(root, split=split, **options)`` after checking ``options``."""
    def load(root: Any, split: str | None, **options: Any) -> ArrayDataset:
        check_options(dataset, fn, options)
        return fn(root, split=split, **options)
    return load
