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
from .badnets import BadNets
from .base import Attack, BackdoorTestSet, PoisonedDataset, from_spec
from .blend import Blend
from .custom import CustomAttack, load_pattern
from .sig import SIG
from .triggers import BlendTrigger, PatchTrigger, SinusoidalTrigger, Trigger, trigger_from_spec
from .trojan import Trojan
from .dynamic import Dynamic
from .fba import FBA
from .issba import ISSBA
from .lira import LIRA
from .bppa import BPPA
from .cba import CBA
from .clb import CLB
from .combined import Combined
from .wanet import WaNet

#: Canonical name -> attack class.
ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend, Trojan, SIG, CustomAttack)}

#: Alias -> (canonical name, arguments the alias fixes).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "blended": ("blend", {}),
    "troj-one": ("trojan", {"mode": "all2one"}),
    "troj-all": ("trojan", {"mode": "all2all"}),
}
# Generator-based attacks (their trigger is trained by attack.prepare; see attacks.generative).
ATTACKS.update({cls.name: cls for cls in (Dynamic, LIRA, ISSBA, FBA)})
ALIASES.update({"dyn-one": ("dynamic", {"mode": "all2one"}), "dyn-all": ("dynamic", {"mode": "all2all"})})
# Warping, mixing, clean-label adversarial, quantisation and combined attacks (issue 5, part C).
ATTACKS.update({cls.name: cls for cls in (WaNet, CBA, CLB, BPPA, Combined)})


def available() -> list[str]:
    """Names :func:`create` accepts (canonical names, then aliases)."""
    return list(ATTACKS) + list(ALIASES)


def create(name: str, target: int = 0, poison_rate: float | None = None, **kwargs: Any) -> Attack:
    """Build an attack by name. ``poison_rate=None`` takes the attack's default (0.1; SIG 0.8).

    Other keyword arguments go to the attack class (``mode``, ``seed``, ``num_classes``
    and attack-specific ones such as ``alpha`` or ``pattern``); unknown ones raise
    ConfigError.
    """
    key = str(name).strip().lower().replace("_", "-")
    fixed: dict[str, Any] = {}
    if key in ALIASES:
        key, fixed = ALIASES[key]
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; available: {', '.join(available())}")
    for k, v in fixed.items():
        if k in kwargs and kwargs[k] != v:
            raise ConfigError(f"attack {name!r} means {k}={v!r}; it cannot be combined with {k}={kwargs[k]!r}")
    kwargs.update(fixed)
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
