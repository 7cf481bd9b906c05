"""Named backdoor detectors: each family module registers its class with :func:`register`."""
from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError

#: detector name -> class (filled by the family modules as they are imported)
DETECTORS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a detector under ``name``."""
    def add(cls: type) -> type:
        DETECTORS[name] = cls
        return cls
    return add


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(DETECTORS)


def create(name: str = "neural-cleanse", **options: Any):
    """A configured detector; unknown names and options raise ConfigError."""
    key = str(name).lower().replace("_", "-")
    if key not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(available())}")
    cls = DETECTORS[key]
    return cls(cls.config_class(), **options)
