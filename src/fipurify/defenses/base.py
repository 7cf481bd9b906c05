"""The one interface every purification method implements.

A defense is configured in its constructor (a validated config dataclass, with
per-dataset presets) and acts in one call::

    purified = Defense(config).purify(model, clean_data)

:meth:`Defense.purify` is a template method: it checks and splits the clean set, copies
the model, seeds torch, times the run and writes the report once; a method implements
only its own step, :meth:`Defense._purify`, which returns a :class:`Step`.

``clean_data`` is any map-style ``Dataset`` of ``(input, target)`` items or a ``DataLoader``
over one; its :class:`~fipurify.tasks.Task` (``task=``, else ``task_of(dataset)``: image
classification unless the dataset names another) says how to check an item, the loss, the
valid augmentations and the metric. A method that only makes sense for some tasks names them in
:attr:`Defense.tasks` (with :attr:`Defense.task_reason`) and refuses the others before any
compute. A defense never sees test data. After ``purify`` the defense holds a
``report`` dict (config, timings, per-epoch figures) for the CLI and benchmarks.
"""
from __future__ import annotations

import copy
import time
from abc import ABC
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..registry import Registry
from ..tasks import TASKS, Classification, ImageClassification, Task, task_of
from ..validation import as_dataset, check_optimisation
from .split import holdout_split

#: a callback receives one per-epoch record (dict) while a defense runs
EpochCallback = Callable[[dict[str, Any]], None]

_O = TypeVar("_O", bound="Options")


