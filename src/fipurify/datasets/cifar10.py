"""CIFAR-10 from the official python release or from the offline JPEG copy.

Sources, in order of preference (all looked for inside the data root):

1. ``cifar-10-batches-py/`` - the extracted official release;
2. ``cifar-10-python.tar.gz`` - the official archive (md5-checked, read without unpacking);
3. ``cifar10/`` or ``CIFAR-10-images/`` - an image folder with ``train/`` and ``test/``;
4. ``cifar10-jpeg.tar.gz`` - the offline JPEG copy (sha256-checked, unpacked once into the cache).

The official batches are pickles. They are read with a restricted unpickler that only
rebuilds dicts, lists, strings, bytes, numbers and numpy arrays, so a tampered batch
cannot run code.
"""
from __future__ import annotations

import io
import lzma
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_output
from .base import DATASETS, ArrayDataset, DatasetInfo, loader
from .cache import content_key, extract_once, file_digest, file_key, folder_key, load_or_build, verify_checksum
from .imagefolder import read_image_folder
from .roots import resolve_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_JPEG_SHA256 = "d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a"

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
JPEG_DIRS = ("cifar10", "CIFAR-10-images")
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META_FILE = "batches.meta"


# --------------------------------------------------------------------------- unpickling
def _numpy_multiarray():
    try:  # numpy >= 2 keeps it in numpy._core; numpy.core warns there.
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


