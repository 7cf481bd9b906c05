"""Training-time defenses: train a model from scratch on a (possibly) poisoned training set.

Unlike purification methods (:class:`~fipurify.defenses.base.Defense`), these see the
whole poisoned training set and no clean data::

    model = create_training_defense("abl", isolation_epochs=20).train(model, poisoned_train)

Every phase of a training-time defense runs through the shared loop
:func:`~fipurify.defenses.loop.finetune` (custom losses via its ``objective`` hook), so
there is one training loop. After :meth:`TrainingDefense.train` the defense holds a
``report`` dict (config, timings, per-epoch records tagged with their ``phase``).

The training set's :class:`~fipurify.tasks.Task` (``task=``, else ``task_of``: image
classification) gives the item check, the loss and the augmentation; a method limited to some
tasks names them in ``tasks`` and refuses the others in one line.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..registry import Registry
from ..tasks import ImageClassification, Task, task_of
from ..validation import check_optimisation
from .base import Configured, DefenseConfig, EpochCallback, Options, as_dataset, check_model_runs, labelled
from .loop import make_optimizer


@dataclass
class TrainingDefenseConfig(Options):
    """Optimiser settings shared by the phases of a training-time defense (SGD + Nesterov)."""
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    flip: bool = True
    seed: int = 0

    def validate(self) -> "TrainingDefenseConfig":
        check_optimisation(1, self.lr, self.batch_size, self.momentum, self.weight_decay)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _coerce(self, overrides: dict[str, Any]) -> None:
        for f in fields(self):  # JSON lists from the CLI become the tuples the dataclass holds
            if f.name in overrides and isinstance(getattr(self, f.name), tuple) and overrides[f.name] is not None:
                overrides[f.name] = tuple(overrides[f.name])

    def phase(self, epochs: int, lr: float | None = None, milestones: tuple[int, ...] = (),
              gamma: float = 0.1, **kw: Any) -> DefenseConfig:
        """The loop settings of one phase (no hold-out: a training set is not clean data)."""
        base = {"epochs": epochs, "lr": self.lr if lr is None else lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size, "milestones": tuple(milestones),
                "gamma": gamma, "augment": self.augment, "flip": self.flip, "holdout": 0.0, "min_clean": 1,
                "seed": self.seed}
        base.update(kw)
        return DefenseConfig(**base).validate()


def check_count(name: str, value: int, minimum: int = 0) -> None:
    """ConfigError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sgd(params, cfg: DefenseConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum (as the ABL and CBD reference trainings use)."""
    return make_optimizer(params, cfg, nesterov=cfg.momentum > 0)


def check_train_set(dataset: Dataset, model: nn.Module, task: Task | None = None) -> None:
    """Refuse an empty training set, items that are not of ``task`` (default ``task_of(dataset)``),
    a model that cannot run on one, and (classification) a class-count mismatch with the model or a
    label outside its range (:func:`.base.check_model_runs`)."""
    if len(dataset) == 0:
        raise DataError("the training set is empty")
    task = task if task is not None else task_of(dataset)
    images = task.name == "image-classification"
    x, y = dataset[0]
    if images and getattr(x, "ndim", 0) != 3:
        raise DataError(f"training images must be C x H x W tensors, got shape {tuple(getattr(x, 'shape', ()))}")
    task.check_sample(x, y)
    check_model_runs(model, dataset, task, "images" if images else "items", "training set")


@torch.no_grad()
def per_sample_loss(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                    task: Task | None = None) -> torch.Tensor:
    """The task loss of every sample (``task.per_sample_loss``, default image classification's
    cross-entropy; model in eval mode, no augmentation), in dataset order."""
    task = task if task is not None else ImageClassification()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            out.append(task.per_sample_loss(task.forward(model, x, y), y).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def tag(phase: str, callback: EpochCallback | None) -> EpochCallback:
    """A callback that labels each record with ``phase`` before passing it on."""
    return labelled(callback, "phase", phase)


def format_record(rec: dict[str, Any]) -> str:
    """One log line for a per-epoch record of a training-time defense."""
    skip = {"epoch", "phase", "seconds", "lr"}
    terms = "  ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in skip and isinstance(v, float))
    return f"{rec.get('phase', '')} epoch {rec['epoch']:3d}  {terms}  lr {rec['lr']:.4g}  ({rec['seconds']:.1f}s)"


class TrainingDefense(Configured, ABC):
    """Base class: configure in the constructor, train from scratch in :meth:`train`."""

    name: ClassVar[str] = "training-defense"
    config_class: ClassVar[type[TrainingDefenseConfig]] = TrainingDefenseConfig
    config: TrainingDefenseConfig
    action: ClassVar[str] = "train"

    @abstractmethod
    def train(self, model: nn.Module, poisoned_train_set: Dataset | DataLoader, *, task: Task | str | None = None,
              progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        """Train ``model`` (in place) on ``poisoned_train_set``; returns the trained model.
        ``task`` is the problem (a Task or a registered name); default ``task_of(poisoned_train_set)``."""

    def _prepare(self, model: nn.Module, data: Dataset | DataLoader, task: Task | str | None = None) -> Dataset:
        """The training set as a Dataset, after setting :attr:`task` (or refusing it), checking the
        set against the model and seeding torch."""
        dataset = as_dataset(data)
        self.use_task(task if task is not None else dataset)
        check_train_set(dataset, model, self.task)
        torch.manual_seed(self.config.seed)
        return dataset

    def make_report(self, train_set: Dataset, n_trainable: int, seconds: dict[str, float],
                    history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """Fill ``self.report`` with the fields every training-time defense reports, ``extra``
        method-specific ones."""
        self.report = {"method": self.name, "config": self.config.to_dict(), "n_train": len(train_set),
                       "n_trainable": int(n_trainable), **extra, "seconds": dict(seconds), "history": history}
        return self.report


def _build(cls: type, **opts: Any) -> "TrainingDefense":
    return cls(cls.config_class(), **opts)


#: Training-time defenses: each module registers its class (``TRAINING_DEFENSES.register("abl", ABL)``);
#: the package imports them all (:func:`fipurify.registry.discover`).
TRAINING_DEFENSES = Registry("training-time defense", build=_build)


def available_training_defenses() -> list[str]:
    """Names accepted by :func:`create_training_defense`."""
    return sorted(TRAINING_DEFENSES)


def create_training_defense(name: str, **opts: Any) -> TrainingDefense:
    """A configured training-time defense (``abl``, ``cbd``); unknown names or options raise ConfigError."""
    return TRAINING_DEFENSES.create(name, **opts)
