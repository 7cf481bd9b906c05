"""Build models by name, and record how to rebuild them.

Every model made by :func:`create` carries ``model.fipurify_spec`` =
``{"arch": <canonical name>, "kwargs": {...}}`` with *every* constructor argument
(defaults filled in, JSON types only), so ``create(spec["arch"], **spec["kwargs"])``
rebuilds the same architecture even if a default changes later. Model files store
this spec next to the weights.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .normalize import generic_stats

#: Architectures by canonical name: each model module registers its class
#: (``MODELS.register("vgg11", VGG)``, ``MODELS.alias("vgg", "vgg11")``).
MODELS = Registry("model")
# Arguments every builder takes and create() handles itself.
_COMMON = ("num_classes", "in_channels", "input_size", "mean", "std")


def available() -> list[str]:
    """Canonical names accepted by :func:`create` (aliases not listed)."""
    return sorted(MODELS)


def canonical_name(name: str) -> str:
    """The canonical architecture name for ``name`` or an alias; :class:`ConfigError` if unknown."""
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    return MODELS.resolve(name)[0]


def _positive_int(arch: str, key: str, value: Any) -> int:
    # bool is an int subclass, but width=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{arch} option {key} must be a positive integer, got {value!r}")
    return value


def _stats(arch: str, key: str, value: Sequence[float] | None, channels: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise ConfigError(f"{arch} option {key} must be a list of {channels} numbers, got {value!r}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{arch} option {key} must be a list of {channels} numbers, got {value!r}") from None
    if len(out) != channels:
        raise ConfigError(f"{arch} option {key} has {len(out)} values but in_channels={channels}")
    return out


def _coerce(arch: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` has the type of the builder's default; ints stay ints, floats become floats."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{arch} option {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{arch} option {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{arch} option {key} must be a number, got {value!r}")
        return float(value)
    return value


def create(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (see :func:`available`) taking ``(N, in_channels, H, W)`` images in [0, 1].

    ``mean``/``std`` default to 0.5 per channel (see :func:`fipurify.models.dataset_stats` for the
    CIFAR-10/GTSRB values). ``kwargs`` are architecture options such as ``width``, ``depth``,
    ``patch_size``. Raises :class:`ConfigError` for an unknown name or option or a bad value.
    The model gets a ``fipurify_spec`` attribute from which this call can be repeated.
    """
    arch = canonical_name(name)
    cls = MODELS[arch]
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self" and k not in _COMMON}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        options = ", ".join(sorted(params)) or "none"
        raise ConfigError(f"{arch} has no option {', '.join(repr(u) for u in unknown)}; "
                          f"its options are: {options}")
    spec_kwargs: dict[str, Any] = {
        "num_classes": _positive_int(arch, "num_classes", num_classes),
        "in_channels": _positive_int(arch, "in_channels", in_channels),
        "input_size": _positive_int(arch, "input_size", input_size),
    }
    spec_kwargs["mean"] = _stats(arch, "mean", mean, in_channels)
    spec_kwargs["std"] = _stats(arch, "std", std, in_channels)
    for key, default in params.items():
        spec_kwargs[key] = _coerce(arch, key, kwargs[key], default) if key in kwargs else default
    # Record the normalisation actually used, so the spec does not depend on today's defaults.
    generic_mean, generic_std = generic_stats(in_channels)
    if spec_kwargs["mean"] is None:
        spec_kwargs["mean"] = list(generic_mean)
    if spec_kwargs["std"] is None:
        spec_kwargs["std"] = list(generic_std)
    model = cls(**spec_kwargs)
    model.fipurify_spec = {"arch": arch, "kwargs": spec_kwargs}
    return model
