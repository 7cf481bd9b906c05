"""Checks of inputs made before any compute: optimiser ranges, output paths, clean image folders."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError


def check_optimisation(epochs: int, lr: float, batch_size: int, momentum: float, weight_decay: float) -> None:
    """Raise ConfigError unless the optimiser settings are in range."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise ConfigError("momentum must lie in [0, 1) and weight_decay be >= 0")


def check_output_path(out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (),
                      mkdir: bool = False, flag: str = "--out") -> Path:
    """Refuse an output path that is an input (resolved, symlinks followed), a directory, or in a
    missing folder (unless ``mkdir``: then the folder is created). Returns the path."""
    path = Path(out).expanduser()
    if str(out).endswith(os.sep) or path.is_dir():
        raise ConfigError(f"{flag} {out} is a directory; name the file to write, e.g. {path / 'model.safetensors'}")
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).expanduser()
        if target == src.resolve() or (path.exists() and src.exists() and os.path.samefile(path, src)):
            raise ConfigError(f"{flag} {out} is the input file {given}; write the result to a new file")
    parent = target.parent
    if not parent.is_dir():
        if parent.exists():
            raise ConfigError(f"{flag} {out}: {parent} is not a folder")
        if not mkdir:
            raise ConfigError(f"{flag} {out}: folder {parent} does not exist (create it, or pass --mkdir)")
        parent.mkdir(parents=True, exist_ok=True)
    return path


def check_clean_folder(scan, num_classes: int | None, classes: Sequence[str] | None,
                       channels: int | None) -> list[str]:
    """Check an image folder (a :class:`~fipurify.datasets.imagefolder.FolderScan`) against the model.

    Raises DataError for one class only, empty class folders, too many classes, class names the
    model does not know, or a channel count image folders cannot give; returns warnings to print
    (stray files skipped, grayscale converted).
    """
    from .errors import DataError

    folder = scan.folder
    if scan.empty:
        raise DataError(f"class folder{'s' if len(scan.empty) > 1 else ''} {', '.join(scan.empty)} in {folder} "
                        "hold no images")
    n = len(scan.classes)
    if n < 2:
        raise DataError(f"the folder {folder} holds one class only ({scan.classes[0]}); purification needs clean "
                        "images of several classes (ideally all)")
    if num_classes is not None and n > num_classes:
        raise DataError(f"the model predicts {num_classes} classes, the folder {folder} has {n}")
    if classes is not None:
        unknown = [c for c in scan.classes if c not in set(map(str, classes))]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            known = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
            raise DataError(f"folders {shown} in {folder} are not among the model's classes ({known})")
    elif num_classes is not None and n != num_classes:
        raise DataError(f"the model predicts {num_classes} classes, the folder {folder} has {n}; without the "
                        "model's class names the folders must be all its classes in label order "
                        "(name them with fipurify import --classes)")
    if channels is not None and channels != 3:
        raise DataError(f"the model takes {channels}-channel images; image folders are read as RGB (3 channels)")
    warnings = []
    if scan.stray:
        shown = ", ".join(str(p.relative_to(folder)) for p in scan.stray[:5])
        more = f" and {len(scan.stray) - 5} more" if len(scan.stray) > 5 else ""
        warnings.append(f"skipping {len(scan.stray)} non-image file{'s' if len(scan.stray) > 1 else ''} "
                        f"in {folder}: {shown}{more}")
    if scan.grayscale:
        warnings.append(f"the images in {folder} are grayscale; they are converted to RGB")
    return warnings


def as_dataset(clean_data):
    """The map-style dataset behind ``clean_data`` (a ``Dataset`` or a ``DataLoader`` over one);
    DataError for anything else."""
    from torch.utils.data import DataLoader

    from .errors import DataError

    if isinstance(clean_data, DataLoader):
        clean_data = clean_data.dataset
    if not hasattr(clean_data, "__getitem__") or not hasattr(clean_data, "__len__"):
        raise DataError("clean data must be a map-style Dataset of (image, label) or a DataLoader over one")
    return clean_data
