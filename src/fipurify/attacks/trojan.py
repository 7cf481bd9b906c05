"""Trojan-style patch attack (Liu et al. 2018, "Trojaning Attack on Neural Networks")."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .base import ATTACKS, Attack
from .custom import load_mask, load_pattern, serialise_source
from .triggers import PatchTrigger, Position


def colour_patch(size: int = 3, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A fixed, seeded channels x size x size patch of random colours on the uint8 grid."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 256, size=(channels, size, size), dtype=np.int64)
    return torch.from_numpy(levels.astype(np.float32) / np.float32(255.0))


class Trojan(Attack):
    """A 3x3 colour patch one pixel in from the bottom-right corner.

    The original attack optimises the trigger against a trained model to excite chosen
    neurons. This default is NOT optimised: it is a fixed colourful patch drawn from
    ``pattern_seed`` (see :func:`colour_patch`), placed with ``margin=1`` so it does not
    coincide with the BadNets patch. Pass an optimised trigger as ``pattern`` and optionally
    ``mask`` (file path, numpy image H x W x C, tensor or nested list C x H x W; see
    :func:`~fipurify.attacks.custom.load_pattern`). The benchmark variants Troj-one and Troj-all
    are ``mode="all2one"`` and ``mode="all2all"`` (registry aliases ``troj-one``/``troj-all``).
    """

    name = "trojan"
    summary = "seeded colourful 3x3 patch"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, pattern: Any = None, mask: Any = None,
                 pattern_seed: int = 0, size: int = 3, position: Position = "bottom-right", margin: int = 1):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if int(size) < 1:
            raise ConfigError(f"patch size must be >= 1, got {size}")
        self.pattern_seed, self.size, self.margin = int(pattern_seed), int(size), int(margin)
        self.pattern_source, self.mask_source = serialise_source(pattern), serialise_source(mask)
        if pattern is None:
            patch, alpha = colour_patch(self.size, self.pattern_seed), None
        else:
            patch, alpha = load_pattern(pattern, "Trojan pattern")
        m = load_mask(mask, "Trojan mask") if mask is not None else alpha
        self.trigger: PatchTrigger = PatchTrigger(patch, position, mask=m, margin=self.margin)

    @property
    def position(self) -> str | list[int]:
        """Where the patch goes: a corner name or ``[top, left]``."""
        return self.trigger.position_spec

    def _spec_args(self) -> dict:
        return {"pattern": self.pattern_source, "mask": self.mask_source,
                "pattern_seed": self.pattern_seed, "size": self.size, "position": self.position,
                "margin": self.margin}


ATTACKS.register(Trojan.name, Trojan)
ATTACKS.alias("troj-one", "trojan", mode="all2one")
ATTACKS.alias("troj-all", "trojan", mode="all2all")
