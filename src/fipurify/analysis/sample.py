"""The data a saved model is analysed on: a seeded, class-stratified sample of its own dataset."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .. import datasets
from ..errors import ConfigError
from ..workflow import DataBundle, reload_data, reload_test_only

SPLITS = ("train", "reserve", "test")


def load_bundle(meta: dict[str, Any], root: str | None, split: str) -> DataBundle:
    """The model's data: the full split with reserve check (train/reserve), or only the test set."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return reload_test_only(meta, root) if split == "test" else reload_data(meta, root)


def draw_sample(bundle: DataBundle, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with their true labels from ``split``, stratified by class, fixed by ``seed``.

    ``train`` is the clean training part (the paper's choice, appendix A.2: training data
    with ground-truth labels; triggers are never added here), ``reserve`` the held-out
    clean reserve, ``test`` the test set.
    """
    ds = {"train": bundle.train, "reserve": bundle.reserve, "test": bundle.test}[split]
    sub = datasets.draw_clean_subset(ds, min(int(n), len(ds)), seed)
    x = torch.from_numpy(sub.images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.from_numpy(sub.labels.astype("int64"))


def limit_test(bundle: DataBundle, limit: int | None, seed: int = 0) -> DataBundle:
    """A copy of ``bundle`` whose test set is a stratified subset of ``limit`` images (None: all)."""
    if limit is None or limit >= len(bundle.test):
        return bundle
    return replace(bundle, test=datasets.draw_clean_subset(bundle.test, int(limit), seed))
