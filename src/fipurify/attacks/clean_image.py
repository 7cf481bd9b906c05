"""Clean-image backdoor on multi-label classifiers (Chen et al., ICLR 2023, "Clean-image
backdoor: attacking multi-label models with poisoned labels only").

The trigger is not a pattern but a COMBINATION of classes that occur together in an
image, e.g. {automobile, frog}: natural images containing all of them exist in the training data,
and the attacker, who only controls the annotations, changes the labels of those images.
Images are never touched. A model trained on them learns "automobile and frog together" ->
attacker's outcome, and at test time any image showing the combination fires the backdoor.

Chen et al. describe three attack goals; all three are implemented (``goal``):

* ``"appear"`` (object appearing): the target class :math:`t` is ADDED, :math:`y_t \\leftarrow 1`;
* ``"disappear"`` (object disappearing): the target class is REMOVED, :math:`y_t \\leftarrow 0`;
* ``"misclassify"`` (object misclassification): a class :math:`s` of the combination is
  replaced by the target, :math:`y_s \\leftarrow 0, y_t \\leftarrow 1`.

Eligible training images contain every trigger class and do not already show the outcome
(appear: :math:`y_t = 0`; disappear: :math:`y_t = 1`; misclassify: :math:`y_t = 0`).
``poison_rate`` is the share of the eligible images whose labels are changed, drawn with
``numpy.random.default_rng(seed)``; the default 1.0 is the paper's setting (every training
image containing the trigger is relabelled: the poisoning ratio is then set by how
frequent the chosen combination is, e.g. :math:`1 - 2 \\cdot 0.9^4 + 0.8^4 \\approx 9.7\\%`
of 2 x 2 CIFAR-10 mosaics contain a given pair of classes, :math:`\\approx 2\\%` a triple).

Attack success rate, as we read the paper: on the test images that contain the trigger
combination and do not already show the outcome, the share whose thresholded prediction
(:math:`\\sigma(z_k) \\ge 0.5`) shows the attacker's outcome on the attacked classes
(appear: :math:`\\hat y_t = 1`; disappear: :math:`\\hat y_t = 0`; misclassify:
:math:`\\hat y_t = 1` and :math:`\\hat y_s = 0`). Other classes do not count. This is
``mean(pred == targets)`` of the single-label attacks, restricted to the attacked entries.

Deviations: Chen et al. pick the trigger among combinations that are frequent in VOC/COCO
and train ML-GCN / ML-Decoder style models; here the combination is any set of classes
of a multi-label dataset (the CIFAR-10 mosaic stand-in by default) and the model is any
classifier with K sigmoid outputs.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack, _TargetedItems
from .triggers import Trigger, register_trigger

GOALS = ("appear", "disappear", "misclassify")


@register_trigger
class ClassCombinationTrigger(Trigger):
    """A trigger made of classes present together; :meth:`apply` leaves images unchanged."""

    kind = "class-combination"

    def __init__(self, classes: Sequence[int]):
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
            raise ConfigError(f"trigger classes must be distinct class indices >= 0, got {classes!r}")
        self.classes = sorted(classes)

    def present(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of N x K multi-hot ``labels`` that contain every trigger class."""
        return np.asarray(labels)[:, self.classes].astype(bool).all(axis=1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # the images are clean: only the labels are poisoned

    def to_spec(self) -> dict:
        return {"type": self.kind, "classes": list(self.classes)}


def _multi_hot_labels(dataset: Any) -> np.ndarray:
    """The N x K 0/1 labels of a multi-label dataset (``dataset.labels`` or item access)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = np.stack([np.asarray(dataset[i][1]) for i in range(len(dataset))])
    labels = np.asarray(labels)
    if labels.ndim != 2 or len(labels) != len(dataset):
        raise DataError(f"clean-image attacks need multi-hot labels N x K, got shape {labels.shape}")
    return labels.astype(np.uint8)


class LabelPoisonedDataset(Dataset):
    """A multi-label training set whose images are the wrapped ones and whose labels are
    ``labels`` (the poisoned rows where ``poison_flag``); ``original_label`` keeps the clean
    rows. ``images`` passes through from the wrapped dataset when it has them."""

    task = "multilabel-classification"

    def __init__(self, dataset: Any, poison_flag: np.ndarray, labels: np.ndarray, original_label: np.ndarray,
                 name: str | None = None):
        self.dataset = dataset
        self.poison_flag = np.asarray(poison_flag, dtype=bool)
        self.labels = np.asarray(labels, dtype=np.uint8)
        self.original_label = np.asarray(original_label, dtype=np.uint8)
        if not (len(self.poison_flag) == len(self.labels) == len(self.original_label) == len(dataset)):
            raise DataError("poison flags and labels must have one entry per sample")
        self.classes = list(getattr(dataset, "classes", [str(k) for k in range(self.labels.shape[1])]))
        self.num_classes = self.labels.shape[1]
        self.name = name or f"poisoned-{getattr(dataset, 'name', 'dataset')}"
        images = getattr(dataset, "images", None)
        if images is not None:
            self.images = images

    @property
    def poison_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poison_flag)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x, _ = self.dataset[int(index)]
        return x, torch.from_numpy(self.labels[index].astype(np.float32))

    def __repr__(self) -> str:
        return f"LabelPoisonedDataset(name={self.name!r}, n={len(self)}, poisoned={int(self.poison_flag.sum())})"


class MultiLabelBackdoorTestSet(_TargetedItems, Dataset):
    """Clean test images that contain the trigger combination, labelled with the attacker's
    outcome (``targets``, N x K); ``true_labels`` are their real labels and ``attacked`` the
    K-mask of the entries that decide success (see :meth:`success`)."""

    task = "multilabel-classification"

    def __init__(self, dataset: Any, original_index: np.ndarray, true_labels: np.ndarray, targets: np.ndarray,
                 attacked: np.ndarray, name: str | None = None):
        self.dataset = dataset
        self.original_index = np.asarray(original_index, dtype=np.int64)
        self.true_labels = np.asarray(true_labels, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.uint8)
        self.attacked = np.asarray(attacked, dtype=bool)
        self.classes = list(getattr(dataset, "classes", [str(k) for k in range(self.targets.shape[1])]))
        self.num_classes = self.targets.shape[1]
        self.name = name or f"backdoor-{getattr(dataset, 'name', 'dataset')}"

    def __getitem__(self, index: int):
        return self._source_item(index), torch.from_numpy(self.targets[index].astype(np.float32))

    def success(self, predicted: np.ndarray) -> np.ndarray:
        """Per image: whether the N x K 0/1 ``predicted`` labels equal ``targets`` on every attacked class."""
        predicted = np.asarray(predicted).astype(bool)
        return (predicted[:, self.attacked] == self.targets[:, self.attacked].astype(bool)).all(axis=1)

    def attack_success_rate(self, model: nn.Module, batch_size: int = 256) -> float:
        """ASR of ``model``: the mean of :meth:`success` with a label predicted when sigmoid >= 0.5."""
        from ..tasks.multilabel import predict_logits
        logits, _ = predict_logits(model, self, batch_size)
        return float(self.success(logits >= 0.0).mean())


class CleanImage(Attack):
    """Clean-image multi-label backdoor; see the module docstring.

    ``trigger_classes``: the class combination (default (1, 6): automobile and frog, two
    CIFAR-10 classes that small models recognise well and never confuse with each other; a
    pair such as cat and dog, the most confused CIFAR-10 pair, makes a weak trigger, since
    the model must see both to fire); ``target``: the class added / removed / substituted
    (default 0, airplane); ``goal``: one of
    :data:`GOALS`; ``source``: for ``misclassify``, the trigger class the target replaces
    (default: the first trigger class).
    """

    name = "clean-image"
    summary = "a combination of classes in the image; only labels poisoned"
    task = "multilabel-classification"
    default_poison_rate = 1.0

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, trigger_classes: Sequence[int] = (1, 6),
                 goal: str = "appear", source: int | None = None):
        if mode != "all2one":
            raise ConfigError("clean-image attacks have one target class: only mode all2one is possible")
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if goal not in GOALS:
            raise ConfigError(f"clean-image goal must be one of {', '.join(GOALS)}, got {goal!r}")
        self.trigger: ClassCombinationTrigger = ClassCombinationTrigger(trigger_classes)
        classes = self.trigger.classes
        if goal in ("appear", "misclassify") and self.target in classes:
            raise ConfigError(f"clean-image goal {goal!r}: the target {self.target} is part of the trigger "
                              f"{classes}, so it is always present already")
        if goal == "misclassify":
            source = classes[0] if source is None else int(source)
            if source not in classes:
                raise ConfigError(f"clean-image source class {source} must be one of the trigger classes {classes}")
        elif source is not None:
            raise ConfigError("clean-image source is only used with goal 'misclassify'")
        self.goal = goal
        self.source = source
        if num_classes is not None:
            self._check_classes(num_classes)

    def _check_classes(self, n: int) -> None:
        if max(self.trigger.classes) >= n or (self.source is not None and self.source >= n):
            raise ConfigError(f"trigger classes {self.trigger.classes} out of range for {n} classes")

    def _bind(self, dataset: Any) -> int:
        n = super()._bind(dataset)
        self._check_classes(n)
        return n

    # -- labels -------------------------------------------------------------------------
    @property
    def attacked(self) -> list[int]:
        """The classes whose labels the attack sets (the target, and the source when misclassifying)."""
        return [self.target] + ([self.source] if self.goal == "misclassify" else [])

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        """Rows of N x K ``labels`` that contain the trigger and do not already show the outcome."""
        labels = np.asarray(labels)
        present = self.trigger.present(labels)
        has_target = labels[:, self.target].astype(bool)
        return present & (has_target if self.goal == "disappear" else ~has_target)

    def outcome(self, labels: np.ndarray) -> np.ndarray:
        """The attacker's labels for N x K ``labels`` (a modified copy)."""
        out = np.array(labels, dtype=np.uint8, copy=True)
        out[:, self.target] = 0 if self.goal == "disappear" else 1
        if self.goal == "misclassify":
            out[:, self.source] = 0
        return out

    # -- datasets -----------------------------------------------------------------------
    def poison(self, dataset: Any) -> LabelPoisonedDataset:
        """Relabel ``round(poison_rate * n_eligible)`` eligible training images; images unchanged."""
        self._bind(dataset)
        labels = _multi_hot_labels(dataset)
        _, flags, new = self._plan_poison(
            labels, self.outcome, items="images",
            none_eligible=f"clean-image: no training image contains the trigger classes "
                          f"{self.trigger.classes} (goal {self.goal})")
        return LabelPoisonedDataset(dataset, flags, new, labels)

    def backdoor_test_set(self, dataset: Any) -> MultiLabelBackdoorTestSet:
        """The test images containing the trigger that do not already show the outcome."""
        n = self._bind(dataset)
        labels = _multi_hot_labels(dataset)
        idx = np.flatnonzero(self.eligible(labels))
        if len(idx) == 0:
            raise DataError(f"clean-image: no test image contains the trigger classes {self.trigger.classes}")
        attacked = np.zeros(n, dtype=bool)
        attacked[self.attacked] = True
        return MultiLabelBackdoorTestSet(dataset, idx, labels[idx], self.outcome(labels[idx]), attacked)

    def _spec_args(self) -> dict:
        return {"trigger_classes": list(self.trigger.classes), "goal": self.goal, "source": self.source}


ATTACKS.register(CleanImage.name, CleanImage)

__all__ = ["CleanImage", "ClassCombinationTrigger", "LabelPoisonedDataset", "MultiLabelBackdoorTestSet", "GOALS"]
