"""Named backdoor detectors: each family module registers its class with :func:`register`."""
from __future__ import annotations

from typing import Any

from ..registry import Registry


def _build(cls: type, **options: Any) -> Any:
    return cls(cls.config_class(), **options)


#: the detector ``detect`` and ``fipurify detect`` use unless told otherwise
DEFAULT_METHOD = "neural-cleanse"

#: detector name -> class (filled by the family modules as they are imported)
DETECTORS = Registry("detector", normalize=lambda name: str(name).lower().replace("_", "-"), build=_build)

#: Class decorator adding a detector under ``name``: ``@register("uap")``.
register = DETECTORS.register


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(DETECTORS)


def create(name: str = DEFAULT_METHOD, **options: Any):
    """A configured detector; unknown names and options raise ConfigError."""
    return DETECTORS.create(name, **options)
