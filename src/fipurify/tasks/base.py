"""What a defense needs to know about the problem, apart from the model: a :class:`Task`.

Defenses, the Fisher estimators and the evaluation code ask the task, never assume images:

* :meth:`Task.check_sample` refuses one clean item that is not of this task (one-line
  :class:`~fipurify.errors.DataError`), before any compute;
* :meth:`Task.forward` runs the model on a batch (a classifier: ``model(x)``; a
  sequence-to-sequence model also gets the shifted target, teacher forcing);
* :meth:`Task.loss` is the training loss of a batch (mean over samples), the term every
  fine-tuning defense minimises; :meth:`Task.per_sample_loss` the same per sample;
* :meth:`Task.sample_targets` draws targets from the model's own predictive distribution
  (the *true* Fisher :math:`F = E_x E_{\\hat y \\sim p_\\theta(\\cdot|x)}[\\nabla \\log p_\\theta(\\hat y|x)
  \\nabla \\log p_\\theta(\\hat y|x)^\\top]` needs them);
* :meth:`Task.augment` applies the augmentations that are valid for this task to a batch
  (crop and flip for natural images; rotation about the up axis and jitter for point clouds;
  word deletion for sentences);
* :meth:`Task.score` is the task's clean metric of a model on a dataset (accuracy, mAP, BLEU),
  :attr:`Task.metric` its name.

A task is one small object, registered in :data:`TASKS` by its module
(``TASKS.register("image-classification", ImageClassification)``); a dataset names its task
(``dataset.task``, default image classification), see :func:`task_of`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..registry import Registry


class Task(ABC):
    """The problem a model solves, as far as training, purifying and evaluating it go."""

    #: registry name, e.g. "image-classification"
    name: str = "task"
    #: the name of :meth:`score`'s value, e.g. "accuracy", "mAP", "BLEU"
    metric: str = "score"
    #: how a batch is assembled from items (``DataLoader(collate_fn=...)``); None = torch's default
    #: stacking, a function for items of different lengths (e.g. sentences, padded)
    collate_fn: Any = None
    #: the rank of the per-channel feature maps of this task's models, channel at dimension 1:
    #: 4 for ``(N, C, H, W)`` (images, a video model's per-frame CNN), 3 for ``(N, C, P)`` (a
    #: point-cloud model's per-point features); None where the models' activations are not
    #: channel-first maps (a transformer's ``(N, L, D)``). Defenses that act per channel
    #: (activation clipping) ask this instead of the task's name.
    feature_map_ndim: int | None = None

    @abstractmethod
    def check_sample(self, x: Any, y: Any) -> None:
        """Raise DataError (one line) if ``(x, y)`` is not one item of this task."""

    def forward(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The model's output on batch ``x`` (``y`` only for models that are fed the target)."""
        return model(x)

    @abstractmethod
    def per_sample_loss(self, output: Tensor, y: Tensor) -> Tensor:
        """The training loss of each sample (a vector of batch length) given the model's output:
        the negative log-likelihood :math:`-\\log p_\\theta(y|x)` (the Fisher code takes its gradient
        as the score)."""

    def mean_loss(self, output: Tensor, y: Tensor) -> Tensor:
        """The mean training loss of a batch given the model's output (when the output is shared)."""
        return self.per_sample_loss(output, y).mean()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The mean training loss of the batch (what fine-tuning minimises)."""
        return self.mean_loss(self.forward(model, x, y), y)

    @abstractmethod
    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the predictive distribution the output defines (for the true Fisher)."""

    def augment(self, x: Tensor, generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """A randomly augmented copy of batch ``x`` (default: none is valid, ``x`` itself)."""
        return x

    @abstractmethod
    def score(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
        """The clean metric (:attr:`metric`) of ``model`` on ``dataset``, in [0, 1] (BLEU / 100)."""


#: Tasks by name; each task module registers its class.
TASKS = Registry("task")


def task_of(dataset: Any) -> Task:
    """The task of ``dataset``: its ``task`` attribute (a Task or a registered name), or that of
    the set it wraps (``.dataset``, e.g. a ``Subset``), else image classification (every dataset fipurify had before tasks existed)."""
    while getattr(dataset, "task", None) is None and getattr(dataset, "dataset", None) is not None:
        dataset = dataset.dataset  # a Subset (or any wrapper exposing .dataset) has its base set's task
    t = getattr(dataset, "task", None)
    if isinstance(t, Task):
        return t
    return TASKS.create(t if t is not None else "image-classification")
