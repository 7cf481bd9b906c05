"""Backdoor triggers acting on float images in [0, 1].

Every trigger takes one image (C x H x W) or a batch (N x C x H x W; the same trigger
for every image), returns a NEW tensor clamped to [0, 1], and describes itself with
``to_spec()`` (a JSON-serialisable dict) that ``trigger_from_spec`` turns back into an
identical trigger.

Channel rule shared by all patterns: a 1-channel pattern is used on every channel; a
3-channel pattern on a 1-channel image is turned grey (channel mean); any other
mismatch is a DataError.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

Position = Union[str, Sequence[int]]

#: Named anchor points accepted by :class:`PatchTrigger` (``margin`` pixels from the edges).
NAMED_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


# --------------------------------------------------------------------------- helpers
def _as_pattern(value: Any, what: str, error: type[Exception] = ConfigError) -> torch.Tensor:
    """A float32 C x h x w tensor in [0, 1] from a tensor, array or nested list (h x w allowed).

    uint8 input is scaled by 1/255 like the datasets do; ``error`` is the exception class
    raised for a bad shape or range (ConfigError for options, DataError for loaded files).
    """
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.dtype == torch.uint8:
        t = t.float().div(255.0)
    t = t.to(torch.float32)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or min(t.shape) == 0:
        raise error(f"{what} must have shape C x h x w or h x w, got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise error(f"{what} values must lie in [0, 1] (uint8 input is scaled by 1/255), "
                    f"got [{t.min().item():.3g}, {t.max().item():.3g}]")
    return t.contiguous()


def _batched(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as N x C x H x W plus whether it was a single image."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"triggers act on torch tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"triggers act on float images in [0, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        return x.unsqueeze(0), True
    if x.ndim == 4:
        return x, False
    raise DataError(f"expected an image C x H x W or a batch N x C x H x W, got shape {tuple(x.shape)}")


def match_channels(pattern: torch.Tensor, channels: int, what: str = "trigger pattern") -> torch.Tensor:
    """Adapt a C' x h x w pattern to ``channels`` channels (see module docstring)."""
    cp = pattern.shape[0]
    if cp == channels:
        return pattern
    if cp == 1:
        return pattern.expand(channels, *pattern.shape[1:])
    if channels == 1 and cp == 3:
        return pattern.mean(dim=0, keepdim=True)
    raise DataError(f"{what} has {cp} channels but the images have {channels}")


