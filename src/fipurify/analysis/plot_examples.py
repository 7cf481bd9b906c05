"""A grid of clean vs triggered example images for any attack."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .figures import FORMATS, new_figure, save_figure


def plot_trigger_examples(attack, dataset: Dataset, path: str | os.PathLike, n: int = 8, seed: int = 0,
                          show_difference: bool = True, formats: Sequence[str] = FORMATS,
                          dpi: int = 120) -> list[Path]:
    """Rows: ``n`` clean images (seeded choice), the same with ``attack``'s trigger, and
    (``show_difference``) the amplified absolute difference, so faint triggers (Blend, SIG)
    are visible too. Column titles give each image's class."""
    if len(dataset) == 0:
        raise DataError("no images to show: the dataset is empty")
    n = min(n, len(dataset))
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False))
    items = [dataset[int(i)] for i in idx]
    clean = torch.stack([x for x, _ in items]).float()
    trig = attack.apply_trigger(clean.clone()).clamp(0, 1)
    rows = [("clean", clean), (f"{getattr(attack, 'name', 'attack')}", trig)]
    if show_difference:
        diff = (trig - clean).abs()
        rows.append(("|difference|", diff / diff.amax().clamp_min(1e-8)))
    classes = getattr(dataset, "classes", None)
    fig, axes = new_figure(1.3 * n + 0.8, 1.45 * len(rows), ncols=n, nrows=len(rows))
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                y = int(items[c][1])
                ax.set_title(classes[y] if classes is not None and y < len(classes) else str(y), fontsize=8)
    return save_figure(fig, path, formats, dpi)
