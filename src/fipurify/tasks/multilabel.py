"""Multi-label classification: one independent yes/no decision per class.

Items are ``(C x H x W float tensor, K-vector of 0/1 floats)``; the model outputs K logits
:math:`z`, one per class, and :math:`p_\\theta(y_k = 1 | x) = \\sigma(z_k)` independently.

* per-sample loss (:meth:`per_sample_loss`, the Task contract): the negative log-likelihood
  :math:`-\\log p_\\theta(y|x) = -\\sum_k [y_k \\log \\sigma(z_k) + (1 - y_k) \\log(1 - \\sigma(z_k))]`,
  so the Fisher estimated from it is the true Fisher;
* training loss (:meth:`mean_loss`): binary cross-entropy with logits averaged over the K labels
  and the samples (PyTorch's ``BCEWithLogitsLoss`` default), i.e. the NLL divided by K: the usual
  scale, so learning rates carry over from multi-label practice;
* Fisher targets: :math:`\\hat y_k \\sim \\mathrm{Bernoulli}(\\sigma(z_k))`, independently per
  class (the model's own predictive distribution);
* augmentation: random crop after zero padding and a horizontal flip. A mirror image shows
  the same objects, so the label SET is unchanged (for a mosaic only the quadrants swap);
* metric: mean average precision (mAP) over the classes that have at least one positive.

Average precision of one class (scores :math:`s_i`, labels :math:`y_i`, :math:`P` positives),
with the thresholds at the distinct scores :math:`t_1 > t_2 > \\dots`:

.. math::  AP = \\sum_n (R_n - R_{n-1}) \\, P_n, \\quad
           P_n = \\frac{|\\{i: s_i \\ge t_n, y_i = 1\\}|}{|\\{i: s_i \\ge t_n\\}|}, \\quad
           R_n = \\frac{|\\{i: s_i \\ge t_n, y_i = 1\\}|}{P},

the area under the step precision-recall curve (no interpolation; tied scores enter
together), the definition scikit-learn's ``average_precision_score`` uses. Without ties
it is the mean, over the positives, of the precision at each positive's rank.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..augment import random_crop_flip
from ..errors import DataError
from .base import TASKS, Task


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class (see the module docstring); NaN when ``targets`` has no positive."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    # Last index of each run of equal scores: the points where a threshold admits a tie group.
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(t)[ends]
    precision = tp / (ends + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the columns (classes) of N x K ``scores`` / ``targets`` that have a positive."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise DataError(f"scores and targets must both be N x K, got {scores.shape} and {targets.shape}")
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    if not aps:
        raise DataError("mAP is undefined: no class has a positive sample")
    return float(np.mean(aps))


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The model's N x K logits (eval mode) and the dataset's N x K labels, in dataset order."""
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty dataset")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            outs.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


@TASKS.register("multilabel-classification")
class MultiLabelClassification(Task):
    """Multi-label image classification: BCE with logits, Bernoulli targets, crop + flip, mAP."""

    name = "multilabel-classification"
    metric = "mAP"

    def check_sample(self, x: Any, y: Any) -> None:
        if not torch.is_tensor(x) or x.ndim != 3:
            raise DataError(f"multi-label inputs must be C x H x W tensors, got "
                            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        y = torch.as_tensor(y)
        if y.ndim != 1 or not torch.all((y == 0) | (y == 1)):
            raise DataError(f"multi-label targets must be 0/1 vectors (one entry per class), got shape "
                            f"{tuple(y.shape)}")

    def per_sample_loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, y.to(output.dtype), reduction="none").sum(dim=1)

    def mean_loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, y.to(output.dtype))

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # drawn on the generator's device (the output's without one), then moved to the output's
        probs = torch.sigmoid(output.detach().float())
        device = generator.device if generator is not None else probs.device
        return torch.bernoulli(probs.to(device), generator=generator).to(output.device, output.dtype)

    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                flip: bool = True, **options: Any) -> Tensor:
        return random_crop_flip(x, padding, flip, generator=generator)

    def score(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
        return mean_average_precision(*predict_logits(model, dataset, batch_size))


__all__ = ["MultiLabelClassification", "average_precision", "mean_average_precision", "predict_logits"]
