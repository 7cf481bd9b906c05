"""Poisoned sets and backdoor test sets whose altered images differ from sample to sample.

The base :class:`~fipurify.attacks.base.PoisonedDataset` pastes one trigger on every
flagged image. WaNet (noise mode), CBA (two images mixed), CLB (precomputed adversarial
images), BPPA (negative samples) and the combined attack alter each sample in its own
way, and some also alter samples that KEEP their labels ("cover" samples). They hand the
datasets here a *renderer*::

    render(positions: np.ndarray, images: Tensor N x C x H x W) -> Tensor N x C x H x W

``positions`` index the dataset being built (not the wrapped one) and ``images`` are the
clean images at those positions; the renderer returns the altered images. A renderer
must treat every sample on its own (the same result one at a time or in a batch), so
item access and :meth:`as_arrays` agree.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import BackdoorTestSet, PoisonedDataset, choose_poisoned, stack_clean
from .triggers import Trigger

# choose_poisoned and stack_clean live in base (Attack.poison uses them) and stay importable here.

Renderer = Callable[[np.ndarray, torch.Tensor], torch.Tensor]

_CHUNK = 1024


def choose_cover(rng: np.random.Generator, n_total: int, taken: np.ndarray, count: int,
                 what: str) -> np.ndarray:
    """``count`` sorted indices in ``range(n_total)`` outside ``taken`` (the label-keeping extras)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    free = np.setdiff1d(np.arange(n_total, dtype=np.int64), taken)
    if count > len(free):
        raise ConfigError(f"{what}: {count} extra samples are needed but only {len(free)} "
                          f"unpoisoned samples exist; lower the ratio or the poison rate")
    return np.sort(rng.choice(free, size=count, replace=False))


def _render_into(x: torch.Tensor, positions: np.ndarray, render: Renderer) -> None:
    for start in range(0, len(positions), _CHUNK):
        pos = positions[start:start + _CHUNK]
        x[torch.from_numpy(pos)] = render(pos, x[torch.from_numpy(pos)])


class RenderedPoisonedDataset(PoisonedDataset):
    """A poisoned training set whose altered samples come from a renderer.

    ``poison_flag`` marks the backdoor samples (target label, or clean-label target-class
    samples); ``cover_flag`` marks altered samples that keep their true label (WaNet's
    noise samples, BPPA's negative samples, CBA's mixed benign samples). Both are
    rendered; all other samples are returned clean. ``trigger`` is the attack's trigger
    object (kept for the description; the renderer does the work).
    """

    def __init__(self, dataset: Any, trigger: Trigger, poison_flag: np.ndarray, labels: np.ndarray,
                 original_label: np.ndarray, num_classes: int, render: Renderer,
                 cover_flag: np.ndarray | None = None, name: str | None = None):
        super().__init__(dataset, trigger, poison_flag, labels, original_label, num_classes, name)
        n = len(self.labels)
        self.cover_flag = np.zeros(n, dtype=bool) if cover_flag is None else np.asarray(cover_flag, dtype=bool)
        if self.cover_flag.shape != (n,):
            raise DataError("cover flags must have one entry per sample")
        if (self.cover_flag & self.poison_flag).any():
            raise DataError("a sample cannot be both poisoned and a label-keeping cover sample")
        if (self.labels[self.cover_flag] != self.original_label[self.cover_flag]).any():
            raise DataError("cover samples must keep their labels")
        self.render = render

    @property
    def cover_indices(self) -> np.ndarray:
        """Indices of the altered samples that keep their labels."""
        return np.flatnonzero(self.cover_flag)

    @property
    def altered_flag(self) -> np.ndarray:
        """Samples whose image differs from the clean one: poisoned or cover."""
        return self.poison_flag | self.cover_flag

    def __getitem__(self, index: int):
        img, _ = self.dataset[int(self.original_index[index])]
        if self.poison_flag[index] or self.cover_flag[index]:
            img = self.render(np.array([int(index)], dtype=np.int64), img.unsqueeze(0))[0]
        return img, int(self.labels[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: (N x C x H x W images, N int64 labels), equal to item access."""
        x = stack_clean(self.dataset, self.original_index)
        _render_into(x, np.flatnonzero(self.altered_flag), self.render)
        return x, torch.from_numpy(self.labels.copy())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"poisoned={int(self.poison_flag.sum())}, cover={int(self.cover_flag.sum())}, "
                f"trigger={self.trigger!r})")


class RenderedBackdoorTestSet(BackdoorTestSet):
    """A backdoor test set whose images come from a renderer (see the module docstring)."""

    def __init__(self, dataset: Any, trigger: Trigger, original_index: np.ndarray, true_labels: np.ndarray,
                 targets: np.ndarray, num_classes: int, render: Renderer, name: str | None = None):
        super().__init__(dataset, trigger, original_index, true_labels, targets, num_classes, name)
        self.render = render

    def __getitem__(self, index: int):
        img, _ = self.dataset[int(self.original_index[index])]
        return self.render(np.array([int(index)], dtype=np.int64), img.unsqueeze(0))[0], int(self.targets[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: (N x C x H x W triggered images, N int64 targets)."""
        x = stack_clean(self.dataset, self.original_index)
        _render_into(x, np.arange(len(self), dtype=np.int64), self.render)
        return x, torch.from_numpy(self.targets.copy())


__all__ = ["RenderedPoisonedDataset", "RenderedBackdoorTestSet", "Renderer", "choose_poisoned",
           "choose_cover", "stack_clean"]