def _resize(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear (anti-aliased) resize of a C x h x w tensor to C x H x W."""
    if t.shape[1:] == (h, w):
        return t
    return F.interpolate(t.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0).clamp_(0.0, 1.0)


def _to_list(t: torch.Tensor | None):
    return None if t is None else t.tolist()


class Trigger:
    """Base class: subclasses implement :meth:`apply` and :meth:`to_spec`."""

    kind = "trigger"

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Return a new, triggered copy of ``x`` (C x H x W or N x C x H x W) clamped to [0, 1]."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def to_spec(self) -> dict:  # pragma: no cover - abstract
        """JSON-serialisable description; ``trigger_from_spec`` rebuilds the trigger."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_spec().items()
                         if k != "type" and not isinstance(v, list))
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- patch
class PatchTrigger(Trigger):
    """Paste a small pattern at a fixed place (BadNets / Trojan style).

    ``pattern`` is C x h x w or h x w in [0, 1] (uint8 is scaled by 1/255; numpy arrays are
    read in this layout too: use ``attacks.custom.load_pattern`` for image files and
    H x W x C arrays). ``position`` is
    ``(top, left)`` in pixels (negative values count from the bottom / right edge, as in
    Python indexing) or one of :data:`NAMED_POSITIONS`, placed ``margin`` pixels away from
    the named edges. ``mask`` (h x w or C x h x w, values in [0, 1]) selects where the
    pattern replaces the image: ``out = m * pattern + (1 - m) * x`` on the patch area;
    without a mask the whole patch is pasted. Too-large or out-of-image patches raise
    DataError.
    """

    kind = "patch"

    def __init__(self, pattern: Any, position: Position = "bottom-right", mask: Any = None,
                 margin: int = 0):
        self.pattern = _as_pattern(pattern, "patch pattern")
        self.mask = None if mask is None else _as_pattern(mask, "patch mask")
        h, w = self.pattern.shape[1:]
        if self.mask is not None and self.mask.shape[1:] != (h, w):
            raise ConfigError(f"patch mask is {tuple(self.mask.shape[1:])} but the pattern is {(h, w)}")
        if isinstance(position, str):
            if position not in NAMED_POSITIONS:
                raise ConfigError(f"unknown patch position {position!r}; use (top, left) or one of "
                                  f"{', '.join(NAMED_POSITIONS)}")
            self.position: Position = position
        else:
            try:
                top, left = (int(v) for v in position)
            except (TypeError, ValueError):
                raise ConfigError(f"patch position must be (top, left) or a name, got {position!r}") from None
            self.position = (top, left)
        if int(margin) < 0:
            raise ConfigError(f"patch margin must be >= 0, got {margin}")
        self.margin = int(margin)

    def location(self, height: int, width: int) -> tuple[int, int]:
        """Top-left pixel of the patch in an image of ``height`` x ``width``."""
        h, w = self.pattern.shape[1:]
        if isinstance(self.position, str):
            m = self.margin
            top = {"top": m, "bottom": height - h - m}
            left = {"left": m, "right": width - w - m}
            if self.position == "center":
                t, l = (height - h) // 2, (width - w) // 2
            else:
                vert, horiz = self.position.split("-")
                t, l = top[vert], left[horiz]
        else:
            t, l = self.position
            t = t + height if t < 0 else t
            l = l + width if l < 0 else l
        if t < 0 or l < 0 or t + h > height or l + w > width:
            raise DataError(f"trigger patch {h}x{w} at {self.position!r} (margin {self.margin}) "
                            f"does not fit a {height}x{width} image")
        return t, l

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        _, c, height, width = xb.shape
        t, l = self.location(height, width)
        h, w = self.pattern.shape[1:]
        out = xb.clone()
        p = match_channels(self.pattern, c).to(device=xb.device, dtype=xb.dtype)
        region = out[:, :, t:t + h, l:l + w]
        if self.mask is None:
            region.copy_(p.expand_as(region))
        else:
            m = match_channels(self.mask, c, "patch mask").to(device=xb.device, dtype=xb.dtype)
            region.copy_(m * p + (1 - m) * region)
        out.clamp_(0.0, 1.0)
        return out[0] if single else out

    @property
    def position_spec(self) -> str | list[int]:
        """``position`` in JSON form: a name or ``[top, left]``."""
        return self.position if isinstance(self.position, str) else list(self.position)

    def to_spec(self) -> dict:
        return {"type": self.kind, "pattern": _to_list(self.pattern), "position": self.position_spec,
                "mask": _to_list(self.mask), "margin": self.margin}


# --------------------------------------------------------------------------- blend
class BlendTrigger(Trigger):
    """Mix a full-image pattern into the image: ``(1 - alpha*m) * x + alpha*m * pattern``.

    Give either ``pattern`` (C x H x W or h x w in [0, 1]; resized bilinearly to the image
    size when it differs) or ``noise_seed``: then the pattern is uniform noise in [0, 1)
    drawn with ``numpy.random.default_rng(noise_seed)`` at the size of the images it first
    meets (one fixed pattern per image shape), and the spec stores the seed, not the
    pixels. ``mask`` (optional, h x w or C x h x w in [0, 1], resized likewise) limits
    where the blend acts. Without a mask the result is exactly
    ``clamp((1 - alpha) * x + alpha * pattern, 0, 1)``.
    """

    kind = "blend"

    def __init__(self, pattern: Any = None, alpha: float = 0.2, mask: Any = None,
                 noise_seed: int | None = None):
        if (pattern is None) == (noise_seed is None):
            raise ConfigError("BlendTrigger needs exactly one of pattern or noise_seed")
        alpha = float(alpha)
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"blend alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.pattern = None if pattern is None else _as_pattern(pattern, "blend pattern")
        self.mask = None if mask is None else _as_pattern(mask, "blend mask")
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        self._cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def pattern_for(self, shape: Sequence[int]) -> torch.Tensor:
        """The C x H x W pattern (float32, CPU) used for images of ``shape`` = (C, H, W)."""
        return self._prepared(tuple(int(s) for s in shape))[0]

    def _prepared(self, shape: tuple[int, int, int]):
        if shape not in self._cache:
            c, h, w = shape
            if self.pattern is None:
                rng = np.random.default_rng(self.noise_seed)
                p = torch.from_numpy(rng.random((c, h, w), dtype=np.float32))
            else:
                p = match_channels(_resize(self.pattern, h, w), c, "blend pattern").contiguous()
            m = None
            if self.mask is not None:
                m = match_channels(_resize(self.mask, h, w), c, "blend mask").contiguous()
            self._cache[shape] = (p, m)
        return self._cache[shape]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        p, m = self._prepared(tuple(xb.shape[1:]))
        p = p.to(device=xb.device, dtype=xb.dtype)
        a = self.alpha
        if m is None:
            out = (1 - a) * xb + a * p
        else:
            am = a * m.to(device=xb.device, dtype=xb.dtype)
            out = (1 - am) * xb + am * p
        out.clamp_(0.0, 1.0)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "alpha": self.alpha, "pattern": _to_list(self.pattern),
                "noise_seed": self.noise_seed, "mask": _to_list(self.mask)}


