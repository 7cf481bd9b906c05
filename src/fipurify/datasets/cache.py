"""Cache decoded datasets as uint8 arrays, and unpack archives once, safely.

Decoding tens of thousands of small image files takes a while; the decoded arrays are
written once to an uncompressed ``.npz`` in :func:`cache_dir` and read back in a
fraction of a second afterwards. Cache keys hash the source's path, size and
modification time (or a folder's file listing), so a changed source is decoded anew.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import lzma
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError
from .roots import cache_dir

# Bump when the cached layout or decoding changes, so old cache files are ignored.
CACHE_VERSION = "1"

Arrays = tuple[np.ndarray, np.ndarray, list[str]]


def _hash_parts(parts: Iterable[object]) -> str:
    h = hashlib.sha256(f"fipurify-cache-v{CACHE_VERSION}".encode())
    for part in parts:
        h.update(b"\x00")
        h.update(str(part).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def file_key(path: str | Path, *extra: object) -> str:
    """Cache key of one source file: its absolute path, size and mtime, plus ``extra``."""
    path = Path(path).resolve()
    st = path.stat()
    return _hash_parts([path, st.st_size, st.st_mtime_ns, *extra])


_CONTENT_DIGESTS: dict[tuple[str, int, int], str] = {}


def content_key(path: str | Path, *extra: object) -> str:
    """Cache key of one archive from its bytes (SHA-256), plus ``extra``.

    Unlike :func:`file_key`, a copied, moved or re-touched archive keeps its key, so it is
    not unpacked and decoded again. The digest is remembered per process for as long
    as the file's size and mtime stay the same.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp not in _CONTENT_DIGESTS:
        _CONTENT_DIGESTS[stamp] = file_digest(path)
    return _hash_parts([_CONTENT_DIGESTS[stamp], *extra])


def folder_key(folder: str | Path, *extra: object) -> str:
    """Cache key of a folder tree: every file's relative path, size and mtime, plus ``extra``."""
    folder = Path(folder).resolve()
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            entries.append(f"{rel}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return _hash_parts([folder, len(entries), *entries, "|", *extra])


def cache_path(label: str, key: str) -> Path:
    """Where the arrays for ``key`` are (or will be) cached."""
    return cache_dir() / f"{label}-{key[:24]}.npz"


def _read_npz(path: Path) -> Arrays | None:
    """The cached arrays, or None if the file is unreadable (it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], z["classes"]
    except (OSError, ValueError, KeyError, zlib.error, EOFError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        return None
    return images, labels.astype(np.int64, copy=False), [str(c) for c in classes]


def _default_mode(mode: int) -> int:
    """``mode`` limited by the umask: temp files are private (0600), the cache need not be."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    """Write atomically (see :func:`fipurify.io.atomic_output`)."""
    from ..io import atomic_output

    with atomic_output(path) as f:
        # Uncompressed on purpose: loading then is a plain read, far faster than zlib.
        np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64),
                 classes=np.asarray(list(classes), dtype=str))
        os.chmod(f.name, _default_mode(0o666))


def load_or_build(key: str, build: Callable[[], tuple[np.ndarray, Sequence[int] | np.ndarray,
                                                     Sequence[str]]],
                  label: str = "data", use_cache: bool = True) -> Arrays:
    """Return ``(images uint8 NxHxWxC, labels int64, classes)`` for ``key``.

    Reads them from the cache when present; otherwise calls ``build()`` and stores its
    result. A cache that cannot be written (read-only disk) is not an error: the freshly
    built arrays are returned anyway.
    """
    if use_cache:
        path = cache_path(label, key)
        if path.is_file():
            hit = _read_npz(path)
            if hit is not None:
                return hit
    images, labels, classes = build()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    classes = [str(c) for c in classes]
    if use_cache:
        try:
            _write_npz(path, images, labels, classes)
        except OSError:
            pass
    return images, labels, classes


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: str | Path, expected: str, algorithm: str = "sha256") -> None:
    """Raise DataError unless ``path`` has the ``expected`` digest."""
    got = file_digest(path, algorithm)
    if got.lower() != expected.lower():
        raise DataError(f"{path}: {algorithm} mismatch (expected {expected}, got {got}); "
                        f"the file is corrupt, incomplete or not the expected release")


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path; DataError for anything that could escape or link."""
    name = member.name
    path = PurePosixPath(name)
    if (not name or name.startswith(("/", "\\")) or path.is_absolute()
            or ".." in path.parts or "\\" in name or ":" in path.parts[0]):
        raise DataError(f"{archive}: refusing unsafe member path {name!r}")
    if not (member.isreg() or member.isdir()):
        raise DataError(f"{archive}: refusing member {name!r}: only plain files and folders "
                        f"are allowed (links and devices are not)")
    return path


def safe_extract(archive: str | Path, dest: str | Path) -> None:
    """Unpack ``archive`` into ``dest`` member by member, refusing absolute paths, ``..``,
    links and special files. Files are copied by hand, so no permissions or owners
    from the archive are applied."""
    archive, dest = Path(archive), Path(dest)
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # streams: one decompression pass
                rel = _safe_member_path(member, archive)
                target = (root / rel).resolve()
                if target != root and root not in target.parents:
                    raise DataError(f"{archive}: refusing member {member.name!r} outside the target")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    raise DataError(f"{archive}: cannot read member {member.name!r}")
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{archive}: corrupt or unreadable archive ({exc})") from exc


def extract_once(archive: str | Path, label: str, sha256: str | None = None) -> Path:
    """Unpack ``archive`` into the cache once and return the folder.

    The archive is checked against ``sha256`` (when given) before unpacking. Unpacking
    goes to a temporary folder that is renamed into place only when complete, so an
    interrupted run never leaves a half-filled folder that looks finished.
    """
    archive = Path(archive)
    base = cache_dir() / "extracted"
    base.mkdir(parents=True, exist_ok=True)
    dest = base / f"{label}-{content_key(archive)[:16]}"
    if (dest / ".complete").is_file():
        return dest
    if sha256:
        verify_checksum(archive, sha256, "sha256")
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{label}-tmp-"))
    try:
        safe_extract(archive, tmp)
        (tmp / ".complete").write_text(str(archive.resolve()) + "\n")
        os.chmod(tmp, _default_mode(0o777))
        if (dest / ".complete").is_file():
            # Another process finished first and may be reading its copy now: keep it.
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        if dest.exists():
            # A stale, incomplete folder from an older crash. Move it aside before
            # deleting it, so the path never shows a half-deleted tree.
            stale = Path(tempfile.mkdtemp(dir=base, prefix=f".{label}-stale-"))
            try:
                os.replace(dest, stale / "old")
            except OSError:
                pass  # someone else moved it already
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished between our check and the rename: use its copy.
            if not (dest / ".complete").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


__all__ = ["CACHE_VERSION", "file_key", "content_key", "folder_key", "cache_path", "load_or_build",
           "file_digest", "verify_checksum", "safe_extract", "extract_once"]
