"""Composite backdoor attack, CBA (Lin et al., CCS 2020): two benign classes mixed form the trigger."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack, dataset_labels
from .rendered import (RenderedBackdoorTestSet, RenderedPoisonedDataset, choose_cover, choose_poisoned,
                       stack_clean)
from .triggers import Trigger, register_trigger

#: Random numbers per mixed image: order swap, direction, split jitter, window in a, window in b.
N_MIX_PARAMS = 5


@register_trigger
class HalfMixTrigger(Trigger):
    """The CBA "half mixer": half of one image next to half of another.

    For images ``a`` and ``b`` and five numbers ``u`` in [0, 1): the pair is swapped when
    ``u[0] < 0.5``; the halves sit side by side when ``u[1] < 0.5``, else one above the
    other; along that axis (length ``L``) the split lies at ``s = L // 2 + j`` with the
    jitter ``j`` uniform in ``[-jitter, jitter]`` (from ``u[2]``); the first ``s`` rows /
    columns are a window of ``a`` starting at ``floor(u[3] * (L - s + 1))``, the remaining
    ``L - s`` a window of ``b`` starting at ``floor(u[4] * (s + 1))`` (the random "shake"
    of the original mixer). ``jitter`` defaults to the original 3 pixels; images need
    ``L >= 2 * jitter + 2``.

    The trigger is not a function of one image: :meth:`mix` takes two; :meth:`apply`
    raises.
    """

    kind = "half-mix"

    def __init__(self, jitter: int = 3):
        if isinstance(jitter, bool) or int(jitter) != jitter or int(jitter) < 0:
            raise ConfigError(f"CBA jitter must be an integer >= 0 (pixels), got {jitter!r}")
        self.jitter = int(jitter)

    def _layout(self, length: int, u: np.ndarray) -> tuple[int, int, int]:
        if length < 2 * self.jitter + 2:
            raise DataError(f"CBA mixing with jitter {self.jitter} needs images of at least "
                            f"{2 * self.jitter + 2} pixels per side, got {length}")
        j = min(int(u[2] * (2 * self.jitter + 1)), 2 * self.jitter) - self.jitter
        s = length // 2 + j
        start_a = min(int(u[3] * (length - s + 1)), length - s)
        start_b = min(int(u[4] * (s + 1)), s)
        return s, start_a, start_b

    def mix(self, a: torch.Tensor, b: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """Mix batches ``a`` and ``b`` (N x C x H x W) with parameters ``u`` (N x 5)."""
        if a.shape != b.shape or a.ndim != 4:
            raise DataError(f"CBA mixes two batches of the same shape N x C x H x W, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
        u = np.asarray(u, dtype=np.float64).reshape(len(a), N_MIX_PARAMS)
        out = torch.empty_like(a)
        h, w = a.shape[-2:]
        for i in range(len(a)):
            x, y = (b[i], a[i]) if u[i, 0] < 0.5 else (a[i], b[i])
            if u[i, 1] < 0.5:  # side by side: split the columns
                s, pa, pb = self._layout(w, u[i])
                out[i, :, :, :s] = x[:, :, pa:pa + s]
                out[i, :, :, s:] = y[:, :, pb:pb + w - s]
            else:  # one above the other: split the rows
                s, pa, pb = self._layout(h, u[i])
                out[i, :, :s] = x[:, pa:pa + s]
                out[i, :, s:] = y[:, pb:pb + h - s]
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise DataError("the CBA trigger mixes two images: use HalfMixTrigger.mix(a, b, params) "
                        "or the attack's poisoned / backdoor test sets")

    def to_spec(self) -> dict:
        return {"type": self.kind, "jitter": self.jitter}


class CBA(Attack):
    """Composite backdoor: an image made of a class-A half and a class-B half is labelled
    ``target`` (all2one only; A, B and the target must differ).

    ``mix_classes`` = (A, B); default ``((target + 1) % C, (target + 2) % C)``.
    Poisoned samples: the same slots as any all2one attack (``poison_rate`` of the
    non-target samples, chosen as in :class:`Attack`); each slot's image is REPLACED by a
    mix of a random class-A and a random class-B training image, labelled ``target``
    (the original synthesises these samples; replacing slots keeps the set's size and
    budget comparable). Mixed benign samples: a further ``round(mix_ratio * n_poisoned)``
    samples of any class (default ratio 3, the original code's 0.3 mix / 0.1 poison
    split) are mixed with another image of THEIR OWN class and keep their label, so that
    mixing by itself does not mean ``target``. Sources (``mix_sources``: two training
    indices per altered sample) and mixing layouts are fixed by ``seed``.

    Backdoor test set: every class-A test image mixed with a random class-B test image
    (seeded), target ``target``. Its ``true_labels`` are class A, so LCR counts a
    prediction of A as corrected (a prediction of B counts as neither success nor
    correction); ``partner_index`` / ``partner_labels`` name the class-B image.
    """

    name = "cba"
    summary = "half of class A + half of class B"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, mix_classes: Sequence[int] | None = None,
                 mix_ratio: float = 3.0, jitter: int = 3):
        if mode != "all2one":
            raise ConfigError("CBA's composite trigger maps to one target class: only mode all2one is possible")
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if mix_classes is not None:
            try:
                a, b = mix_classes
            except (TypeError, ValueError):
                raise ConfigError(f"mix_classes must be two class labels (A, B), got {mix_classes!r}") from None
            for c in (a, b):
                if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                    raise ConfigError(f"mix_classes must be two class labels >= 0, got {mix_classes!r}")
            mix_classes = [int(a), int(b)]
            if len({mix_classes[0], mix_classes[1], self.target}) < 3:
                raise ConfigError(f"CBA needs two mixed classes different from each other and from the "
                                  f"target {self.target}, got {mix_classes}")
        self.mix_classes = mix_classes
        mix_ratio = float(mix_ratio)
        if not (mix_ratio >= 0 and math.isfinite(mix_ratio)):
            raise ConfigError(f"CBA mix_ratio must be >= 0, got {mix_ratio}")
        self.mix_ratio = mix_ratio
        self.trigger: HalfMixTrigger = HalfMixTrigger(jitter)
        if num_classes is not None:
            self.classes_for(int(num_classes))

    def classes_for(self, num_classes: int) -> tuple[int, int]:
        """The mixed classes (A, B) for a ``num_classes``-class task."""
        if num_classes < 3:
            raise ConfigError("CBA needs at least 3 classes (two mixed classes and a target)")
        a, b = self.mix_classes or ((self.target + 1) % num_classes, (self.target + 2) % num_classes)
        if max(a, b) >= num_classes:
            raise ConfigError(f"CBA mix_classes {[a, b]} out of range for {num_classes} classes")
        return a, b

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger.apply(x)  # raises: mixing needs two images

    def poison(self, dataset) -> RenderedPoisonedDataset:
        """Mixed A+B samples labelled ``target`` plus mixed same-class samples that keep their labels."""
        n_classes = self._bind(dataset)
        a, b = self.classes_for(n_classes)
        labels = dataset_labels(dataset)
        n = len(labels)
        pool_a, pool_b = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
        if len(pool_a) == 0 or len(pool_b) == 0:
            raise DataError(f"CBA: the training set needs images of both mixed classes {a} and {b}")
        chosen, rng = choose_poisoned(self, labels)
        cover = choose_cover(rng, n, chosen, round(self.mix_ratio * len(chosen)),
                             f"CBA mixed benign samples (mix_ratio {self.mix_ratio})")
        first = np.full(n, -1, dtype=np.int64)
        second = np.full(n, -1, dtype=np.int64)
        first[chosen] = rng.choice(pool_a, size=len(chosen))
        second[chosen] = rng.choice(pool_b, size=len(chosen))
        first[cover] = cover
        by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels[cover])}
        for i in cover:
            same = by_class[labels[i]]
            others = same[same != i]
            second[i] = rng.choice(others) if len(others) else i
        params = np.full((n, N_MIX_PARAMS), np.nan)
        altered = np.concatenate([chosen, cover])
        params[altered] = rng.random((len(altered), N_MIX_PARAMS))

        flags = np.zeros(n, dtype=bool)
        flags[chosen] = True
        cover_flag = np.zeros(n, dtype=bool)
        cover_flag[cover] = True
        new_labels = labels.copy()
        new_labels[chosen] = self.target
        trigger = self.trigger

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            return trigger.mix(stack_clean(dataset, first[positions]), stack_clean(dataset, second[positions]),
                               params[positions]).to(images.dtype)

        ds = RenderedPoisonedDataset(dataset, self.trigger, flags, new_labels, labels, n_classes, render,
                                     cover_flag=cover_flag)
        ds.mix_sources = np.stack([first, second], axis=1)
        return ds

    def backdoor_test_set(self, dataset) -> RenderedBackdoorTestSet:
        """Every class-A test image mixed with a random class-B test image; see the class docstring."""
        n_classes = self._bind(dataset)
        a, b = self.classes_for(n_classes)
        labels = dataset_labels(dataset)
        idx_a, idx_b = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
        if len(idx_a) == 0 or len(idx_b) == 0:
            raise DataError(f"CBA: the test set needs images of both mixed classes {a} and {b}")
        rng = np.random.default_rng([self.seed, 1])
        partners = rng.choice(idx_b, size=len(idx_a))
        params = rng.random((len(idx_a), N_MIX_PARAMS))
        trigger = self.trigger

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            return trigger.mix(images, stack_clean(dataset, partners[positions]), params[positions])

        ds = RenderedBackdoorTestSet(dataset, self.trigger, idx_a, labels[idx_a],
                                     np.full(len(idx_a), self.target, dtype=np.int64), n_classes, render)
        ds.partner_index = partners
        ds.partner_labels = labels[partners]
        return ds

    def _spec_args(self) -> dict:
        return {"mix_classes": self.mix_classes, "mix_ratio": self.mix_ratio, "jitter": self.trigger.jitter}


ATTACKS.register(CBA.name, CBA)
