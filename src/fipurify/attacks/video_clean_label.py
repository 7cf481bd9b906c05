"""Clean-label backdoor on video classifiers (Zhao et al., CVPR 2020, "Clean-label backdoor
attacks on video recognition models").

Labels are never changed. A share of the TARGET-class training clips is poisoned in two
steps: every frame is first perturbed adversarially (untargeted L_inf PGD against a
clean surrogate model, maximising the cross-entropy of the clip's own, true label), so
the clip's real content becomes hard to learn and the model leans on whatever else
separates the class; then the trigger patch is pasted on EVERY frame. The model learns
"patch -> target". The backdoor test set is the non-target test clips with the patch on
every frame, labelled with the target; ASR = mean(pred == target) as for image attacks.

Perturbation of a clip :math:`x` with true label :math:`y` (steps of size :math:`\\alpha`, no
random start), rounded to the uint8 grid inside the ball:

.. math::  x^{k+1} = \\Pi_{\\|x' - x\\|_\\infty \\le \\epsilon} \\big(x^k + \\alpha \\, \\mathrm{sign}\\,
           \\nabla_{x} \\mathrm{CE}(f_{sur}(x^k), y)\\big), \\quad x^0 = x.

Cheap by design: ``eps = 8/255``, 5 steps of ``2/255``; the surrogate is a small
``cnn-lstm`` (width 8, hidden 32) trained by :meth:`VideoCleanLabel.prepare` for
``surrogate_epochs`` (3) with Adam on the clean training clips, or any model passed as
``surrogate_model``. ``pgd_steps = 0`` skips the perturbation (patch only).

Deviations from Zhao et al.: their trigger is a universal adversarial patch optimised
against the clean model; here it is a fixed ``patch_size`` x ``patch_size`` black/white
checkerboard at the bottom-right of each frame. Their clips are full-size videos attacked
with a longer PGD; here clips are 8 x 32 x 32 (the CIFAR-10 motion stand-in) and the PGD
is the cheap one above. ``poison_rate`` is the share of the
target-class clips poisoned (default 0.8, the FIP paper's clean-label setting). The
surrogate lives in memory only (it is not in :meth:`to_spec`): a rebuilt attack trains
it again, with the same seed, on the set it poisons.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..datasets.cifar10_motion import VideoArrayDataset
from ..errors import ConfigError, DataError
from .badnets import checkerboard
from .base import ATTACKS, Attack, dataset_labels
from .clb import pgd_linf
from .triggers import PatchTrigger


def _clips_of(dataset) -> np.ndarray:
    clips = getattr(dataset, "clips", None)
    if not isinstance(clips, np.ndarray) or clips.ndim != 5 or clips.dtype != np.uint8:
        raise DataError("video attacks need a clip dataset with uint8 clips N x T x H x W x C "
                        "(e.g. datasets.load('cifar10-motion'))")
    return clips


def _to_float(clips: np.ndarray) -> torch.Tensor:
    """uint8 N x T x H x W x C -> float N x T x C x H x W in [0, 1] (as item access)."""
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float().div_(255.0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return torch.round(x * 255).clamp_(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous().numpy()


class VideoCleanLabel(Attack):
    """Clean-label video backdoor; see the module docstring."""

    name = "video-clean-label"
    summary = "clean-label: PGD on every frame, then a patch"
    task = "video-classification"
    clean_label = True
    default_poison_rate = 0.8

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, patch_size: int = 4, eps: float = 8 / 255,
                 pgd_steps: int = 5, pgd_step_size: float = 2 / 255, surrogate_epochs: int = 3,
                 surrogate_width: int = 8, surrogate_hidden: int = 32, surrogate_model: nn.Module | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if not (0 < float(eps) <= 1) or not (0 < float(pgd_step_size) <= 1):
            raise ConfigError(f"eps and pgd_step_size must be in (0, 1], got {eps}, {pgd_step_size}")
        for key, v, low in (("patch_size", patch_size, 1), ("pgd_steps", pgd_steps, 0),
                            ("surrogate_epochs", surrogate_epochs, 1), ("surrogate_width", surrogate_width, 1),
                            ("surrogate_hidden", surrogate_hidden, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"video-clean-label {key} must be an integer >= {low}, got {v!r}")
        self.patch_size, self.eps, self.pgd_steps = int(patch_size), float(eps), int(pgd_steps)
        self.pgd_step_size = float(pgd_step_size)
        self.surrogate_epochs, self.surrogate_width = int(surrogate_epochs), int(surrogate_width)
        self.surrogate_hidden = int(surrogate_hidden)
        self.surrogate_model = surrogate_model
        # A PatchTrigger on a T x C x H x W clip treats the frames as a batch: the patch goes on every frame.
        self.trigger: PatchTrigger = PatchTrigger(checkerboard(self.patch_size), "bottom-right")

    # -- trigger ------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The patch on every frame of a clip (T x C x H x W) or a batch of clips (N x T x C x H x W)."""
        if x.ndim == 5:
            return self.trigger.apply(x.reshape(-1, *x.shape[2:])).reshape(x.shape)
        return self.trigger.apply(x)

    # -- surrogate ----------------------------------------------------------------------
    def prepare(self, train_set, *, cache_dir=None, device="cpu", progress=False) -> None:
        """Train the small clean surrogate on ``train_set`` (kept in memory; nothing is written)."""
        if self.surrogate_model is not None or self.pgd_steps == 0:
            return
        from .. import models

        n_classes = self._bind(train_set)
        t, c, h, w = train_set[0][0].shape
        torch.manual_seed(self.seed)
        model = models.create("cnn-lstm", num_classes=n_classes, in_channels=int(c), input_size=int(h),
                              width=self.surrogate_width, hidden=self.surrogate_hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        for epoch in range(self.surrogate_epochs):
            total, count = 0.0, 0
            for x, y in DataLoader(train_set, batch_size=64, shuffle=True, generator=gen):
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(y), count + len(y)
            if progress:
                print(f"[video-clean-label surrogate] epoch {epoch + 1}: loss {total / count:.3f}", file=sys.stderr)
        self.surrogate_model = model.eval()

    @property
    def prepared(self) -> bool:
        return self.surrogate_model is not None or self.pgd_steps == 0

    def perturb(self, clips: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """PGD clips (float, on the uint8 grid, within ``eps`` of ``clips``) against the surrogate."""
        if self.pgd_steps == 0:
            return clips.clone()
        model = self.surrogate_model
        if model is None:
            raise ConfigError("the video-clean-label surrogate is not prepared: call attack.prepare(train_set)")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        budget = math.floor(self.eps * 255 + 1e-6)  # whole grey levels: rounding stays in the ball
        out = []
        try:
            # cuDNN refuses an LSTM backward in eval mode; the native kernel gives the same gradient.
            with torch.backends.cudnn.flags(enabled=False):
                for i in range(0, len(clips), batch_size):
                    x = clips[i:i + batch_size].to(device)
                    adv = pgd_linf(model, x, labels[i:i + batch_size].to(device), self.eps,
                                   self.pgd_step_size, self.pgd_steps).cpu()
                    x8, adv8 = torch.round(x.cpu() * 255), torch.round(adv * 255)
                    adv8 = torch.min(torch.max(adv8, x8 - budget), x8 + budget).clamp_(0, 255)
                    out.append(adv8.div_(255.0))
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            model.train(was_training)
        return torch.cat(out)

    # -- datasets -----------------------------------------------------------------------
    def poison(self, dataset) -> "PoisonedVideoDataset":
        """Perturb and patch ``poison_rate`` of the target-class clips; labels unchanged."""
        clips = _clips_of(dataset)
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        chosen, flags, kept_labels = self._plan_poison(labels)  # clean-label: labels stay as they are
        if not self.prepared:
            self.prepare(dataset)
        x = self.perturb(_to_float(clips[chosen]), torch.from_numpy(labels[chosen]))
        new = clips.copy()
        new[chosen] = _to_uint8(self.apply_trigger(x))
        return PoisonedVideoDataset(new, kept_labels, dataset.classes[:n_classes], flags, labels.copy(),
                                    name=f"poisoned-{getattr(dataset, 'name', 'video')}")

    def backdoor_test_set(self, dataset) -> "VideoBackdoorTestSet":
        """Non-target test clips with the patch on every frame, labelled with the target."""
        clips = _clips_of(dataset)
        self._bind(dataset)
        labels = dataset_labels(dataset)
        idx = np.flatnonzero(labels != self.target)
        if len(idx) == 0:
            raise DataError(f"{self.name}: the test set has no clips outside the target class {self.target}")
        patched = _to_uint8(self.apply_trigger(_to_float(clips[idx])))
        return VideoBackdoorTestSet(patched, np.full(len(idx), self.target), dataset.classes, idx, labels[idx],
                                    name=f"backdoor-{getattr(dataset, 'name', 'video')}")

    def _spec_args(self) -> dict:
        return {"patch_size": self.patch_size, "eps": self.eps, "pgd_steps": self.pgd_steps,
                "pgd_step_size": self.pgd_step_size, "surrogate_epochs": self.surrogate_epochs,
                "surrogate_width": self.surrogate_width, "surrogate_hidden": self.surrogate_hidden}


class PoisonedVideoDataset(VideoArrayDataset):
    """Training clips, the poisoned ones already rendered; ``poison_flag`` marks them and
    ``original_label`` (equal to ``labels``: clean-label) is kept for the common interface."""

    def __init__(self, clips, labels, classes, poison_flag, original_label, name="poisoned-video"):
        super().__init__(clips, labels, classes, name)
        self.poison_flag = np.asarray(poison_flag, dtype=bool)
        self.original_label = np.asarray(original_label, dtype=np.int64)

    @property
    def poison_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poison_flag)


class VideoBackdoorTestSet(VideoArrayDataset):
    """Patched non-target test clips; ``labels`` = ``targets`` (the attack target),
    ``true_labels`` their real classes, ``original_index`` their places in the test set."""

    def __init__(self, clips, targets, classes, original_index, true_labels, name="backdoor-video"):
        super().__init__(clips, targets, classes, name)
        self.targets = self.labels
        self.original_index = np.asarray(original_index, dtype=np.int64)
        self.true_labels = np.asarray(true_labels, dtype=np.int64)


ATTACKS.register(VideoCleanLabel.name, VideoCleanLabel)

__all__ = ["VideoCleanLabel", "PoisonedVideoDataset", "VideoBackdoorTestSet"]
