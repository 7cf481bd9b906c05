"""t-SNE of penultimate-layer features with the poisoned samples marked (paper Figure 5)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from .features import extract_features, tsne_embed
from .figures import FORMATS, new_figure, save_figure


def _labels(ds: Dataset, attr: str = "labels") -> np.ndarray:
    v = getattr(ds, attr, None)
    if v is not None:
        return np.asarray(v, dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _subset(ds: Dataset, n: int | None, seed: int) -> tuple[Dataset, np.ndarray]:
    idx = np.arange(len(ds))
    if n is not None and n < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return (Subset(ds, idx.tolist()) if len(idx) < len(ds) else ds), idx


def draw_embedding(ax, emb: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, title: str,
                   class_names: Sequence[str] | None = None) -> None:
    """Clean points coloured by class; poisoned points as black crosses."""
    clean = ~poisoned
    for c in np.unique(labels[clean]):
        m = clean & (labels == c)
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(emb[m, 0], emb[m, 1], s=6, alpha=0.7, color=f"C{int(c) % 10}", label=name)
    if poisoned.any():
        ax.scatter(emb[poisoned, 0], emb[poisoned, 1], s=14, marker="x", color="black", lw=0.8,
                   label="poisoned")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_tsne(models: Mapping[str, nn.Module], clean: Dataset, poisoned: Dataset | None, path: str | os.PathLike,
              n_clean: int | None = 1000, n_poisoned: int | None = 200, seed: int = 0,
              class_names: Sequence[str] | None = None, formats: Sequence[str] = FORMATS,
              dpi: int = 120) -> list[Path]:
    """One t-SNE panel per model, of the same clean and triggered images.

    ``clean``: labelled clean images (points coloured by their class). ``poisoned``:
    triggered images, e.g. ``attack.backdoor_test_set(test)`` (drawn as black crosses; a
    backdoored model clusters them apart or with the target class, a purified one spreads
    them over their true classes). Seeded subsets of ``n_clean`` / ``n_poisoned`` keep
    t-SNE fast.
    """
    if not models:
        raise DataError("no model to embed")
    cs, cidx = _subset(clean, n_clean, seed)
    parts: list[Dataset] = [cs]
    labels = _labels(clean)[cidx]
    flags = np.zeros(len(cs), dtype=bool)
    if poisoned is not None and len(poisoned):
        ps, pidx = _subset(poisoned, n_poisoned, seed + 1)
        parts.append(ps)
        true = getattr(poisoned, "true_labels", None)
        plab = np.asarray(true)[pidx] if true is not None else _labels(poisoned)[pidx]
        labels = np.concatenate([labels, plab])
        flags = np.concatenate([flags, np.ones(len(ps), dtype=bool)])
    data = torch.utils.data.ConcatDataset(parts)
    names = class_names if class_names is not None else getattr(clean, "classes", None)
    fig, axes = new_figure(4.2 * len(models) + 1.4, 4.0, ncols=len(models))
    for ax, (title, model) in zip(axes[0], models.items()):
        emb = tsne_embed(extract_features(model, data), seed=seed)
        draw_embedding(ax, emb, labels, flags, title, names)
    handles, labs = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labs, loc="outside right center", fontsize=8, markerscale=2)
    return save_figure(fig, path, formats, dpi)
