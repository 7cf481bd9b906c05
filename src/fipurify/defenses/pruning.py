"""Channel pruning that leaves a plain model: pruned channels are zeroed in the weights.

A channel of a conv / batch-norm layer is pruned by zeroing the parameters that produce it,
so the model keeps its class and state-dict keys and the channel outputs exactly 0:
a BN channel with weight = bias = 0 outputs 0; a conv channel with a zero filter (and bias)
outputs 0, and when a BN consumes that conv, the BN channel is zeroed too.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError


def channel_tensors(model: nn.Module, layer: str, bn_after: str | None = None) -> list[torch.Tensor]:
    """The parameter tensors whose row ``c`` produces output channel ``c`` of ``layer``."""
    mods = dict(model.named_modules())
    if layer not in mods:
        raise ConfigError(f"the model has no layer named {layer!r}")
    m = mods[layer]
    if not isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)):
        raise ConfigError(f"layer {layer!r} is a {type(m).__name__}; channel pruning needs a conv, "
                          "batch-norm or linear layer")
    out = [p for p in (m.weight, m.bias) if p is not None]
    if bn_after is not None:
        bn = mods[bn_after]
        out += [p for p in (bn.weight, bn.bias) if p is not None]
    if not out:
        raise ConfigError(f"layer {layer!r} has no parameters to prune (a BN without affine?)")
    return out


@torch.no_grad()
def zero_channels(tensors: Iterable[torch.Tensor], channels: Iterable[int]) -> None:
    """Zero row ``c`` (dimension 0) of every tensor for every ``c`` in ``channels``."""
    idx = sorted(set(int(c) for c in channels))
    if not idx:
        return
    for t in tensors:
        t[torch.tensor(idx, device=t.device)] = 0.0
