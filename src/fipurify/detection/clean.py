"""The clean images a detector works on: checked, held in memory, split in two.

A detector optimises its triggers on one part of the clean set and measures them on the
other (``holdout``), so that the proxy ASR is not measured on the images the trigger was
fitted to. Every check here runs before any optimisation, and raises one readable line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..validation import as_dataset


@dataclass
class CleanSplit:
    """Clean images (float N x C x H x W in [0, 1], or N x T x C x H x W clips, on the CPU) and
    labels, split in two."""
    x_opt: torch.Tensor
    y_opt: torch.Tensor
    x_hold: torch.Tensor
    y_hold: torch.Tensor
    num_classes: int
    class_names: list[str]
    counts: list[int]                      # clean images per class, whole set
    missing: list[int] = field(default_factory=list)  # classes with no clean image

    @property
    def present(self) -> list[int]:
        return [c for c in range(self.num_classes) if c not in self.missing]

    def label(self, c: int) -> str:
        """``"3 (cat)"``, or ``"3"`` when the class has no other name."""
        name = self.class_names[c] if c < len(self.class_names) else str(c)
        return str(c) if name == str(c) else f"{c} ({name})"


def model_classes(model: nn.Module, image: torch.Tensor) -> int:
    """The number of classes ``model`` scores; DataError unless its output is ``[batch, classes]``."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.stack([image, image]).to(device))
    except RuntimeError as e:
        raise DataError(f"the model cannot process clean images of shape {tuple(image.shape)}: "
                        f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model must return class scores of shape [batch, classes] (at least 2 classes); "
                        f"for a batch of 2 images it returned {shape}")
    return int(out.shape[1])


def check_images(x0: Any) -> None:
    """DataError unless ``x0`` is a C x H x W image or a T x C x H x W clip (the pixel-trigger
    detectors' items: a trigger on a clip is the same mask and pattern on every frame)."""
    if not isinstance(x0, torch.Tensor) or x0.ndim not in (3, 4):
        raise DataError(f"clean images must be C x H x W tensors (or T x C x H x W clips), got shape "
                        f"{tuple(getattr(x0, 'shape', ()))}")


def load_clean(model: nn.Module, clean_data: Dataset | DataLoader, holdout: float, max_holdout: int,
               min_per_class: int, seed: int, check: Callable[[Any], None] = check_images) -> CleanSplit:
    """Check ``clean_data`` against ``model`` and split it, stratified by class.

    Each class keeps ``round(holdout * n_c)`` of its images for measuring (at least one),
    the rest for optimising; the measuring part is then capped at ``max_holdout`` images.
    Raises DataError for an empty set, items the detector cannot take (``check``: by default
    C x H x W images or T x C x H x W clips), a model output that is
    not class scores, labels out of range, fewer than ``min_per_class`` images in a class that
    has any, or fewer than three classes with images (the outlier test compares classes).
    """
    data = as_dataset(clean_data)
    if len(data) == 0:
        raise DataError("the clean set is empty")
    x0, _ = data[0]
    check(x0)
    num_classes = model_classes(model, x0)
    n_data = getattr(data, "num_classes", None)
    if n_data is not None and n_data != num_classes:
        raise DataError(f"class count mismatch: the model predicts {num_classes} classes "
                        f"but the clean set has {n_data}")
    labels = _labels(data)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise DataError(f"clean label {int(bad[0])} is out of range for a model with {num_classes} classes")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    names = [str(c) for c in getattr(data, "classes", None) or range(num_classes)]
    short = [c for c in range(num_classes) if 0 < counts[c] < min_per_class]
    if short:
        c = short[0]
        raise DataError(f"class {c} has only {counts[c]} clean image(s); the detector needs at least "
                        f"{min_per_class} per class (" + ", ".join(f"{k}: {counts[k]}" for k in short)
                        + " too few)")
    present = [c for c in range(num_classes) if counts[c]]
    if len(present) < 3:
        raise DataError(f"the clean set has images of {len(present)} class(es); the outlier test "
                        "compares classes and needs at least 3")
    g = torch.Generator().manual_seed(int(seed))
    hold_idx, opt_idx = [], []
    for c in present:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(1, int(round(holdout * len(idx)))), len(idx) - 1)
        hold_idx.append(idx[:k])
        opt_idx.append(idx[k:])
    hold = torch.cat(hold_idx)
    if len(hold) > max_holdout:
        hold = hold[torch.randperm(len(hold), generator=g)[:max_holdout]]
    hold, opt = hold.sort().values, torch.cat(opt_idx).sort().values
    x_opt, y_opt = _stack(data, opt)
    x_hold, y_hold = _stack(data, hold)
    return CleanSplit(x_opt, y_opt, x_hold, y_hold, num_classes, names, counts,
                      [c for c in range(num_classes) if not counts[c]])


def _labels(data: Dataset) -> torch.Tensor:
    labels = getattr(data, "labels", None)
    if labels is not None and len(labels) == len(data):
        return torch.as_tensor(labels, dtype=torch.long)
    return torch.tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.long)


def _stack(data: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in indices.tolist():
        x, y = data[i]
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
