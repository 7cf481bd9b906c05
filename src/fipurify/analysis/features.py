"""Penultimate-layer features (``model.features``) and their 2-D t-SNE embedding."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> np.ndarray:
    """``model.features(x)`` for every item of ``dataset`` in order, eval mode (N x D, float32).

    Every fipurify architecture has ``.features`` (the classifier's input); other models
    need that method too.
    """
    if not callable(getattr(model, "features", None)):
        raise ConfigError(f"{type(model).__name__} has no features() method giving the penultimate layer")
    if len(dataset) == 0:
        raise DataError("no images to embed: the dataset is empty")
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = [model.features(x.to(device)).flatten(1).float().cpu()
               for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    finally:
        for m, was in modes:
            m.training = was
    return torch.cat(out).numpy()


def tsne_embed(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of ``features`` (scikit-learn, PCA initialisation, seeded); N x 2."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 5:
        raise DataError(f"t-SNE needs at least 5 points, got {n}")
    perp = min(perplexity, max(2.0, (n - 1) / 3))  # sklearn requires perplexity < n
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float32))
