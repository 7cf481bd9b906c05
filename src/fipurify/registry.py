"""One registry shape for every named kind of thing (datasets, models, attacks, defenses, detectors).

A kind keeps one :class:`Registry`; each implementation registers itself in its own module,
as peft's tuners or timm's models do::

    DEFENSES = Registry("method", build=lambda cls, **o: cls(cls.config_class(), **o))

    @DEFENSES.register("my-defense", epochs=20)      # in defenses/my_defense.py
    class MyDefense(Defense): ...

    DEFENSES.create("my-defense", lr=0.01)          # MyDefense(config, epochs=20, lr=0.01)

* ``register(name, obj, **options)`` adds ``obj`` under ``name`` with the options that name
  presets (a caller's options override them); without ``obj`` it is a decorator. ``info``
  holds static facts about the entry (e.g. a dataset's class count).
* ``alias(alias, name, **fixed)`` adds another name for an entry; ``fixed`` are the options
  the alias means (a caller contradicting them gets a ConfigError). Aliases are not listed
  by :meth:`names`.
* ``get(name)`` is the registered object, ``create(name, *args, **options)`` builds it,
  ``names()`` lists the canonical names in registration order.

An unknown name raises one line: ``unknown <kind> 'x'; known: a, b (aliases: c=a)``.
The registry is also a read-only mapping canonical name -> object. :func:`discover`
imports every module of a package, so a new implementation is one new file.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def _normalize(name: Any) -> str:
    return str(name).strip().lower()


@dataclass(frozen=True)
class Entry:
    """One registered name: the object, the options the name presets, static facts."""

    name: str
    obj: Any
    options: dict[str, Any] = field(default_factory=dict)
    info: Any = None


class Registry(Mapping):
    """Named objects of one ``kind`` (used in error messages), see the module docstring.

    ``normalize`` maps a caller's name to a key (default: stripped, lower case);
    ``build(obj, *args, **options)`` makes an instance (default: ``obj(*args, **options)``).
    """

    def __init__(self, kind: str, normalize: Callable[[Any], str] = _normalize,
                 build: Callable[..., Any] | None = None):
        self.kind = kind
        self._normalize = normalize
        self._build = build
        self._entries: dict[str, Entry] = {}
        #: alias -> (canonical name, options the alias fixes)
        self.aliases: dict[str, tuple[str, dict[str, Any]]] = {}
        #: canonical name -> (object, preset options): the registry as a plain table
        self.table: dict[str, tuple[Any, dict[str, Any]]] = {}

    # -- filling ---------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, info: Any = None, **options: Any):
        """Add ``obj`` under ``name`` (presetting ``options``); without ``obj``, a decorator."""
        if obj is None:
            def decorator(target: Any) -> Any:
                self.register(name, target, info=info, **options)
                return target
            return decorator
        key = self._normalize(name)
        old = self._entries.get(key)
        if old is not None and (old.obj is not obj or old.options != options):
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[key] = Entry(key, obj, dict(options), info)
        self.table[key] = (obj, dict(options))
        return obj

    def alias(self, alias: str, name: str, **fixed: Any) -> None:
        """Let ``alias`` stand for ``name`` with the options ``fixed``."""
        self.aliases[self._normalize(alias)] = (self._normalize(name), dict(fixed))

    # -- looking up ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Canonical names in registration order (aliases not included)."""
        return list(self._entries)

    def error(self, name: Any) -> ConfigError:
        """The one-line error for an unknown ``name``."""
        known = ", ".join(sorted(self.names()))
        if self.aliases:
            known += " (aliases: " + ", ".join(f"{a}={c}" for a, (c, _) in sorted(self.aliases.items())) + ")"
        return ConfigError(f"unknown {self.kind} {name!r}; known: {known}")

    def resolve(self, name: Any) -> tuple[str, dict[str, Any]]:
        """``(canonical name, options the alias fixes)``; ConfigError for an unknown name."""
        key = self._normalize(name)
        key, fixed = self.aliases.get(key, (key, {}))
        if key not in self._entries:
            raise self.error(name)
        return key, dict(fixed)

    def entry(self, name: Any) -> Entry:
        """The :class:`Entry` of ``name`` or an alias of it."""
        return self._entries[self.resolve(name)[0]]

    def get(self, name: Any, default: Any = ...) -> Any:  # type: ignore[override]
        """The object registered as ``name`` (or an alias of it); ConfigError if unknown,
        unless a ``default`` is given (then as :meth:`dict.get`)."""
        if default is not ...:
            key = self._normalize(name)
            key = self.aliases.get(key, (key, {}))[0]
            return self._entries[key].obj if key in self._entries else default
        return self.entry(name).obj

    def options(self, name: Any) -> dict[str, Any]:
        """The options ``name`` means: the entry's presets, then the alias's fixed ones."""
        key, fixed = self.resolve(name)
        return {**self._entries[key].options, **fixed}

    def merged_options(self, name: Any, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(canonical name, options)``: the name's presets, then ``options``, then what an alias
        fixes (ConfigError if ``options`` contradict it)."""
        key, fixed = self.resolve(name)
        for k, v in fixed.items():
            if k in options and options[k] != v:
                raise ConfigError(f"{self.kind} {name!r} means {k}={v!r}; "
                                  f"it cannot be combined with {k}={options[k]!r}")
        return key, {**self._entries[key].options, **options, **fixed}

    def create(self, name: Any, *args: Any, **options: Any) -> Any:
        """Build ``name`` with :meth:`merged_options`."""
        key, merged = self.merged_options(name, options)
        obj = self._entries[key].obj
        made = self._build(obj, *args, **merged) if self._build is not None else obj(*args, **merged)
        if hasattr(made, "registry_name"):  # an instance that wants to know the name it was made under
            made.registry_name = key
        return made

    # -- mapping: canonical name -> object --------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self._entries[name].obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def discover(package: str, skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (except ``skip``) so that each registers itself."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")


__all__ = ["Entry", "Registry", "discover"]