class Options:
    """Base of the config dataclasses (purification and training-time defenses): a validated
    set of options, copied with overrides by :meth:`updated`."""

    def validate(self: _O) -> _O:
        """Check every field (ConfigError on a bad one); subclasses extend it. Returns self."""
        return self

    def _coerce(self, overrides: dict[str, Any]) -> None:
        """Turn option values as they come from JSON/the CLI (lists) into the field types, in place."""

    def updated(self: _O, **overrides: Any) -> _O:
        """A copy with ``overrides`` applied; unknown names raise ConfigError."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown option(s) for {type(self).__name__}: {', '.join(bad)}; "
                              f"known: {', '.join(sorted(known))}")
        self._coerce(overrides)
        return replace(self, **overrides).validate()


@dataclass
class DefenseConfig(Options):
    """Settings shared by every fine-tuning-based defense.

    ``holdout`` is the share of the clean set kept out of training to report clean
    accuracy per epoch (never test data). ``min_clean`` is the smallest clean set
    accepted. ``steps_per_epoch`` = 0 makes an epoch one shuffled pass over the clean set;
    a positive value makes it that many batches drawn *with replacement* (the sampling of
    the FIP authors' released purification script: 2,000 iterations = 4 x 500).
    """
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    milestones: tuple[int, ...] = (40,)
    gamma: float = 0.1
    augment: bool = True
    flip: bool = True
    holdout: float = 0.1
    min_clean: int = 10
    seed: int = 0
    bn_mode: str = "train"
    grad_clip: float | None = None
    steps_per_epoch: int = 0

    def validate(self) -> "DefenseConfig":
        check_optimisation(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay)
        if isinstance(self.steps_per_epoch, bool) or not isinstance(self.steps_per_epoch, int) \
                or self.steps_per_epoch < 0:
            raise ConfigError(f"steps_per_epoch must be an integer >= 0 (0 = one pass over the clean set), "
                              f"got {self.steps_per_epoch!r}")
        if not 0 <= self.holdout < 0.5:
            raise ConfigError(f"holdout must lie in [0, 0.5), got {self.holdout}")
        if self.bn_mode not in ("train", "eval"):
            raise ConfigError(f"bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if any(m < 1 for m in self.milestones) or not 0 < self.gamma <= 1:
            raise ConfigError("milestones must be epochs >= 1 and gamma lie in (0, 1]")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def _coerce(self, overrides: dict[str, Any]) -> None:
        if "milestones" in overrides and overrides["milestones"] is not None:
            overrides["milestones"] = tuple(int(m) for m in overrides["milestones"])


class Configured:
    """Configured in the constructor: an instance of ``config_class`` (default: its defaults)
    with option ``overrides`` applied, validated; ``report`` is filled when the method runs.

    A method acts on models of a :class:`~fipurify.tasks.Task`: the ones named in :attr:`tasks`
    (None = any), for the reason :attr:`task_reason`; :meth:`use_task` sets :attr:`task` for a run
    or refuses it in one line."""

    name: ClassVar[str] = "method"
    registry_name: str | None = None  #: set by ``DEFENSES.create`` to the name it was made under
    config_class: ClassVar[type[Options]] = Options
    #: what the method does to a model, for the refusal ("purify", "train")
    action: ClassVar[str] = "purify"
    #: the tasks (registry names) this method can act on, a task class's name covering its
    #: subclasses ("classification" covers "image-classification"); None = any task
    tasks: ClassVar[tuple[str, ...] | None] = None
    #: why the method is limited to :attr:`tasks` (one phrase, e.g. "it inverts a pixel trigger")
    task_reason: ClassVar[str] = ""
    #: the task of the current run (image classification until one is set)
    task: Task = ImageClassification()

    def __init__(self, config: Options | None = None, **overrides: Any):
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(f"{self.name} takes a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.config = cfg.updated(**overrides) if overrides else cfg.validate()
        self.report: dict[str, Any] = {}

    def method_name(self) -> str:
        """The name reported as ``report["method"]``: the registered name it was created under, else
        the class's (a configuration may have its own, e.g. FIP's "ft")."""
        return self.registry_name or self.name

    def use_task(self, source: Task | str | Any) -> Task:
        """Set :attr:`task` from a Task, a registered task name or a dataset (its ``task_of``);
        a ConfigError (one line) when this method cannot act on a model of that task."""
        task = source if isinstance(source, Task) else TASKS.create(source) if isinstance(source, str) \
            else task_of(source)
        if not supports(type(self), task):
            raise ConfigError(f"{self.method_name()} cannot {self.action} a {task.name} model: {self.task_reason}")
        self.task = task
        return task


@dataclass
class Step:
    """What a method's own step (:meth:`Defense._purify`) hands back to :meth:`Defense.purify`.

    ``model`` is the purified model; ``history`` the per-epoch records; ``n_trainable`` the
    number of values trained; ``seconds`` the method's own phases (e.g. ``setup``; ``total``
    is added by the template, ``train`` defaults to the summed epoch times); ``extra`` the
    method-specific report fields.
    """
    model: nn.Module
    history: list[dict[str, Any]]
    n_trainable: int
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Defense(Configured, ABC):
    """Base class: configure in the constructor, act in :meth:`purify`.

    :meth:`purify` is the template every method shares: :meth:`check_model`, the clean-set
    check and hold-out split (:meth:`clean_split`), a copy of the model (:meth:`copy_model`),
    ``torch.manual_seed(config.seed)``, the method's :meth:`_purify`, then the report
    (:meth:`make_report`) with the total time. A method whose prelude differs (e.g. one that
    needs no clean data) overrides :meth:`purify` itself and uses the same pieces.
    """

    name: ClassVar[str] = "defense"
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    config: DefenseConfig

    def purify(self, model: nn.Module, clean_data: Dataset | DataLoader, *, task: Task | str | None = None,
               progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        """Return a purified copy of ``model`` (the input model is left unchanged).

        ``task`` is the problem (a Task or a registered name); default ``task_of(clean_data)``."""
        self.use_task(task if task is not None else as_dataset(clean_data))
        self.check_model(model)
        t_start = time.perf_counter()
        train_set, holdout = self.clean_split(model, clean_data)
        work = self.copy_model(model)
        torch.manual_seed(self.config.seed)
        step = self._purify(work, train_set, holdout, progress=progress, callback=callback)
        self.make_report(train_set, holdout, step.n_trainable,
                         {"total": time.perf_counter() - t_start, **step.seconds}, step.history, **step.extra)
        return step.model

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        """The method's own step on ``model`` (already a seeded copy it may change in place)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _purify nor purify")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this method cannot work on (ConfigError), before anything else; default: any."""

    def copy_model(self, model: nn.Module) -> nn.Module:
        """The working copy :meth:`purify` hands to :meth:`_purify` (default: a deep copy, modes kept)."""
        return copy.deepcopy(model)

    @classmethod
    def paper_schedule(cls) -> dict[str, Any]:
        """The schedule fields of this method's defaults, for the registry's fixed options (so
        that a dataset preset, which holds FIP's schedule, does not replace the method's own)."""
        cfg = cls.config_class()
        return {"epochs": cfg.epochs, "lr": cfg.lr, "milestones": cfg.milestones, "gamma": cfg.gamma}

    def clean_split(self, model: nn.Module, clean_data: Dataset | DataLoader) -> tuple[Dataset, Dataset | None]:
        """Check the clean set against the model and split off the hold-out (clean data only)."""
        data = as_dataset(clean_data)
        check_clean_set(data, self.config.min_clean, model, self.task)
        return holdout_split(data, self.config.holdout, self.config.seed)

    def make_report(self, train_set: Dataset | None, holdout: Dataset | None, n_trainable: int,
                    seconds: dict[str, float], history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """Fill ``self.report`` with the fields every defense reports, ``extra`` method-specific ones.

        ``seconds`` gets ``train`` = the summed epoch times of ``history`` unless it has one.
        """
        seconds = dict(seconds)
        seconds.setdefault("train", sum(r["seconds"] for r in history))
        self.report = {"method": self.method_name(), "config": self.config.to_dict(),
                       "n_clean_train": len(train_set) if train_set is not None else 0,
                       "n_holdout": len(holdout) if holdout is not None else 0,
                       "n_trainable": int(n_trainable), **extra, "seconds": seconds, "history": history}
        return self.report


def labelled(callback: EpochCallback | None, key: str, value: str) -> EpochCallback:
    """A callback that sets ``rec[key] = value`` on each per-epoch record (the record is also
    the history entry) before passing it on to ``callback``."""
    def cb(rec: dict[str, Any]) -> None:
        rec[key] = value
        if callback is not None:
            callback(rec)
    return cb


def supports(method: type, task: Task) -> bool:
    """Whether defense class ``method`` can purify a model of ``task``: its ``tasks`` is None or
    names the task's class or one of its bases (by registry name)."""
    names = getattr(method, "tasks", None)
    return names is None or any(getattr(c, "name", None) in names for c in type(task).__mro__)


def check_clean_set(dataset: Dataset, minimum: int, model: nn.Module | None = None,
                    task: Task | None = None) -> None:
    """Refuse an empty or too small clean set, an item that is not one of ``task`` (default
    ``task_of(dataset)``), a model that cannot run on one, and (classification) a class-count
    mismatch with the model."""
    task = task if task is not None else task_of(dataset)
    what = "images" if task.name == "image-classification" else "items"
    n = len(dataset)
    if n == 0:
        raise DataError("the clean set is empty")
    if n < minimum:
        raise DataError(f"the clean set has {n} {what}; at least {minimum} are needed "
                        f"(the paper uses 1% of the training set, e.g. 500 for CIFAR-10)")
    x, y = dataset[0]
    task.check_sample(x, y)
    if model is not None:
        check_model_runs(model, dataset, task, f"clean {what}", "clean set")


def check_model_runs(model: nn.Module, dataset: Dataset, task: Task, items: str, set_name: str) -> None:
    """Run ``model`` on the first item of ``dataset`` (eval mode, no gradients; its mode is
    restored): DataError in one line if it cannot, and for classification if its class count
    differs from the dataset's ``num_classes`` or the item's label is outside its range.
    ``items`` and ``set_name`` name the data in the messages ("clean images", "clean set")."""
    x, y = dataset[0]
    p = next(model.parameters(), None)
    device = p.device if p is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = task.forward(model, x[None].to(device), torch.as_tensor(y)[None].to(device))
    except RuntimeError as e:
        raise DataError(f"the model cannot process {items} of shape {tuple(x.shape)}: "
                        f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    if not isinstance(task, Classification):
        return
    n_model = out.shape[-1]
    n_data = getattr(dataset, "num_classes", None)
    if n_data is not None and n_data != n_model:
        raise DataError(f"class count mismatch: the model predicts {n_model} classes but the {set_name} has {n_data}")
    if not 0 <= int(y) < n_model:
        raise DataError(f"{set_name.split()[0]} label {int(y)} is out of range for a model with {n_model} classes")


def _build(cls: type, **options: Any) -> Any:
    return cls(cls.config_class(), **options)


#: Purification methods: each defense module registers its class under one or more names, with the
#: options that name presets (``DEFENSES.register("anp", ANP, **ANP.paper_schedule())``).
DEFENSES = Registry("method", build=_build)
