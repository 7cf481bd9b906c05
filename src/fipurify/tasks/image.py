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

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.forward(model, x, y), y)

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(output.detach().float(), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(output.device)

    def score(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
        from ..metrics import accuracy, predict
        return accuracy(*predict(model, dataset, batch_size))


@TASKS.register("image-classification")
class ImageClassification(Classification):
    """Classification of C x H x W images; crop (+ flip) augmentation."""

    name = "image-classification"

    def check_sample(self, x: Any, y: Any) -> None:
        super().check_sample(x, y)
        if x.ndim != 3:
            raise DataError(f"clean images must be C x H x W tensors, got shape {tuple(x.shape)}")

    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                flip: bool = True, **options: Any) -> Tensor:
        return random_crop_flip(x, padding, flip, generator=generator)


TASKS.register("classification", Classification)