_MA = _numpy_multiarray()
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _MA._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _MA._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "ndarray"): np.ndarray,
    ("numpy._core.multiarray", "ndarray"): np.ndarray,
    # Python 3 pickles written with protocol 2 rebuild bytes through these two.
    ("_codecs", "encode"): __import__("codecs").encode,
}
for _mod in ("builtins", "__builtin__"):
    for _name in ("dict", "list", "tuple", "bytes", "bytearray", "str", "int", "float", "bool"):
        _ALLOWED_GLOBALS[(_mod, _name)] = getattr(__import__("builtins"), _name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR-10 batch never needs it") from None


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle a CIFAR batch with the restricted unpickler; DataError on anything odd."""
    try:
        # encoding="bytes": the official batches were written by Python 2.
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{source}: refused to unpickle: {exc}") from exc
    except Exception as exc:  # truncated or garbage data raises many kinds of errors
        raise DataError(f"{source}: corrupt CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc


def _field(d: Any, key: str, source: str) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{source}: expected a dict, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{source}: no {key!r} entry; not a CIFAR-10 batch")


def _decode_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(raw, source)
    data = np.asarray(_field(d, "data", source))
    labels = np.asarray(_field(d, "labels", source), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: data must be uint8 N x 3072, got {data.dtype} {data.shape}")
    if len(labels) != len(data) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{source}: labels do not match the images")
    # Rows are channel-planar (R, G, B planes of 32x32): to N x H x W x C.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _classes_from_meta(raw: bytes | None, source: str) -> list[str]:
    if raw is None:
        return list(CIFAR10_CLASSES)
    names = _field(safe_unpickle(raw, source), "label_names", source)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(names) != 10:
        raise DataError(f"{source}: expected 10 label names, got {len(names)}")
    return names


def _assemble(raw: dict[str, bytes | None], split: str, where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    parts = []
    for fname in SPLIT_FILES[split]:
        if raw.get(fname) is None:
            raise DataError(f"{where}: missing {fname}")
        parts.append(_decode_batch(raw[fname], f"{where}/{fname}"))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels, _classes_from_meta(raw.get(META_FILE), f"{where}/{META_FILE}")


def _read_batches_dir(folder: Path, split: str):
    raw: dict[str, bytes | None] = {}
    for fname in SPLIT_FILES[split] + [META_FILE]:
        p = folder / fname
        raw[fname] = p.read_bytes() if p.is_file() else None
    return _assemble(raw, split, str(folder))


def _read_official_archive(archive: Path, split: str, md5: str | None):
    if md5:  # verified before any byte of it is unpickled
        verify_checksum(archive, md5, "md5")
    wanted = {f"{BATCHES_DIR}/{f}": f for f in SPLIT_FILES[split] + [META_FILE]}
    raw: dict[str, bytes | None] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # read the few members needed; nothing is written to disk
                if member.name in wanted and member.isreg():
                    f = tf.extractfile(member)
                    raw[wanted[member.name]] = f.read() if f is not None else None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise DataError(f"{archive}: corrupt or unreadable archive ({exc})") from exc
    return _assemble(raw, split, str(archive))


# --------------------------------------------------------------------------- sources
def _jpeg_root(folder: Path) -> Path:
    """The folder holding train/ and test/ (the archive may wrap them in one folder)."""
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return folder
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and ((sub / "train").is_dir() or (sub / "test").is_dir()):
            return sub
    raise DataError(f"{folder}: no train/ or test/ folder inside")


def _read_jpeg_folder(folder: Path, split: str):
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"CIFAR-10 image folder {folder} has no {split}/ folder")
    present = {d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if present != set(CIFAR10_CLASSES):
        raise DataError(f"{split_dir}: expected the 10 CIFAR-10 class folders "
                        f"(missing {sorted(set(CIFAR10_CLASSES) - present)}, "
                        f"unexpected {sorted(present - set(CIFAR10_CLASSES))})")
    images, labels, classes = read_image_folder(split_dir, CIFAR10_CLASSES)
    if images.shape[1:] != (32, 32, 3):
        raise DataError(f"{split_dir}: CIFAR-10 images must be 32x32 RGB, got {images.shape[1:]}")
    return images, labels, classes


def find_cifar10(root: Path) -> tuple[str, Path]:
    """The best CIFAR-10 source under ``root`` as ``(kind, path)``.

    ``kind`` is one of "batches", "archive", "folder", "jpeg-archive".
    """
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return "batches", root
    if (root / BATCHES_DIR).is_dir():
        return "batches", root / BATCHES_DIR
    if (root / ARCHIVE_NAME).is_file():
        return "archive", root / ARCHIVE_NAME
    for name in JPEG_DIRS:
        if (root / name).is_dir():
            return "folder", root / name
    if (root / JPEG_ARCHIVE).is_file():
        return "jpeg-archive", root / JPEG_ARCHIVE
    if (root / "train" / "airplane").is_dir() or (root / "test" / "airplane").is_dir():
        return "folder", root
    looked = ", ".join([BATCHES_DIR + "/", ARCHIVE_NAME] + [d + "/" for d in JPEG_DIRS] + [JPEG_ARCHIVE])
    raise DataError(f"CIFAR-10 not found in {root} (looked for {looked}); "
                    f"pass --data-root, set FIPURIFY_DATA, or run download_cifar10()")


def load_cifar10(root: str | Path | None = None, split: str = "train",
                 cache: bool = True) -> ArrayDataset:
    """CIFAR-10 ``split`` ("train": 50,000 images, "test": 10,000) as an ArrayDataset.

    The dataset is named ``cifar10-<split>`` when read from the official release and
    ``cifar10-jpeg-<split>`` when read from the lossy JPEG copy. Classes follow
    CIFAR-10's index order (airplane, automobile, ..., truck).
    """
    if split not in SPLIT_FILES:
        raise ConfigError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    kind, path = find_cifar10(resolve_root(root))
    if kind == "batches":
        missing = [f for f in SPLIT_FILES[split] if not (path / f).is_file()]
        if missing:
            raise DataError(f"CIFAR-10 folder {path} lacks {', '.join(missing)}")
        files = [path / f for f in SPLIT_FILES[split] + [META_FILE] if (path / f).is_file()]
        key = file_key(files[0], "cifar10-batches", split, *(file_key(f) for f in files[1:]))
        build = lambda: _read_batches_dir(path, split)  # noqa: E731
    elif kind == "archive":
        key = content_key(path, "cifar10-archive", split, CIFAR10_MD5)
        build = lambda: _read_official_archive(path, split, CIFAR10_MD5)  # noqa: E731
    elif kind == "folder":
        jpeg_root = _jpeg_root(path)
        key = folder_key(jpeg_root / split, "cifar10-folder", split)
        build = lambda: _read_jpeg_folder(jpeg_root, split)  # noqa: E731
    else:
        key = content_key(path, "cifar10-jpeg-archive", split, CIFAR10_JPEG_SHA256)
        build = lambda: _read_jpeg_folder(  # noqa: E731
            _jpeg_root(extract_once(path, "cifar10-jpeg", CIFAR10_JPEG_SHA256)), split)
    images, labels, classes = load_or_build(key, build, label=f"cifar10-{split}", use_cache=cache)
    lossy = kind in ("folder", "jpeg-archive")
    return ArrayDataset(images, labels, classes, name=f"cifar10{'-jpeg' if lossy else ''}-{split}")


def download_cifar10(root: str | Path, timeout: float = 60.0) -> Path:
    """Download the official CIFAR-10 python archive into ``root`` and check its md5.

    Needs internet access. Writes to a temporary file first and renames it into place
    only when the checksum matches. An already present, valid archive is kept.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / ARCHIVE_NAME
    if target.is_file() and file_digest(target, "md5") == CIFAR10_MD5:
        return target
    with atomic_output(target, suffix=".part") as out:
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        except OSError as exc:
            raise DataError(f"cannot download {CIFAR10_URL}: {exc}") from exc
        out.flush()
        verify_checksum(out.name, CIFAR10_MD5, "md5")
    return target


DATASETS.register("cifar10", loader("cifar10", load_cifar10), info=DatasetInfo("cifar10", len(CIFAR10_CLASSES), 32, 3))


__all__ = ["CIFAR10_CLASSES", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_JPEG_SHA256",
           "find_cifar10", "load_cifar10", "download_cifar10", "safe_unpickle"]
