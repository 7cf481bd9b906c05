"""A tiny, learnable synthetic image dataset for tests and demos (no files needed)."""
from __future__ import annotations

import zlib

import numpy as np

from .base import DATASETS, ArrayDataset, DatasetInfo, check_options


def synthetic(n: int = 512, num_classes: int = 4, image_size: int = 16, channels: int = 3,
              seed: int = 0, split: str = "train", noise: float = 0.15) -> ArrayDataset:
    """``n`` images; each class is a smooth random colour pattern plus per-image noise.

    A small CNN separates the classes in a few epochs, so backdoor and purification
    behaviour can be tested in seconds. ``seed`` fixes the class patterns (the
    distribution); ``split`` picks an independent sample from it, so
    ``synthetic(split="train")`` and ``synthetic(split="test")`` share one distribution.
    """
    prng = np.random.default_rng(seed)
    coarse = prng.uniform(0.15, 0.85, size=(num_classes, 4, 4, channels))
    reps = int(np.ceil(image_size / 4))
    protos = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :image_size, :image_size]
    srng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    labels = np.arange(n) % num_classes
    srng.shuffle(labels)
    imgs = protos[labels] + srng.normal(0.0, noise, size=(n, image_size, image_size, channels))
    imgs = (np.clip(imgs, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return ArrayDataset(imgs, labels, [f"class{c}" for c in range(num_classes)], name=f"synthetic-{split}")


def _load(root, split: str | None, **options) -> ArrayDataset:
    check_options("synthetic", synthetic, options)  # root is ignored
    return synthetic(split=split or "train", **options)


DATASETS.register("synthetic", _load, info=DatasetInfo("synthetic", 4, 16, 3))  # synthetic()'s defaults

