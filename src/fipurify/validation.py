"""Range checks shared by the training and purification configs."""
from __future__ import annotations

import math

from .errors import ConfigError


def check_optimisation(epochs: int, lr: float, batch_size: int, momentum: float, weight_decay: float) -> None:
    """Raise ConfigError unless the optimiser settings are in range."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise ConfigError("momentum must lie in [0, 1) and weight_decay be >= 0")
