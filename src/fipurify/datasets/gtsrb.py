"""GTSRB (German Traffic Sign Recognition Benchmark, 43 classes) in its official layout.

Looked for inside the data root:

* ``GTSRB/Final_Training/Images/000NN/*.ppm`` - training images; the label is the folder
  number (the per-class ``GT-000NN.csv`` files are not needed);
* ``GTSRB/Final_Test/Images/*.ppm`` with labels from ``GT-final_test.csv`` (semicolon
  separated, columns ``Filename`` and ``ClassId``);
* or, when ``GTSRB/`` is absent, the offline copy ``gtsrb-32x32.tar.xz`` (sha256-checked and
  unpacked once into the cache).

Images are resized to 32 x 32 by default: the official release has full-resolution images
of varying size, the offline copy is already 32 x 32.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import DATASETS, ArrayDataset, DatasetInfo, loader
from .cache import content_key, extract_once, file_key, folder_key, load_or_build
from .imagefolder import Size, parse_size, decode_images, list_images
from .roots import resolve_root

GTSRB_CLASSES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop",
    "No vehicles", "Vehicles over 3.5 metric tons prohibited", "No entry",
    "General caution", "Dangerous curve to the left", "Dangerous curve to the right",
    "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing",
    "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right",
    "Keep left", "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)
NUM_CLASSES = len(GTSRB_CLASSES)  # 43
GTSRB_ARCHIVE = "gtsrb-32x32.tar.xz"
GTSRB_SHA256 = "92d2940d4380265d6e72079d9f0c52cbc893b67611b4cba2f58ded55173f82f6"
TEST_CSV = "GT-final_test.csv"
SPLITS = ("train", "test")


def _is_gtsrb_dir(path: Path) -> bool:
    return (path / "Final_Training").is_dir() or (path / "Final_Test").is_dir()


def find_gtsrb(root: Path) -> tuple[str, Path]:
    """The GTSRB source under ``root``: ``("folder", GTSRB dir)`` or ``("archive", tar.xz)``."""
    if _is_gtsrb_dir(root / "GTSRB"):
        return "folder", root / "GTSRB"
    if _is_gtsrb_dir(root):
        return "folder", root
    if (root / GTSRB_ARCHIVE).is_file():
        return "archive", root / GTSRB_ARCHIVE
    raise DataError(f"GTSRB not found in {root} (looked for GTSRB/Final_Training, "
                    f"GTSRB/Final_Test and {GTSRB_ARCHIVE}); pass --data-root or set FIPURIFY_DATA")


def _find_test_csv(gtsrb: Path) -> Path:
    """The ground-truth CSV of the test set; it ships separately from the test images."""
    for cand in (gtsrb / "Final_Test" / TEST_CSV, gtsrb / "Final_Test" / "Images" / TEST_CSV,
                 gtsrb / TEST_CSV, gtsrb.parent / TEST_CSV):
        if cand.is_file():
            return cand
    raise DataError(f"GTSRB test labels {TEST_CSV} not found in {gtsrb / 'Final_Test'} "
                    f"(it is the separate 'GTSRB_Final_Test_GT' download)")


def _read_test_labels(csv_path: Path) -> dict[str, int]:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=";")
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "Filename" not in fields or "ClassId" not in fields:
            raise DataError(f"{csv_path}: needs columns Filename and ClassId "
                            f"(semicolon separated), found {fields}")
        reader.fieldnames = fields
        labels: dict[str, int] = {}
        for row in reader:
            try:
                cid = int(row["ClassId"])
            except (TypeError, ValueError):
                raise DataError(f"{csv_path} line {reader.line_num}: bad ClassId "
                                f"{row['ClassId']!r}") from None
            if not 0 <= cid < NUM_CLASSES:
                raise DataError(f"{csv_path} line {reader.line_num}: ClassId {cid} "
                                f"outside 0..{NUM_CLASSES - 1}")
            labels[row["Filename"].strip()] = cid
    if not labels:
        raise DataError(f"{csv_path}: no rows")
    return labels


def _read_train(gtsrb: Path, size: Size):
    images_dir = gtsrb / "Final_Training" / "Images"
    if not images_dir.is_dir():
        raise DataError(f"GTSRB training images not found: {images_dir}")
    files: list[Path] = []
    labels: list[int] = []
    for d in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        if not d.name.isdigit() or int(d.name) >= NUM_CLASSES:
            raise DataError(f"{d}: GTSRB class folders are numbered 00000..{NUM_CLASSES - 1:05d}")
        found = list_images(d)
        files.extend(found)
        labels.extend([int(d.name)] * len(found))
    if not files:
        raise DataError(f"{images_dir} holds no images (expected 000NN/*.ppm)")
    return decode_images(files, size), np.asarray(labels, dtype=np.int64), list(GTSRB_CLASSES)


def _read_test(gtsrb: Path, size: Size):
    images_dir = gtsrb / "Final_Test" / "Images"
    if not images_dir.is_dir():
        raise DataError(f"GTSRB test images not found: {images_dir}")
    csv_path = _find_test_csv(gtsrb)
    table = _read_test_labels(csv_path)
    files = list_images(images_dir)
    if not files:
        raise DataError(f"{images_dir} holds no images (expected NNNNN.ppm)")
    unlabeled = [f.name for f in files if f.name not in table]
    if unlabeled:
        raise DataError(f"{csv_path} has no label for {len(unlabeled)} test images, "
                        f"e.g. {unlabeled[0]}")
    missing = sorted(set(table) - {f.name for f in files})
    if missing:
        raise DataError(f"{images_dir} lacks {len(missing)} images listed in {csv_path}, "
                        f"e.g. {missing[0]}")
    labels = np.asarray([table[f.name] for f in files], dtype=np.int64)
    return decode_images(files, size), labels, list(GTSRB_CLASSES)


def _gtsrb_in(folder: Path) -> Path:
    """The GTSRB folder inside an unpacked archive."""
    if _is_gtsrb_dir(folder / "GTSRB"):
        return folder / "GTSRB"
    if _is_gtsrb_dir(folder):
        return folder
    raise DataError(f"{folder}: the archive holds no GTSRB/Final_Training or Final_Test folder")


def load_gtsrb(root: str | Path | None = None, split: str = "train", size: Size = 32,
               cache: bool = True) -> ArrayDataset:
    """GTSRB ``split`` ("train": 39,209 images, "test": 12,630) as an ArrayDataset.

    ``size`` resizes every image (int or (height, width); None keeps the files' sizes,
    which must then agree).
    """
    if split not in SPLITS:
        raise ConfigError(f"GTSRB split must be 'train' or 'test', got {split!r}")
    size_hw = parse_size(size)
    reader = _read_train if split == "train" else _read_test
    kind, path = find_gtsrb(resolve_root(root))
    if kind == "folder":
        if split == "train":
            key = folder_key(path / "Final_Training" / "Images", "gtsrb", split, size_hw)
        else:
            csv_path = _find_test_csv(path)
            key = folder_key(path / "Final_Test" / "Images", "gtsrb", split, size_hw,
                             file_key(csv_path))
        build = lambda: reader(path, size_hw)  # noqa: E731
    else:
        key = content_key(path, "gtsrb-archive", split, size_hw, GTSRB_SHA256)
        build = lambda: reader(_gtsrb_in(extract_once(path, "gtsrb", GTSRB_SHA256)), size_hw)  # noqa: E731
    images, labels, classes = load_or_build(key, build, label=f"gtsrb-{split}", use_cache=cache)
    return ArrayDataset(images, labels, classes, name=f"gtsrb-{split}")


DATASETS.register("gtsrb", loader("gtsrb", load_gtsrb), info=DatasetInfo("gtsrb", len(GTSRB_CLASSES), 32, 3, flip=False))


__all__ = ["GTSRB_CLASSES", "GTSRB_ARCHIVE", "GTSRB_SHA256", "find_gtsrb", "load_gtsrb"]
