"""Training-time defenses: train a model from scratch on a (possibly) poisoned training set.

Unlike purification methods (:class:`~fipurify.defenses.base.Defense`), these see the
whole poisoned training set and no clean data::

    model = create_training_defense("abl", isolation_epochs=20).train(model, poisoned_train)

Every phase of a training-time defense runs through the shared loop
:func:`~fipurify.defenses.loop.finetune` (custom losses via its ``objective`` hook), so
there is one training loop. After :meth:`TrainingDefense.train` the defense holds a
``report`` dict (config, timings, per-epoch records tagged with their ``phase``).
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
from ..validation import check_optimisation
from .base import Configured, DefenseConfig, EpochCallback, Options, as_dataset, labelled
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


def check_train_set(dataset: Dataset, model: nn.Module) -> None:
    """Refuse an empty training set, non-image items, and a class-count mismatch with the model."""
    if len(dataset) == 0:
        raise DataError("the training set is empty")
    x, y = dataset[0]
    if getattr(x, "ndim", 0) != 3:
        raise DataError(f"training images must be C x H x W tensors, got shape {tuple(getattr(x, 'shape', ()))}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[None].to(next(model.parameters()).device))
    except RuntimeError as e:
        raise DataError(f"the model cannot process images of shape {tuple(x.shape)}: "
                        f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    n_data = getattr(dataset, "num_classes", None)
    if n_data is not None and n_data != out.shape[-1]:
        raise DataError(f"class count mismatch: the model predicts {out.shape[-1]} classes "
                        f"but the training set has {n_data}")


@torch.no_grad()
def per_sample_loss(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """Cross-entropy of every sample (model in eval mode, no augmentation), in dataset order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            out.append(torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="none").cpu())
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

    @abstractmethod
    def train(self, model: nn.Module, poisoned_train_set: Dataset | DataLoader, *,
              progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        """Train ``model`` (in place) on ``poisoned_train_set``; returns the trained model."""

    def _prepare(self, model: nn.Module, data: Dataset | DataLoader) -> Dataset:
        dataset = as_dataset(data)
        check_train_set(dataset, model)
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
