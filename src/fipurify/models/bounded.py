"""Per-channel upper bounds on a model's activations, as part of the model.

:class:`BoundedActivation` wraps one activation module ``act`` and caps its output channel by
channel,

.. math::

   a_c \\mapsto \\min(\\mathrm{act}(x)_c, \\, b_c),

with the bounds ``b`` (shape ``(C,)``) held as a buffer, so that a model with bounds saves, loads
(:func:`fipurify.io.save_model` records which modules carry them) and moves between devices like
any other. Activation clipping (:mod:`fipurify.defenses.act_clip`) learns the bounds from clean
data; this module only holds and applies them:

- :func:`activations_in_order`: the model's activation modules in the order a forward pass first
  calls them (registration order can differ from it);
- :func:`insert_bounds` / :func:`remove_bounds`: put bounds on named modules, or take them off
  again (the plain activations come back: the inverse, as peft's ``unload``);
- :func:`bounded_channels`: which modules carry bounds and how many channels, the structure a
  saved model records.

Channel is dimension 1 of the activation (``(N, C, ...)``, as convolution outputs); a bound of
``+inf`` leaves its channel as it was.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError

#: activation module types whose outputs can carry bounds
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish)


class BoundedActivation(nn.Module):
    """``min(act(x), bound)`` per channel (dimension 1); ``bound`` is a buffer of shape ``(C,)``."""

    def __init__(self, act: nn.Module, channels: int, bound: torch.Tensor | None = None):
        super().__init__()
        self.act = act
        value = torch.full((int(channels),), float("inf")) if bound is None else bound.detach().clone().float()
        if value.shape != (int(channels),):
            raise ConfigError(f"a bound needs one value per channel ({channels}), got shape {tuple(value.shape)}")
        self.register_buffer("bound", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x)
        if out.dim() < 2 or out.shape[1] != self.bound.numel():
            raise RuntimeError(f"bounded activation expects {self.bound.numel()} channels in dimension 1, "
                               f"got an output of shape {tuple(out.shape)}")
        return torch.minimum(out, self.bound.to(out.dtype).view(1, -1, *([1] * (out.dim() - 2))))

    def extra_repr(self) -> str:
        return f"channels={self.bound.numel()}"


def activations_in_order(model: nn.Module, sample: torch.Tensor, ndim: int | None = None,
                         skip_shared: bool = False) -> list[tuple[str, int]]:
    """``(name, channels)`` of the model's activation modules (:data:`ACTIVATIONS`; a bounded one under
    its :class:`BoundedActivation`'s name) in the order one forward pass on ``sample`` first calls them.
    Modules the pass never calls are left out, and so are those whose output does not have ``ndim``
    dimensions when it is given (4: the ``(N, C, H, W)`` feature maps of a convolutional network).
    A module called more than once (shared between layers, as torchvision's ResNet blocks do) cannot
    carry one set of bounds for two layers: it is refused, or left out with ``skip_shared``."""
    names: dict[nn.Module, str] = {}
    for n, m in model.named_modules():
        if isinstance(m, BoundedActivation):
            names[m.act] = n
        elif isinstance(m, ACTIVATIONS) and n and m not in names:
            names[m] = n
    calls: dict[str, int] = {}
    first: list[tuple[str, int, int]] = []

    def record(module: nn.Module, _inp, out) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 1:
            first.append((name, int(out.shape[1]) if out.dim() >= 2 else 0, out.dim()))

    handles = [m.register_forward_hook(record) for m in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    shared = [n for n, k in calls.items() if k > 1]
    if shared and not skip_shared:
        raise ConfigError(f"activation module {shared[0]!r} is called more than once per forward pass; give each "
                          "layer its own activation module to bound its outputs")
    return [(n, c) for n, c, d in first if n not in shared and (ndim is None or d == ndim)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    return parent, leaf


def insert_bounds(model: nn.Module, bounds: Mapping[str, torch.Tensor | int]) -> nn.Module:
    """Wrap each named activation module in a :class:`BoundedActivation` (in place; returns ``model``).

    ``bounds[name]`` is the bound tensor ``(C,)``, or a channel count for bounds of ``+inf`` (to be
    filled by ``load_state_dict``). A module already bounded gets the new values."""
    modules = dict(model.named_modules())
    for name, b in bounds.items():
        if name not in modules:
            raise ConfigError(f"the model has no module {name!r} to bound")
        mod = modules[name]
        channels = b if isinstance(b, int) else int(b.numel())
        value = None if isinstance(b, int) else b.reshape(-1)
        if isinstance(mod, BoundedActivation):
            if mod.bound.numel() != channels:
                raise ConfigError(f"{name} is bounded over {mod.bound.numel()} channels, not {channels}")
            if value is not None:
                mod.bound.copy_(value)
            continue
        if not isinstance(mod, ACTIVATIONS):
            raise ConfigError(f"module {name!r} is a {type(mod).__name__}, not an activation that can be bounded")
        parent, leaf = _parent(model, name)
        ref = next(model.parameters(), None)
        if ref is None:
            ref = next(model.buffers(), None)
        wrapped = BoundedActivation(mod, channels, value)
        setattr(parent, leaf, wrapped.to(ref.device) if ref is not None else wrapped)
    return model


def bounded_channels(model: nn.Module) -> dict[str, int]:
    """``{module name: channels}`` of every :class:`BoundedActivation` in ``model``."""
    return {n: int(m.bound.numel()) for n, m in model.named_modules() if isinstance(m, BoundedActivation)}


def remove_bounds(model: nn.Module) -> nn.Module:
    """Put back the plain activation modules in place of every :class:`BoundedActivation` (in place)."""
    for name in bounded_channels(model):
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).act)
    return model
