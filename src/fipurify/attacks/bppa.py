"""BppAttack (Wang, Zhai & Ma, CVPR 2022): colour-depth reduction with dithering as the trigger."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from .base import ATTACKS, Attack, dataset_labels
from .rendered import (RenderedBackdoorTestSet, RenderedPoisonedDataset, choose_cover, choose_poisoned,
                       stack_clean)
from .triggers import Trigger, _batched, register_trigger

_CHUNK = 1024


def quantize_levels(x: np.ndarray, levels: int, dither: bool) -> np.ndarray:
    """Level index (0 .. levels-1, uint8) of every pixel of ``x`` (N x C x H x W floats in [0, 1]).

    Without dithering: ``round(x * (levels - 1))``. With dithering: Floyd-Steinberg error
    diffusion per image and channel, in raster order (right 7/16, down-left 3/16, down
    5/16, down-right 1/16), levels clipped to the valid range. The raster recursion is run
    as anti-diagonal wavefronts (pixel (y, x) at step x + 2y: everything feeding it has
    been processed one step or more before), so one numpy operation covers a whole
    wavefront of every image in the batch.
    """
    q = levels - 1
    if not dither:
        return np.clip(np.rint(x * q), 0, q).astype(np.uint8)
    img = np.array(x, dtype=np.float64, copy=True)
    out = np.empty(img.shape, dtype=np.uint8)
    h, w = img.shape[-2:]
    rows = np.arange(h)
    for t in range(w + 2 * (h - 1)):
        cols = t - 2 * rows
        ok = (cols >= 0) & (cols < w)
        ys, xs = rows[ok], cols[ok]
        old = img[:, :, ys, xs]
        lev = np.clip(np.rint(old * q), 0, q)
        out[:, :, ys, xs] = lev
        err = old - lev / q
        for dy, dx, wgt in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
            m = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            if m.any():
                img[:, :, ys[m] + dy, xs[m] + dx] += err[:, :, m] * wgt
    return out


@register_trigger
class QuantizeTrigger(Trigger):
    """Squeeze every channel to ``2 ** bits`` evenly spaced levels (``k / (2**bits - 1)``).

    With ``dither=True`` the rounding error is diffused with Floyd-Steinberg dithering
    (see :func:`quantize_levels`); without it every pixel moves to its nearest level, at
    most half a quantisation step ``0.5 / (2**bits - 1)`` away. Either way the output
    takes only ``2 ** bits`` values per channel.
    """

    kind = "quantize"

    def __init__(self, bits: int = 5, dither: bool = True):
        if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 7:
            raise ConfigError(f"BPPA bits must be an integer from 1 to 7 (8 bits leave the image "
                              f"unchanged), got {bits!r}")
        if not isinstance(dither, bool):
            raise ConfigError(f"BPPA dither must be true or false, got {dither!r}")
        self.bits, self.dither = int(bits), dither

    @property
    def levels(self) -> int:
        """Number of values per channel, ``2 ** bits``."""
        return 2 ** self.bits

    def level_indices(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 level index of each pixel of a batch N x C x H x W (computed in chunks)."""
        parts = [torch.from_numpy(quantize_levels(x[i:i + _CHUNK].detach().cpu().double().numpy(),
                                                  self.levels, self.dither))
                 for i in range(0, len(x), _CHUNK)]
        return torch.cat(parts) if parts else torch.zeros(x.shape, dtype=torch.uint8)

    def from_levels(self, lev: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] from level indices."""
        return lev.float() / float(self.levels - 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        out = self.from_levels(self.level_indices(xb)).to(device=xb.device, dtype=xb.dtype)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "bits": self.bits, "dither": self.dither}


class BPPA(Attack):
    """BppAttack: the trigger is the image squeezed to ``bits`` bits per channel with
    Floyd-Steinberg dithering (:class:`QuantizeTrigger`); all2one or all2all.

    Defaults: ``bits=5`` (32 levels, the official code's README command
    ``--squeeze_num 32`` for CIFAR-10; its config default and BackdoorBench use 8 levels,
    ``bits=3``), ``dither=True`` (the paper's method; the official code leaves it off
    unless ``--dithering`` is given), poison rate 0.1 as in the paper's experiments.

    Contrastive adversarial training is done, as in the official code, with *negative*
    samples: ``round(neg_ratio * n_poisoned)`` further samples (any class, disjoint from
    the poisoned ones; ``neg_ratio=1`` matches the code's equal injection and negative
    rates) get the quantisation residual of ANOTHER random training image added
    (``x + (Q(x') - x')``, clamped) and keep their labels, so the model must learn the
    exact quantisation of the image itself, not any small quantisation-like noise. The
    negatives and their donor images are fixed by ``seed``. Triggered images are
    computed once when the poisoned set / test set is built (dithering is sequential).
    """

    name = "bppa"
    summary = "colour-depth squeezing with dithering"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, bits: int = 5, dither: bool = True,
                 neg_ratio: float = 1.0):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        neg_ratio = float(neg_ratio)
        if not (neg_ratio >= 0 and math.isfinite(neg_ratio)):
            raise ConfigError(f"BPPA neg_ratio must be >= 0, got {neg_ratio}")
        self.neg_ratio = neg_ratio
        self.trigger: QuantizeTrigger = QuantizeTrigger(bits, dither)

    def _levels_of(self, dataset, indices: np.ndarray) -> torch.Tensor:
        if len(indices) == 0:
            return torch.zeros(0, dtype=torch.uint8)
        parts = [self.trigger.level_indices(stack_clean(dataset, indices[i:i + _CHUNK]))
                 for i in range(0, len(indices), _CHUNK)]
        return torch.cat(parts)

    def poison(self, dataset) -> RenderedPoisonedDataset:
        """Quantise-and-relabel ``poison_rate`` of the eligible samples; add the negative samples."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        n = len(labels)
        chosen, rng = choose_poisoned(self, labels)
        negatives = choose_cover(rng, n, chosen, round(self.neg_ratio * len(chosen)),
                                 f"BPPA negative samples (neg_ratio {self.neg_ratio})")
        # A donor image for each negative, never the sample itself.
        donors = rng.integers(0, n - 1, size=len(negatives)) if n > 1 else np.zeros(len(negatives), dtype=np.int64)
        donors = donors + (donors >= negatives)
        flags = np.zeros(n, dtype=bool)
        flags[chosen] = True
        cover_flag = np.zeros(n, dtype=bool)
        cover_flag[negatives] = True
        new_labels = labels.copy()
        new_labels[chosen] = self.targets_for(labels[chosen])

        row = np.full(n, -1, dtype=np.int64)
        row[chosen] = np.arange(len(chosen))
        row[negatives] = np.arange(len(negatives))
        poisoned_levels = self._levels_of(dataset, chosen)
        donor_levels = self._levels_of(dataset, donors)
        trigger = self.trigger

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            out = images.clone()
            bd = flags[positions]
            if bd.any():
                out[torch.from_numpy(bd)] = trigger.from_levels(poisoned_levels[row[positions[bd]]]).to(images.dtype)
            neg = ~bd
            if neg.any():
                r = row[positions[neg]]
                donor_clean = stack_clean(dataset, donors[r])
                residual = trigger.from_levels(donor_levels[r]) - donor_clean
                out[torch.from_numpy(neg)] = (images[torch.from_numpy(neg)] + residual).clamp_(0.0, 1.0)
            return out

        ds = RenderedPoisonedDataset(dataset, self.trigger, flags, new_labels, labels, n_classes, render,
                                     cover_flag=cover_flag)
        ds.donor_index = np.full(n, -1, dtype=np.int64)
        ds.donor_index[negatives] = donors
        return ds

    def backdoor_test_set(self, dataset) -> RenderedBackdoorTestSet:
        """Quantised test images (non-target classes for all2one, all for all2all), computed once."""
        base = super().backdoor_test_set(dataset)
        levels = self._levels_of(dataset, base.original_index)
        trigger = self.trigger

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            return trigger.from_levels(levels[positions]).to(images.dtype)

        return RenderedBackdoorTestSet(dataset, self.trigger, base.original_index, base.true_labels,
                                       base.targets, base.num_classes, render)

    def _spec_args(self) -> dict:
        return {"bits": self.trigger.bits, "dither": self.trigger.dither, "neg_ratio": self.neg_ratio}


ATTACKS.register(BPPA.name, BPPA)
