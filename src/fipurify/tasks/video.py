"""Video classification: a clip (T x C x H x W frames) has one class.

Cross-entropy, softmax targets for the true Fisher and accuracy come from
:class:`~fipurify.tasks.image.Classification`. What differs is the valid augmentation: one
random crop (after zero padding) per CLIP, the same for all of its frames, so the frames
stay aligned with each other and the motion between them is kept. There is NO horizontal
flip: a mirrored clip of something moving left moves right, so a flip changes the class
of direction-dependent actions (the CIFAR-10 motion stand-in's left/right and its
diagonals; "swiping left" vs "swiping right" in real action data). The ``flip`` option
of :meth:`augment` is accepted and ignored for that reason.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..augment import random_crop_flip
from ..errors import DataError
from .base import TASKS
from .image import Classification


@TASKS.register("video-classification")
class VideoClassification(Classification):
    """Classification of T x C x H x W clips; one crop per clip, never a flip."""

    name = "video-classification"
    feature_map_ndim = 4  # the per-frame CNN's (N * T, C, H, W) maps

    def check_sample(self, x: Any, y: Any) -> None:
        super().check_sample(x, y)
        if x.ndim != 4:
            raise DataError(f"clean clips must be T x C x H x W tensors, got shape {tuple(x.shape)}")

    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                flip: bool = False, **options: Any) -> Tensor:
        """The same random crop for every frame of a clip (N x T x C x H x W); ``flip`` is ignored."""
        n, t, c, h, w = x.shape
        # Frames stacked as channels: random_crop_flip draws one offset per clip.
        out = random_crop_flip(x.reshape(n, t * c, h, w), padding, flip=False, generator=generator)
        return out.reshape(n, t, c, h, w)


__all__ = ["VideoClassification"]
