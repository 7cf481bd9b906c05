"""Backdoor attacks: poisoned training sets and triggered test sets.

>>> attack = create("badnets", target=0, poison_rate=0.1)
>>> train = attack.poison(train_set); bd_test = attack.backdoor_test_set(test_set)

Names: ``badnets``, ``blend`` (alias ``blended``), ``trojan`` (aliases ``troj-one`` and
``troj-all`` fix ``mode``), ``sig``, ``custom``, ``wanet``, ``cba``, ``clb`` (its clean
surrogate is trained in ``prepare``), ``bppa``, ``combined``. ``attack.to_spec()`` is JSON-ready and
:func:`from_spec` rebuilds the same attack.

Learned-trigger attacks ``dynamic`` (aliases ``dyn-one`` / ``dyn-all``), ``lira``,
``issba`` and ``fba`` train a generator in ``attack.prepare(train_set)`` (cached under
``$FIPURIFY_CACHE/attacks/``; see :mod:`fipurify.attacks.generative`).
"""
from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from ..registry import discover
# Each attack module registers itself on import (import order = the order available() lists them;
# custom comes first because badnets, blend and trojan import its pattern-file helpers).
from .base import ATTACKS, Attack, BackdoorTestSet, PoisonedDataset, from_spec
from .badnets import BadNets
from .blend import Blend
from .trojan import Trojan
from .sig import SIG
from .custom import CustomAttack, load_pattern
from .triggers import BlendTrigger, PatchTrigger, SinusoidalTrigger, Trigger, trigger_from_spec
# Generator-based attacks (their trigger is trained by attack.prepare; see attacks.generative).
from .dynamic import Dynamic
from .lira import LIRA
from .issba import ISSBA
from .fba import FBA
# Warping, mixing, clean-label adversarial, quantisation and combined attacks.
from .wanet import WaNet
from .cba import CBA
from .clb import CLB
from .bppa import BPPA
from .combined import Combined

discover(__name__)  # any other attack module registers itself too

#: Alias -> (canonical name, arguments the alias fixes): a live view of ``ATTACKS.aliases``.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = ATTACKS.aliases


def available() -> list[str]:
    """Names :func:`create` accepts (canonical names, then aliases)."""
    return list(ATTACKS) + list(ALIASES)


def create(name: str, target: int = 0, poison_rate: float | None = None, **kwargs: Any) -> Attack:
    """Build an attack by name. ``poison_rate=None`` takes the attack's default (0.1; SIG 0.8).

    Other keyword arguments go to the attack class (``mode``, ``seed``, ``num_classes``
    and attack-specific ones such as ``alpha`` or ``pattern``); unknown ones raise
    ConfigError.
    """
    key, kwargs = ATTACKS.merged_options(name, kwargs)
    cls = ATTACKS[key]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        allowed = [p for p in params if p not in ("self", "target", "poison_rate")]
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for attack {key}; "
                          f"allowed: {', '.join(allowed)}")
    return cls(target=target, poison_rate=poison_rate, **kwargs)


__all__ = ["Attack", "PoisonedDataset", "BackdoorTestSet", "BadNets", "Blend", "Trojan", "SIG",
           "CustomAttack", "Trigger", "PatchTrigger", "BlendTrigger", "SinusoidalTrigger",
           "ATTACKS", "ALIASES", "available", "create", "from_spec", "trigger_from_spec", "load_pattern"]
