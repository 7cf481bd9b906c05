"""Image-folder datasets: ``root/split/<class>/*.png|jpg|jpeg|ppm|bmp``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from .base import DATASETS, ArrayDataset, DatasetInfo, check_options
from .cache import folder_key, load_or_build

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")

Size = int | tuple[int, int] | None


def parse_size(size: Size) -> tuple[int, int] | None:
    """``size`` as (height, width); an int means a square."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"image size must be positive, got {size!r}")
    return h, w


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


@dataclass
class FolderScan:
    """What a ``folder/<class>/*`` image folder holds, read from file names and image headers only."""
    folder: Path
    classes: list[str]
    counts: dict[str, int]
    stray: list[Path] = field(default_factory=list)  # non-image files (skipped when loading)
    sizes: set[tuple[int, int]] = field(default_factory=set)  # (height, width)
    modes: set[str] = field(default_factory=set)  # PIL modes: RGB, L, RGBA, P, ...
    empty: list[str] = field(default_factory=list)  # class folders without images

    @property
    def grayscale(self) -> bool:
        return bool(self.modes) and self.modes <= {"L", "1", "I", "I;16", "F", "LA"}


def scan_image_folder(folder: str | Path) -> FolderScan:
    """Classes, image counts, stray files, image sizes and colour modes of ``folder/<class>/*``.

    Raises DataError for a missing folder, one without class folders, or one that holds
    split folders (``train/<class>/*``: the message names ``folder/train``).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    stray = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/*.png|jpg)")
    scan = FolderScan(folder, [d.name for d in dirs], {}, stray=[p for p in stray if p.suffix.lower() not in IMAGE_SUFFIXES])
    nested = []
    for d in dirs:
        images = list_images(d)
        scan.counts[d.name] = len(images)
        scan.stray.extend(p for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")
                          and p.suffix.lower() not in IMAGE_SUFFIXES)
        if not images:
            scan.empty.append(d.name)
            if any(sub.is_dir() and list_images(sub) for sub in d.iterdir()):
                nested.append(d.name)
        for p in images:
            try:
                with Image.open(p) as im:  # reads the header only
                    scan.sizes.add((im.size[1], im.size[0]))
                    scan.modes.add(im.mode)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataError(f"cannot read image {p}: {exc}") from exc
    if nested and len(nested) == len(dirs):
        pick = "train" if "train" in nested else nested[0]
        raise DataError(f"{folder} holds split folders ({', '.join(nested)}), not class folders: "
                        f"pass {folder / pick}")
    return scan


def _read_one(path: Path, size_hw: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # also forces the decode, so errors surface here
        if size_hw is not None and im.size != (size_hw[1], size_hw[0]):
            # Pillow's BILINEAR resize is antialiased when shrinking.
            im = im.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def decode_images(files: Sequence[str | Path], size: Size = None) -> np.ndarray:
    """Decode ``files`` into one uint8 array N x H x W x 3 (RGB).

    Without ``size`` all images must share one size; with it, each is resized.
    """
    size_hw = parse_size(size)
    if not files:
        raise DataError("no images to decode")
    first = _read_one(Path(files[0]), size_hw)
    out = np.empty((len(files),) + first.shape, dtype=np.uint8)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        img = _read_one(Path(f), size_hw)
        if img.shape != first.shape:
            raise DataError(f"image {f} is {img.shape[1]}x{img.shape[0]} but {files[0]} is "
                            f"{first.shape[1]}x{first.shape[0]}; pass an image size to resize them")
        out[i] = img
    return out


def read_image_folder(folder: str | Path, classes: Sequence[str] | None = None,
                      size: Size = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``folder/<class>/*`` into ``(images, labels, classes)`` without caching.

    Classes are the sub-folder names sorted alphabetically, unless ``classes`` gives
    the order (then every sub-folder must be one of them; a class may lack a folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/*.png|jpg)")
    if classes is None:
        classes = [d.name for d in dirs]
    else:
        classes = [str(c) for c in classes]
        unknown = [d.name for d in dirs if d.name not in classes]
        if unknown:
            raise DataError(f"{folder}: folders {unknown} are not among the classes {classes}")
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        found = list_images(d)
        if not found:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files.extend(found)
        labels.extend([classes.index(d.name)] * len(found))
    return decode_images(files, size), np.asarray(labels, dtype=np.int64), list(classes)


def _holds_classes(root: Path) -> bool:
    return any(list_images(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_imagefolder(root: str | Path, split: str | None = "train",
                     classes: Sequence[str] | None = None, size: Size = None,
                     cache: bool = True, name: str | None = None) -> ArrayDataset:
    """Load ``root/split/<class>/*`` (or ``root/<class>/*`` when ``split`` is None, or when
    ``split`` is "train" and ``root`` has no ``train`` folder but holds class folders of images).

    Decoded arrays are cached (see :mod:`fipurify.datasets.cache`) keyed by the
    folder's file listing, so a second load is fast and an edited folder is re-read.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder root {root} does not exist")
    folder = root / split if split else root
    if split == "train" and not folder.is_dir() and _holds_classes(root):
        folder = root  # a plain root/<class>/* folder is the train split (datasets.load's default)
    if not folder.is_dir():
        hint = ""
        if split and any(list_images(d) for d in root.iterdir() if d.is_dir()):
            hint = "; it looks like root/<class>/ layout: pass split=None"
        raise DataError(f"split folder {folder} not found (expected {root}/{split}/<class>/*){hint}")
    size_hw = parse_size(size)
    key = folder_key(folder, tuple(classes) if classes is not None else None, size_hw)
    images, labels, cls = load_or_build(
        key, lambda: read_image_folder(folder, classes, size_hw),
        label="imagefolder", use_cache=cache)
    return ArrayDataset(images, labels, cls, name=name or (f"{root.name}-{split}" if split else root.name))


def _load(root: str | Path | None, split: str | None, path: str | Path | None = None, **options) -> ArrayDataset:
    folder = root if root is not None else path
    if folder is None:
        raise ConfigError("imagefolder needs a folder: load('imagefolder', root=PATH)")
    check_options("imagefolder", load_imagefolder, options)
    return load_imagefolder(folder, split=split, **options)


DATASETS.register("imagefolder", _load, info=DatasetInfo("imagefolder", None, None, 3))


__all__ = ["IMAGE_SUFFIXES", "FolderScan", "scan_image_folder", "parse_size", "list_images", "decode_images", "read_image_folder", "load_imagefolder"]
