"""Where datasets live (the data root) and where decoded copies are cached."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

DATA_ENV = "FIPURIFY_DATA"
CACHE_ENV = "FIPURIFY_CACHE"
# The offline copies sit in ``shared/data`` beside the project's checkout.
_SIBLING_DATA = Path("..") / "shared" / "data"


def _repo_root() -> Path | None:
    """The checkout holding this package (the folder with pyproject.toml), if any.

    An installed, non-editable copy has no pyproject.toml above it, so this is None there.
    """
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def resolve_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FIPURIFY_DATA``, else ``../shared/data``.

    ``../shared/data`` is tried relative to the current working directory, then relative
    to the repository root. An explicit ``root`` or ``$FIPURIFY_DATA`` must exist: a
    wrong setting is reported rather than silently replaced by a fallback.
    """
    if root is not None and str(root) != "":
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"data root {path} does not exist or is not a folder")
        return path
    env = os.environ.get(DATA_ENV, "")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"${DATA_ENV}={env} does not exist or is not a folder")
        return path
    candidates = [Path.cwd() / _SIBLING_DATA]
    repo = _repo_root()
    if repo is not None:
        candidates.append(repo / _SIBLING_DATA)
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    looked = ", ".join(dict.fromkeys(str(c.resolve()) for c in candidates))  # each place once
    raise DataError(f"no data folder found (looked in {looked}): "
                    f"pass --data-root or set {DATA_ENV}")


def cache_dir() -> Path:
    """The cache folder (``$FIPURIFY_CACHE`` or ``~/.cache/fipurify``), created on demand."""
    env = os.environ.get(CACHE_ENV, "")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "fipurify"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache folder {path}: {exc.strerror or exc}; "
                        f"set {CACHE_ENV} to a writable folder") from exc
    return path
