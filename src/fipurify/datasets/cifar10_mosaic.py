"""CIFAR-10 mosaics: a multi-label STAND-IN for the multi-label benchmarks (VOC, MS-COCO).

The FIP paper's Table 2 purifies multi-label classifiers trained on PASCAL VOC and
MS-COCO; neither is available offline here. ``cifar10-mosaic`` builds a multi-label
problem from real CIFAR-10 images instead: each item is a 2 x 2 mosaic of four CIFAR-10
images drawn (with replacement) from a base split, and its label is the SET of their
classes as a multi-hot vector :math:`y \\in \\{0, 1\\}^{10}`,

.. math::  y_k = 1 \\iff k \\in \\{c_1, c_2, c_3, c_4\\},

so an item has 1 to 4 positive labels (a class may fill several tiles, as an object
class may occur several times in a VOC image). It is a stand-in, not a reproduction:
the objects never overlap, always fill a quadrant and co-occur at random, whereas real
scenes have structured co-occurrence (which the clean-image attack exploits there too).

Size: each 32 x 32 source image is area-downsampled 2 x (mean of 2 x 2 pixel blocks) to a
16 x 16 tile, so a mosaic is 32 x 32 like a CIFAR-10 image: every CIFAR model and the
crop/flip augmentation apply unchanged, and a training step costs what a CIFAR-10 step
costs (a 64 x 64 mosaic, ``tile=32``, keeps the full CIFAR-10 resolution and costs about
4 x as much per step: 49 s against 11 s for a PreActResNet-18 step on 64 mosaics, one CPU
thread). The price is detail: a 16 x 16 object is harder to recognise than a 32 x 32 one.

The mosaics are fixed by ``(split, size, seed, tile)``: the four source indices of every
mosaic are drawn with ``numpy.random.default_rng([seed, crc32(split)])``.
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import DATASETS, ArrayDataset, DatasetInfo, check_options
from .cifar10 import CIFAR10_CLASSES, load_cifar10

#: Tile order inside a mosaic: source image j fills quadrant QUADRANTS[j] (row, column).
QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))


class MultiLabelArrayDataset(ArrayDataset):
    """Images (uint8 N x H x W x C) with multi-hot labels (N x K in {0, 1}).

    ``dataset[i]`` is ``(image, label)``: a float32 C x H x W tensor in [0, 1] and a float32
    vector of length K (1 where the class is present). ``task`` names the
    multi-label task, so defenses pick the right loss and metric.
    """

    task = "multilabel-classification"

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], name: str = "multilabel"):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
        if labels.shape != (len(images), len(classes)):
            raise DataError(f"{name}: labels must be N x K = {(len(images), len(classes))}, got {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{name}: multi-hot labels must be 0 or 1")
        self.images = images
        self.labels = labels.astype(np.uint8)
        self.classes = list(classes)
        self.name = name

    def _target(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[index].astype(np.float32))

    def _subset_class(self) -> type:
        return MultiLabelArrayDataset

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.image_shape})"


class MosaicDataset(MultiLabelArrayDataset):
    """2 x 2 mosaics; besides images and labels: ``source_index`` (N x 4 indices into the base
    split) and ``tile_labels`` (N x 4 classes), in :data:`QUADRANTS` order."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 source_index: np.ndarray, tile_labels: np.ndarray, name: str = "mosaic"):
        super().__init__(images, labels, classes, name)
        self.source_index = np.asarray(source_index, dtype=np.int64)
        self.tile_labels = np.asarray(tile_labels, dtype=np.int64)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Area downsampling of uint8 N x H x W x C by an integer ``factor`` (mean of factor x factor blocks)."""
    if factor == 1:
        return images
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise ConfigError(f"the base images ({h} x {w}) cannot be downsampled by {factor}")
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def multi_hot(tile_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """N x K multi-hot rows: 1 for every class among a row of ``tile_labels``."""
    out = np.zeros((len(tile_labels), num_classes), dtype=np.uint8)
    out[np.arange(len(tile_labels))[:, None], tile_labels] = 1
    return out


def mosaic(base: ArrayDataset, size: int, seed: int = 0, tile: int = 16, split: str = "train",
           name: str | None = None) -> MosaicDataset:
    """``size`` 2 x 2 mosaics of ``base`` images (each resized to ``tile`` pixels per side).

    Source indices: ``default_rng([seed, crc32(split)]).integers(0, len(base), (size, 4))``.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"mosaic size must be a positive integer, got {size!r}")
    if len(base) == 0:
        raise DataError("the base dataset of the mosaics is empty")
    h = base.images.shape[1]
    if tile < 1 or h % tile:
        raise ConfigError(f"tile must divide the base image side {h}, got {tile}")
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode())])
    src = rng.integers(0, len(base), size=(int(size), 4))
    tiles = downsample(base.images[src.reshape(-1)], h // tile).reshape(int(size), 4, tile, tile, -1)
    # 2 x 2 grid: rows (tile 0 | tile 1) over (tile 2 | tile 3).
    top = np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    images = np.ascontiguousarray(np.concatenate([top, bottom], axis=1))
    tile_labels = base.labels[src]
    return MosaicDataset(images, multi_hot(tile_labels, base.num_classes), base.classes, src, tile_labels,
                         name=name or f"mosaic-{base.name}")


def load_cifar10_mosaic(root: Any = None, split: str = "train", size: int = 10000, seed: int = 0,
                        tile: int = 16, cache: bool = True) -> MosaicDataset:
    """``size`` mosaics of the CIFAR-10 ``split`` (train or test); see the module docstring."""
    base = load_cifar10(root, split, cache=cache)
    return mosaic(base, size, seed, tile, split, name=f"cifar10-mosaic-{split}")


def _load(root: Any, split: str | None, **options: Any) -> MosaicDataset:
    check_options("cifar10-mosaic", load_cifar10_mosaic, options)
    return load_cifar10_mosaic(root, split or "train", **options)


DATASETS.register("cifar10-mosaic", _load,
                  info=DatasetInfo("cifar10-mosaic", len(CIFAR10_CLASSES), 32, 3))

__all__ = ["MultiLabelArrayDataset", "MosaicDataset", "mosaic", "multi_hot", "downsample",
           "load_cifar10_mosaic", "QUADRANTS"]
