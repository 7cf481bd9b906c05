"""User-supplied triggers: an image file, a numpy array or a tensor, pasted or blended."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack
from .triggers import BlendTrigger, PatchTrigger, Position, _as_pattern

STYLES = ("paste", "blend")


def _read_image(path: str | os.PathLike, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image file as uint8 H x W x C plus its alpha channel (H x W) when it has one."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode == "P":  # palette: keep transparency if the palette has it
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA", "PA"):
                arr = np.asarray(im.convert("RGBA" if im.mode == "RGBA" else "LA"))
                return arr[..., :-1], arr[..., -1]
            arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read {what} {p}: {exc}") from None
    return (arr[..., None] if arr.ndim == 2 else arr), None


def _array_to_chw(arr: np.ndarray, what: str) -> torch.Tensor:
    """H x W or H x W x C (C in 1, 3, 4) numpy image to a float C x H x W tensor in [0, 1]."""
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim != 2:
        raise DataError(f"{what} array must be H x W or H x W x C with C in 1, 3, 4, got shape {arr.shape}")
    return _as_pattern(torch.from_numpy(np.array(arr, copy=True)), what, DataError)


def load_pattern(source: Any, what: str = "trigger pattern") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float C x H x W tensor in [0, 1] from a path, array, tensor or nested list.

    - path (str / PathLike): read with PIL; grey images give 1 channel, colour images 3;
      an alpha channel is returned separately (second value) for use as a mask.
    - numpy array: image layout H x W or H x W x C (as PIL and ArrayDataset store images).
    - torch tensor or nested list: C x H x W or H x W (as :meth:`Trigger.to_spec` writes).
    uint8 values are scaled by 1/255; float values must already lie in [0, 1].
    """
    if isinstance(source, (str, os.PathLike)):
        arr, alpha = _read_image(source, what)
        mask = None if alpha is None else _array_to_chw(alpha, f"{what} alpha")
        return _array_to_chw(arr, what), mask
    if isinstance(source, np.ndarray):
        return _array_to_chw(source, what), None
    if isinstance(source, torch.Tensor):
        return _as_pattern(source, what, DataError), None
    if isinstance(source, (list, tuple)):
        return _as_pattern(np.asarray(source, dtype=np.float64), what, DataError), None
    raise ConfigError(f"{what} must be a file path, numpy array, tensor or nested list, "
                      f"got {type(source).__name__}")


def load_mask(source: Any, what: str = "trigger mask") -> torch.Tensor:
    """A mask (1 or C channels, values in [0, 1]) from the same sources as :func:`load_pattern`.

    Image files are read as grey levels (their alpha channel, if any, is ignored).
    """
    if isinstance(source, (str, os.PathLike)):
        arr, alpha = _read_image(source, what)
        if arr.shape[-1] == 3:
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).convert("L"))[..., None]
        return _array_to_chw(arr, what)
    return load_pattern(source, what)[0]


def serialise_source(source: Any) -> Any:
    """Spec form of a pattern source: a path stays a path string, data becomes C x H x W lists."""
    if source is None or isinstance(source, (str, os.PathLike)):
        return None if source is None else str(source)
    return load_pattern(source)[0].tolist()


class CustomAttack(Attack):
    """An attack with a user-supplied trigger.

    ``pattern``: image file path (read with PIL, uint8 scaled to [0, 1]), numpy array
    (H x W or H x W x C), tensor or nested list (C x H x W or H x W). ``mask``: same kinds,
    values in [0, 1]; when omitted, an alpha channel in the pattern file serves as mask.
    ``style="paste"``: the pattern is pasted as a patch at ``position`` (``(top, left)`` or
    a name such as ``"bottom-right"``, the default; ``margin`` pixels from named edges).
    ``style="blend"``: the pattern is resized to the image and mixed in with ``alpha``
    (position must then be None). ``style`` is called so because ``mode`` already means
    all2one / all2all. Specs store a file path as a path (re-read when rebuilt, relative
    to the working directory) and array data as nested lists.
    """

    name = "custom"
    summary = "your own pattern, pasted or blended"

    def __init__(self, pattern: Any, mask: Any = None, position: Position | None = None,
                 style: str = "paste", alpha: float = 0.2, margin: int = 0, target: int = 0,
                 poison_rate: float | None = None, mode: str = "all2one", seed: int = 0,
                 num_classes: int | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if style not in STYLES:
            raise ConfigError(f"custom trigger style must be one of {', '.join(STYLES)}, got {style!r}")
        if pattern is None:
            raise ConfigError("a custom attack needs a trigger pattern (file path, array or tensor)")
        pat, alpha_mask = load_pattern(pattern)
        m = load_mask(mask) if mask is not None else alpha_mask
        self.pattern_source = serialise_source(pattern)
        self.mask_source = serialise_source(mask)
        try:
            alpha, margin = float(alpha), int(margin)
        except (TypeError, ValueError):
            raise ConfigError(f"custom trigger alpha must be a number and margin an integer, "
                              f"got alpha={alpha!r}, margin={margin!r}") from None
        self.style, self.alpha, self.margin = style, alpha, margin
        self.position = position
        if style == "paste":
            self.trigger = PatchTrigger(pat, "bottom-right" if position is None else position, m, margin)
        else:
            if position is not None:
                raise ConfigError("a blended custom trigger covers the whole image: leave position unset")
            self.trigger = BlendTrigger(pat, alpha, m)

    def _spec_args(self) -> dict:
        pos = self.position
        return {"pattern": self.pattern_source, "mask": self.mask_source,
                "position": list(pos) if pos is not None and not isinstance(pos, str) else pos,
                "style": self.style, "alpha": self.alpha, "margin": self.margin}


ATTACKS.register(CustomAttack.name, CustomAttack)
