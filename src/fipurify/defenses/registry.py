"""Named purification methods and their per-dataset presets.

Each defense module registers its class under its names in :data:`DEFENSES`
(``DEFENSES.register("anp", ANP, **ANP.paper_schedule())`` at the end of ``anp.py``);
this module imports every module of the package (:func:`fipurify.registry.discover`),
so a new defense is one new file.
"""
from __future__ import annotations

import warnings
from typing import Any

from ..errors import ConfigError
from ..registry import discover
from .base import DEFENSES, Defense
from .fip import FIP

# The paper's per-dataset FIP settings (appendix A.3.2): clean-set share, epochs, schedule.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"epochs": 50, "lr": 0.01, "milestones": (40,), "gamma": 0.1, "clean_fraction": 0.01},
    "gtsrb": {"epochs": 50, "lr": 0.01, "milestones": (40,), "gamma": 0.1, "clean_fraction": 0.03},
    "tiny-imagenet": {"epochs": 15, "lr": 0.01, "milestones": tuple(range(1, 15)), "gamma": 0.3,
                      "clean_fraction": 0.05},
    "imagenet": {"epochs": 2, "lr": 0.001, "milestones": (1,), "gamma": 0.995, "clean_fraction": 0.03},
}

discover(__package__)  # every defense module registers itself on import

#: method name -> (class, option presets): a live view of :data:`DEFENSES`.
METHODS: dict[str, tuple[type[Defense], dict[str, Any]]] = DEFENSES.table


#: The method used when none is named, per task. Image classification: the default chosen by the
#: clean-data rules (``docs/default-purifier-devlog.md``). Video: the steps of that default that run on
#: clips, its activation clipping with the image settings (its detector finds no trigger on the video
#: stand-in, docs/tasks.md). Tasks not listed use :data:`FALLBACK_METHOD`, the paper's f-FIP, which has
#: not been shown to remove a backdoor there.
DEFAULT_METHODS: dict[str, str] = {"image-classification": "detect-unlearn-clip-all",
                                   "video-classification": "act-clip-all"}
#: Defaults measured on too little to be trusted yet: each warns with its caveat.
PROVISIONAL_DEFAULTS: dict[str, str] = {
    "video-classification": "the default on video ('act-clip-all') is measured on two models of one stand-in "
                            "dataset and one attack, the CIFAR-10 motion clips (ASR 100 -> 1.6 and 2.0 %, ACC -2.1 "
                            "and -1.7 points; docs/tasks.md); check the result"}
FALLBACK_METHOD = "ffip"


def default_method(task: Any = None) -> str:
    """The method :func:`fipurify.purify` and ``fipurify purify`` use when none is named, for
    ``task`` (a :class:`~fipurify.tasks.Task`, its name, or None for image classification)."""
    name = str(getattr(task, "name", task) or "image-classification")
    if name in PROVISIONAL_DEFAULTS:
        warnings.warn(PROVISIONAL_DEFAULTS[name], stacklevel=3)
    if name not in DEFAULT_METHODS:
        warnings.warn(f"no purifier has been shown to remove a backdoor on {name} yet: the default there is "
                      f"'{FALLBACK_METHOD}' (the paper's f-FIP), which did not remove them on images; check the "
                      "result (docs/tasks.md) or name a method", stacklevel=3)
    return DEFAULT_METHODS.get(name, FALLBACK_METHOD)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(METHODS)


def preset(dataset: str) -> dict[str, Any]:
    """The paper's schedule for ``dataset`` (a copy), including its clean-set share."""
    key = dataset.lower().replace("_", "-")
    if key not in PAPER_PRESETS:
        raise ConfigError(f"no preset for dataset {dataset!r}; known: {', '.join(PAPER_PRESETS)}")
    return dict(PAPER_PRESETS[key])


def create(method: str | None = None, dataset: str | None = None, **options: Any) -> Defense:
    """A configured defense: the dataset's FIP schedule (FIP family only), method defaults, then ``options``.
    On a dataset whose labels a horizontal flip changes (``DatasetInfo.flip`` False: GTSRB) every defense
    that has a ``flip`` setting trains without flips unless ``options`` say otherwise.

    ``method`` None is :func:`default_method` for image classification; ``dataset`` is validated for every method.
    """
    name = method if method is not None else default_method()
    entry = DEFENSES.entry(name)
    merged: dict[str, Any] = {}
    if dataset is not None:
        schedule = {k: v for k, v in preset(dataset).items() if k != "clean_fraction"}
        if entry.obj is FIP:  # the presets are FIP's; baselines keep their own papers' schedules
            merged.update(schedule)
    merged.update(entry.options)  # the schedule yields to the name's presets, and both to ``options``
    if dataset is not None and not _flip_keeps_labels(dataset) and "flip" in _fields(entry.obj):
        merged["flip"] = False  # every defense, not only FIP: a mirrored traffic sign has another label
    merged.update(options)
    return DEFENSES.create(name, **merged)


def _flip_keeps_labels(dataset: str) -> bool:
    """What the dataset registry says of horizontal flips (True for a dataset it does not know)."""
    from ..datasets import DATASETS

    key = dataset.lower().replace("_", "-")
    info = DATASETS.entry(key).info if key in DATASETS else None
    return bool(getattr(info, "flip", True))


def _fields(cls: type) -> set[str]:
    from dataclasses import fields, is_dataclass

    config = getattr(cls, "config_class", None)
    return {f.name for f in fields(config)} if config is not None and is_dataclass(config) else set()
