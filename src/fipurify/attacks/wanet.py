"""WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth, nearly invisible image warp as the trigger."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack, dataset_labels
from .rendered import RenderedPoisonedDataset, choose_cover, choose_poisoned
from .triggers import Trigger, _batched, register_trigger

#: Largest sum of |weights| of 2-D bicubic interpolation (a = -0.75): 1.375 per axis. The
#: upsampled control grid can overshoot the control values by at most this factor.
BICUBIC_GAIN = 1.375 ** 2


@register_trigger
class WarpTrigger(Trigger):
    """Warp the image along a fixed random smooth field (WaNet's trigger).

    The field: a ``2 x k x k`` control grid ``P`` of uniform values in [-1, 1] drawn from
    ``numpy.random.default_rng(field_seed)``, divided by its mean absolute value (so
    ``mean |P| = 1``), upsampled bicubically (corners aligned) to the image size. The
    sampling grid in ``grid_sample``'s [-1, 1] coordinates is
    ``clamp((identity + s * P_up / size) * grid_rescale, -1, 1)`` with ``size`` the image
    width for the x component and the height for the y component (WaNet divides both by
    the height; the two agree on square images). Displacements are therefore at most
    ``s * max|P| * BICUBIC_GAIN / size`` in those coordinates, i.e. about
    ``s * max|P| * BICUBIC_GAIN / 2`` pixels; with the paper's ``s = 0.5`` the mean shift
    is about a quarter pixel. Sampling is bilinear with aligned corners.

    :meth:`apply_noisy` adds WaNet's "noise mode" jitter: an extra per-pixel offset
    uniform in ``[-1, 1] / size`` (given by the caller so it can be seeded per sample).
    """

    kind = "warp"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, field_seed: int = 0):
        if isinstance(k, bool) or int(k) != k or int(k) < 2:
            raise ConfigError(f"WaNet control grid size k must be an integer >= 2, got {k!r}")
        s, grid_rescale = float(s), float(grid_rescale)
        if not (s > 0 and math.isfinite(s)):
            raise ConfigError(f"WaNet warp strength s must be > 0, got {s}")
        if not (grid_rescale > 0 and math.isfinite(grid_rescale)):
            raise ConfigError(f"WaNet grid_rescale must be > 0, got {grid_rescale}")
        self.k, self.s, self.grid_rescale, self.field_seed = int(k), s, grid_rescale, int(field_seed)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def control_grid(self) -> torch.Tensor:
        """The normalised ``2 x k x k`` control grid (x offsets first, then y)."""
        rng = np.random.default_rng(self.field_seed)
        p = rng.uniform(-1.0, 1.0, size=(2, self.k, self.k))
        return torch.from_numpy(p / np.mean(np.abs(p))).float()

    def field(self, height: int, width: int) -> torch.Tensor:
        """Displacement field, ``height x width x 2`` (x, y) in ``grid_sample`` coordinates, before clamping."""
        if height < self.k or width < self.k:
            raise DataError(f"WaNet with a {self.k}x{self.k} control grid needs images of at least "
                            f"{self.k}x{self.k} pixels, got {height}x{width}")
        up = F.interpolate(self.control_grid().unsqueeze(0), size=(height, width), mode="bicubic",
                           align_corners=True)[0]
        scale = torch.tensor([width, height], dtype=up.dtype)
        return self.s * up.permute(1, 2, 0) / scale

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The clamped sampling grid, ``height x width x 2`` (float32, CPU), cached per size."""
        key = (int(height), int(width))
        if key not in self._cache:
            ys = torch.linspace(-1.0, 1.0, height)
            xs = torch.linspace(-1.0, 1.0, width)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((gx, gy), dim=-1)
            self._cache[key] = ((identity + self.field(height, width)) * self.grid_rescale).clamp_(-1.0, 1.0)
        return self._cache[key]

    def _sample(self, xb: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = F.grid_sample(xb, grid.to(device=xb.device, dtype=xb.dtype), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return out.clamp_(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        n, _, h, w = xb.shape
        out = self._sample(xb, self.grid(h, w).unsqueeze(0).expand(n, h, w, 2))
        return out[0] if single else out

    def apply_noisy(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Warp with extra jitter: ``noise`` is N x H x W x 2 (or H x W x 2) uniform in [-1, 1]."""
        xb, single = _batched(x)
        n, _, h, w = xb.shape
        noise = noise.reshape(-1, h, w, 2)
        if noise.shape[0] != n:
            raise DataError(f"noise for {noise.shape[0]} images given for a batch of {n}")
        scale = torch.tensor([w, h], dtype=noise.dtype)
        grid = (self.grid(h, w).unsqueeze(0) + noise / scale).clamp(-1.0, 1.0)
        out = self._sample(xb, grid)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale,
                "field_seed": self.field_seed}


def sample_noise(seed: int, position: int, height: int, width: int) -> torch.Tensor:
    """The fixed noise-mode jitter of training sample ``position``: H x W x 2, uniform in [-1, 1]."""
    rng = np.random.default_rng([int(seed), 0x57A4, int(position)])
    return torch.from_numpy(rng.uniform(-1.0, 1.0, size=(height, width, 2))).float()


class WaNet(Attack):
    """WaNet with the paper's CIFAR-10 / GTSRB settings: ``k = 4``, ``s = 0.5``,
    ``grid_rescale = 1``, noise mode with ``cross_ratio = 2``.

    ``poison_rate`` of the eligible samples (non-target for all2one, all for all2all)
    are warped and relabelled, chosen exactly as in :class:`Attack`. Noise mode: another
    ``round(cross_ratio * n_poisoned)`` samples, drawn from the rest (any class), are
    warped with extra random jitter (see :class:`WarpTrigger`) and KEEP their labels, so
    the model must learn this exact warp rather than any warp. The original trains with a
    fresh random batch share every step; here the samples and each one's jitter are fixed
    (seeded by ``seed`` and the sample's position), so the poisoned set is reproducible.
    The warp field depends only on ``k``, ``s``, ``grid_rescale`` and ``field_seed`` and is
    rebuilt identically from the spec.
    """

    name = "wanet"
    summary = "smooth warping field"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, k: int = 4, s: float = 0.5,
                 grid_rescale: float = 1.0, cross_ratio: float = 2.0, field_seed: int = 0):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        cross_ratio = float(cross_ratio)
        if not (cross_ratio >= 0 and math.isfinite(cross_ratio)):
            raise ConfigError(f"WaNet cross_ratio must be >= 0, got {cross_ratio}")
        self.cross_ratio = cross_ratio
        self.trigger: WarpTrigger = WarpTrigger(k, s, grid_rescale, field_seed)

    def poison(self, dataset) -> RenderedPoisonedDataset:
        """Warp-and-relabel ``poison_rate`` of the eligible samples, plus the noise-mode samples."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        chosen, rng = choose_poisoned(self, labels)
        cover = choose_cover(rng, len(labels), chosen, round(self.cross_ratio * len(chosen)),
                             f"WaNet noise mode (cross_ratio {self.cross_ratio})")
        flags = np.zeros(len(labels), dtype=bool)
        flags[chosen] = True
        cover_flag = np.zeros(len(labels), dtype=bool)
        cover_flag[cover] = True
        new_labels = labels.copy()
        new_labels[chosen] = self.targets_for(labels[chosen])
        trigger, seed = self.trigger, self.seed

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            out = images.clone()
            noisy = cover_flag[positions]
            if (~noisy).any():
                m = torch.from_numpy(~noisy)
                out[m] = trigger.apply(images[m])
            if noisy.any():
                h, w = images.shape[-2:]
                noise = torch.stack([sample_noise(seed, p, h, w) for p in positions[noisy]])
                m = torch.from_numpy(noisy)
                out[m] = trigger.apply_noisy(images[m], noise)
            return out

        return RenderedPoisonedDataset(dataset, self.trigger, flags, new_labels, labels, n_classes, render,
                                       cover_flag=cover_flag)

    def _spec_args(self) -> dict:
        t = self.trigger
        return {"k": t.k, "s": t.s, "grid_rescale": t.grid_rescale, "cross_ratio": self.cross_ratio,
                "field_seed": t.field_seed}


ATTACKS.register(WaNet.name, WaNet)
