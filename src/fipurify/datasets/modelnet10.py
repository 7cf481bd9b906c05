"""ModelNet point clouds (Wu et al. 2015): the offline ModelNet10 npz, ``.off`` meshes, PointNet's HDF5.

Three registered datasets, all :class:`PointCloudDataset` (items ``(N x 3 float tensor, int label)``,
every cloud centred and scaled into the unit sphere on load, ``task = "pointcloud-classification"``):

* ``modelnet10``: ``modelnet10-1024.npz`` in the data root (:func:`~.roots.resolve_root`):
  4,899 shapes of 1,024 surface points in raw ModelNet units, the official split (3,991
  train / 908 test), z is up (chairs are tallest along z). ``names`` and ``classes`` are
  stored as fixed-width unicode arrays (``<U16`` / ``<U11``), so ``allow_pickle=False``
  reads them; an object array would be refused by numpy and reported as a DataError.
  Without the npz, a ``ModelNet10/`` folder of meshes in the data root is read as below.
* ``modelnet-off``: a folder ``root/<class>/{train,test}/*.off`` (the official ModelNet10 /
  ModelNet40 release); ``num_points`` (default 1,024) are sampled uniformly on each mesh's
  surface, seeded by ``seed`` and the file's path so one mesh always gives the same cloud.
* ``modelnet-h5``: the ``modelnet40_ply_hdf5_2048`` folder (``ply_data_*.h5`` listed in
  ``train_files.txt`` / ``test_files.txt``, class names from ``shape_names.txt`` when present);
  needs h5py (optional dependency, a one-line DataError without it).

``num_points`` (npz and HDF5) keeps the first ``k`` points of each cloud after a permutation
drawn per cloud from ``seed``, before normalising.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import DATASETS, DatasetInfo, check_options
from .pointcloud_io import normalize_unit_sphere, read_h5_split, read_off, sample_surface, subsample
from .roots import resolve_root

NPZ_FILE = "modelnet10-1024.npz"
MODELNET10_CLASSES = ("bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand",
                      "sofa", "table", "toilet")
SPLITS = ("train", "test")
TASK = "pointcloud-classification"


class PointCloudDataset(Dataset):
    """Point clouds held as one float32 array ``M x N x 3`` and integer labels.

    ``dataset[i]`` is ``(points, label)``: a new float32 tensor ``N x 3`` and a Python int.
    ``normalize=True`` centres and scales every cloud into the unit sphere.
    """

    task = TASK

    def __init__(self, points: np.ndarray, labels: Sequence[int] | np.ndarray,
                 classes: Sequence[str] | None = None, name: str = "pointcloud",
                 names: Sequence[str] | None = None, normalize: bool = True):
        points = np.asarray(points, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if points.ndim != 3 or points.shape[2] != 3 or points.shape[1] < 1:
            raise DataError(f"{name}: point clouds must have shape M x N x 3, got {points.shape}")
        if len(points) != len(labels):
            raise DataError(f"{name}: {len(points)} clouds but {len(labels)} labels")
        if classes is None:
            classes = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{name}: labels must lie in [0, {len(classes) - 1}]")
        self.points = normalize_unit_sphere(points) if normalize and len(points) else points
        self.labels = labels
        self.classes = [str(c) for c in classes]
        self.names = None if names is None else [str(n) for n in names]
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def point_shape(self) -> tuple[int, int]:
        """Shape of one returned cloud, N x 3."""
        return tuple(self.points.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.tensor(self.points[index]), int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "PointCloudDataset":
        """A new dataset holding only ``indices`` (copies the rows; already normalised)."""
        idx = np.asarray(indices, dtype=np.int64)
        names = None if self.names is None else [self.names[i] for i in idx]
        return PointCloudDataset(self.points[idx], self.labels[idx], self.classes, name or self.name,
                                 names, normalize=False)

    def __repr__(self) -> str:
        return (f"PointCloudDataset(name={self.name!r}, n={len(self)}, "
                f"points={self.point_shape[0]}, classes={self.num_classes})")


def _check_split(split: str | None) -> str:
    if split not in SPLITS:
        raise ConfigError(f"point-cloud split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _maybe_subsample(points: np.ndarray, num_points: int | None, seed: int) -> np.ndarray:
    return points if num_points is None else subsample(points, int(num_points), seed)


def load_modelnet10(root: str | Path | None = None, split: str | None = "train",
                    num_points: int | None = None, seed: int = 0) -> PointCloudDataset:
    """ModelNet10 from ``modelnet10-1024.npz`` in the data root (or its ``ModelNet10/`` meshes)."""
    split = _check_split(split)
    base = resolve_root(root)
    path = base / NPZ_FILE
    if not path.is_file():
        if (base / "ModelNet10").is_dir():
            return load_modelnet_off(base / "ModelNet10", split, num_points=num_points or 1024, seed=seed,
                                     name=f"modelnet10-{split}")
        raise DataError(f"ModelNet10 not found in {base} (looked for {NPZ_FILE} and ModelNet10/)")
    try:
        with np.load(path, allow_pickle=False) as z:
            points, labels, train = z["points"], z["labels"], z["train"].astype(bool)
            names, classes = z["names"], z["classes"]
    except (OSError, KeyError, ValueError) as exc:  # ValueError: object arrays need pickle
        raise DataError(f"cannot read {path}: {exc}") from None
    keep = train if split == "train" else ~train
    points = _maybe_subsample(points[keep], num_points, seed)
    return PointCloudDataset(points, labels[keep], [str(c) for c in classes], f"modelnet10-{split}",
                             [str(n) for n in names[keep]])


def load_modelnet_off(root: str | Path, split: str | None = "train", num_points: int = 1024,
                      seed: int = 0, classes: Sequence[str] | None = None,
                      name: str | None = None) -> PointCloudDataset:
    """``root/<class>/<split>/*.off`` meshes, ``num_points`` sampled on each surface.

    Classes are the sorted sub-folders of ``root`` (or ``classes``). The sampling generator of a
    mesh is seeded by ``(seed, crc32 of class/split/file name)``.
    """
    split = _check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"mesh folder {root} does not exist")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if (p / split).is_dir())
    if not classes:
        raise DataError(f"no class folders with a {split}/ folder in {root}")
    points, labels, names = [], [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls / split).glob("*.off")):
            rel = f"{cls}/{split}/{f.name}"
            rng = np.random.default_rng([int(seed), zlib.crc32(rel.encode())])
            verts, faces = read_off(f)
            points.append(sample_surface(verts, faces, int(num_points), rng))
            labels.append(label)
            names.append(f.stem)
    if not points:
        raise DataError(f"no .off meshes in {root}/<class>/{split}/")
    return PointCloudDataset(np.stack(points), labels, classes, name or f"modelnet-off-{split}", names)


def load_modelnet_h5(root: str | Path, split: str | None = "train", num_points: int | None = None,
                     seed: int = 0, classes: Sequence[str] | None = None) -> PointCloudDataset:
    """The ``modelnet40_ply_hdf5_2048`` layout in ``root`` (needs h5py)."""
    split = _check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"HDF5 folder {root} does not exist")
    points, labels = read_h5_split(root, split)
    if classes is None and (root / "shape_names.txt").is_file():
        classes = [ln.strip() for ln in (root / "shape_names.txt").read_text().splitlines() if ln.strip()]
    return PointCloudDataset(_maybe_subsample(points, num_points, seed), labels, classes,
                             f"modelnet-h5-{split}")


def _folder_loader(dataset: str, fn):
    def load(root, split, path=None, **options):
        folder = root if root is not None else path
        if folder is None:
            raise ConfigError(f"{dataset} needs a folder: load({dataset!r}, root=PATH)")
        check_options(dataset, fn, options)
        return fn(folder, split=split, **options)
    return load


def _load_modelnet10(root, split, **options):
    check_options("modelnet10", load_modelnet10, options)
    return load_modelnet10(root, split=split, **options)


DATASETS.register("modelnet10", _load_modelnet10, info=DatasetInfo("modelnet10", 10, None, 3))
DATASETS.register("modelnet-off", _folder_loader("modelnet-off", load_modelnet_off),
                  info=DatasetInfo("modelnet-off", None, None, 3))
DATASETS.register("modelnet-h5", _folder_loader("modelnet-h5", load_modelnet_h5),
                  info=DatasetInfo("modelnet-h5", None, None, 3))

__all__ = ["PointCloudDataset", "MODELNET10_CLASSES", "load_modelnet10", "load_modelnet_off",
           "load_modelnet_h5"]
