"""Blend attack (Chen et al. 2017): a fixed full-image pattern mixed into the image."""
from __future__ import annotations

from typing import Any

from .base import ATTACKS, Attack
from .custom import load_mask, load_pattern, serialise_source
from .triggers import BlendTrigger


class Blend(Attack):
    """Mix a pattern into the whole image at ``alpha`` (default 0.2).

    The paper blends a "Hello Kitty" photo; like many benchmarks, the default here is a
    fixed uniform-noise image in [0, 1), drawn from ``pattern_seed`` at the size of the
    images it first meets (see :class:`BlendTrigger`). ``pattern`` may instead be an image
    file path, numpy array (H x W x C), tensor or nested list (C x H x W); it is resized to
    the images. ``mask`` optionally limits the blend to part of the image.
    """

    name = "blend"
    summary = "fixed noise image blended at alpha 0.2"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, alpha: float = 0.2,
                 pattern: Any = None, pattern_seed: int = 0, mask: Any = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.alpha, self.pattern_seed = float(alpha), int(pattern_seed)
        self.pattern_source = serialise_source(pattern)
        self.mask_source = serialise_source(mask)
        m = None if mask is None else load_mask(mask, "blend mask")
        if pattern is None:
            self.trigger = BlendTrigger(alpha=self.alpha, mask=m, noise_seed=self.pattern_seed)
        else:
            self.trigger = BlendTrigger(load_pattern(pattern, "blend pattern")[0], self.alpha, m)

    def _spec_args(self) -> dict:
        return {"alpha": self.alpha, "pattern": self.pattern_source, "pattern_seed": self.pattern_seed,
                "mask": self.mask_source}


ATTACKS.register(Blend.name, Blend)
ATTACKS.alias("blended", "blend")