# --------------------------------------------------------------------------- SIG
class SinusoidalTrigger(Trigger):
    """SIG signal (Barni et al. 2019): vertical stripes varying along the width.

    ``v(i, j) = delta * sin(2 * pi * j * freq / W)`` for column ``j`` of a W-wide image,
    the same on every row and channel.

    - ``style="add"`` (default, the original paper): ``clamp(x + v, 0, 1)`` with
      ``delta = 20/255`` (the paper's 20 grey levels).
    - ``style="blend"``: ``clamp((1 - alpha) * x + alpha * s, 0, 1)`` with the stripe image
      ``s = (1 + sin(2 * pi * j * freq / W)) / 2`` in [0, 1] (``delta`` unused), i.e. the
      Blend attack with a stripe pattern. Some benchmark code "mixes at 0.2" as
      ``alpha * x + (1 - alpha) * v`` in 0..255 units, which keeps only 20% of the image;
      that variant is deliberately not reproduced.
    """

    kind = "sinusoidal"
    STYLES = ("add", "blend")

    def __init__(self, delta: float = 20 / 255, freq: float = 6, style: str = "add", alpha: float = 0.2):
        if style not in self.STYLES:
            raise ConfigError(f"SIG style must be one of {', '.join(self.STYLES)}, got {style!r}")
        delta, freq, alpha = float(delta), float(freq), float(alpha)
        if not 0.0 < delta <= 1.0:
            raise ConfigError(f"SIG delta must be in (0, 1] (pixel units of the [0, 1] range), got {delta}")
        if not freq > 0 or not math.isfinite(freq):
            raise ConfigError(f"SIG frequency must be > 0, got {freq}")
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"SIG alpha must be in (0, 1], got {alpha}")
        self.delta, self.freq, self.style, self.alpha = delta, freq, style, alpha

    def wave(self, width: int) -> torch.Tensor:
        """``sin(2 * pi * j * freq / width)`` for j = 0..width-1 (float64, computed once per call)."""
        j = torch.arange(width, dtype=torch.float64)
        return torch.sin(2 * math.pi * j * self.freq / width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        s = self.wave(xb.shape[-1]).to(device=xb.device, dtype=xb.dtype)  # broadcasts over N, C, H
        if self.style == "add":
            out = xb + self.delta * s
        else:
            out = (1 - self.alpha) * xb + self.alpha * (0.5 + 0.5 * s)
        out.clamp_(0.0, 1.0)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "delta": self.delta, "freq": self.freq, "style": self.style,
                "alpha": self.alpha}


_TRIGGERS = {cls.kind: cls for cls in (PatchTrigger, BlendTrigger, SinusoidalTrigger)}


def register_trigger(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: let :func:`trigger_from_spec` rebuild ``cls`` from its ``to_spec()``.

    For triggers defined in attack modules (which import this one); ``to_spec()`` must give
    ``type`` plus exactly the constructor's keyword arguments.
    """
    _TRIGGERS[cls.kind] = cls
    return cls


def trigger_from_spec(spec: dict) -> Trigger:
    """Rebuild a trigger from ``Trigger.to_spec()`` output."""
    if not isinstance(spec, dict) or spec.get("type") not in _TRIGGERS:
        raise ConfigError(f"not a trigger spec (type must be one of {', '.join(_TRIGGERS)}): {spec!r:.80}")
    args = {k: v for k, v in spec.items() if k != "type"}
    try:
        return _TRIGGERS[spec["type"]](**args)
    except TypeError as exc:
        raise ConfigError(f"bad {spec['type']} trigger spec: {exc}") from None
