"""Per-channel input normalisation as the first layer of every model.

Keeping the normalisation inside the model means every model takes images in
[0, 1] pixel space (which is where triggers are stamped) and a saved model file
is self-contained: nobody has to remember which mean/std it was trained with.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError

#: Channel statistics of the datasets fipurify knows, as ``(mean, std)``.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
}


def generic_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of 0.5 per channel: maps [0, 1] to [-1, 1]."""
    return (0.5,) * channels, (0.5,) * channels


def dataset_stats(dataset: str | None, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default ``(mean, std)`` for ``dataset``; generic 0.5/0.5 for unknown names or other channel counts.

    Names are matched case-insensitively, ignoring ``-`` and ``_`` (``"CIFAR-10"`` == ``"cifar10"``).
    """
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    stats = DATASET_STATS.get(key)
    if stats is None or len(stats[0]) != channels:
        return generic_stats(channels)
    return stats


def _as_floats(values: Sequence[float], what: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)):
        raise ConfigError(f"normalisation {what} must be a list of numbers, got {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"normalisation {what} must be a list of numbers, got {values!r}") from None
    if not out or any(v != v or v in (float("inf"), float("-inf")) for v in out):
        raise ConfigError(f"normalisation {what} must be a non-empty list of finite numbers, got {values!r}")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean``/``std`` are persistent buffers of shape ``(C, 1, 1)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m, s = _as_floats(mean, "mean"), _as_floats(std, "std")
        if len(m) != len(s):
            raise ConfigError(f"normalisation mean has {len(m)} channels but std has {len(s)}")
        if any(v <= 0 for v in s):
            raise ConfigError(f"normalisation std must be positive, got {list(s)}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(-1, 1, 1))

    @property
    def channels(self) -> int:
        """Number of input channels this layer expects."""
        return self.mean.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise DataError(f"model expects images shaped (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, " \
               f"std={[round(v, 4) for v in self.std.flatten().tolist()]}"


def make_normalize(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    """A :class:`Normalize` for ``in_channels`` channels; ``None`` mean/std take the generic 0.5 default."""
    gm, gs = generic_stats(in_channels)
    layer = Normalize(gm if mean is None else mean, gs if std is None else std)
    if layer.channels != in_channels:
        raise ConfigError(f"normalisation mean/std have {layer.channels} channels but the model has "
                          f"in_channels={in_channels}")
    return layer
