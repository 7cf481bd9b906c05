"""BadNets (Gu et al. 2017): a small opaque patch in a corner relabels the image."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import ATTACKS, Attack
from .custom import load_pattern, serialise_source
from .triggers import PatchTrigger, Position


def checkerboard(size: int = 3) -> torch.Tensor:
    """A 1 x size x size checkerboard of 1 (white) and 0 (black), white at the top-left."""
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2 == 0).float().unsqueeze(0)


class BadNets(Attack):
    """BadNets with the benchmark defaults: a 3x3 white/black checkerboard pasted at the
    bottom-right corner (flush with the edges: ``margin=0``; ``margin=1`` leaves a
    one-pixel border), all2one to class 0, 10% of the non-target training images.

    ``patch_size`` sets the checkerboard size; ``pattern`` replaces the checkerboard (any
    source :func:`~fipurify.attacks.custom.load_pattern` accepts: file path, numpy image
    H x W x C, tensor or nested list C x H x W); ``position`` is ``(top, left)`` or a
    corner name.
    """

    name = "badnets"
    summary = "3x3 checkerboard patch, bottom-right"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, patch_size: int = 3,
                 position: Position = "bottom-right", margin: int = 0, pattern: Any = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if int(patch_size) < 1:
            raise ConfigError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.margin = int(margin)
        self.pattern_source = serialise_source(pattern)
        patch = checkerboard(self.patch_size) if pattern is None else load_pattern(pattern, "BadNets pattern")[0]
        self.trigger: PatchTrigger = PatchTrigger(patch, position, margin=self.margin)

    @property
    def position(self) -> str | list[int]:
        """Where the patch goes: a corner name or ``[top, left]``."""
        return self.trigger.position_spec

    def _spec_args(self) -> dict:
        return {"patch_size": self.patch_size, "position": self.position, "margin": self.margin,
                "pattern": self.pattern_source}


ATTACKS.register(BadNets.name, BadNets)
