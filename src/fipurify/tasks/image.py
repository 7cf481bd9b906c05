"""Image classification: the first :class:`~fipurify.tasks.base.Task`, and the default one.

Items are ``(C x H x W float tensor, int label)``; the loss is cross-entropy on the logits;
targets for the true Fisher are drawn from the softmax; the valid augmentations are a random
crop after zero padding and (unless the labels depend on orientation, e.g. traffic signs
whose arrows point left or right) a horizontal flip; the metric is accuracy.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..augment import random_crop_flip
from ..errors import DataError
from .base import TASKS, Task


class Classification(Task):
    """Single-label classification on any input: cross-entropy, softmax sampling, accuracy."""

    name = "classification"
    metric = "accuracy"

    def check_sample(self, x: Any, y: Any) -> None:
        if not torch.is_tensor(x):
            raise DataError(f"clean inputs must be tensors, got {type(x).__name__}")
        try:
            int(y)
        except (TypeError, ValueError):
            raise DataError(f"clean labels must be class indices, got {y!r}") from None

    def per_sample_loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y, reduction="none")

    def mean_loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y)

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # drawn on the generator's device (the output's without one), then moved to the output's
        probs = torch.softmax(output.detach(), dim=-1)
        device = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(output.device)

    def score(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
        from ..metrics import accuracy, predict
        return accuracy(*predict(model, dataset, batch_size))


@TASKS.register("image-classification")
class ImageClassification(Classification):
    """Classification of C x H x W images; crop (+ flip) augmentation."""

    name = "image-classification"
    feature_map_ndim = 4

    def check_sample(self, x: Any, y: Any) -> None:
        if getattr(x, "ndim", 0) != 3:  # first, with the message the clean-set check always had
            raise DataError(f"clean images must be C x H x W tensors, got shape {tuple(getattr(x, 'shape', ()))}")
        super().check_sample(x, y)

    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                flip: bool = True, **options: Any) -> Tensor:
        return random_crop_flip(x, padding, flip, generator=generator)


TASKS.register("classification", Classification)
