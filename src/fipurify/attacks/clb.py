"""Label-consistent backdoor, CLB (Turner, Tsipras & Madry 2019): adversarial images plus a patch."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelFileError
from .badnets import checkerboard
from .base import ATTACKS, Attack, data_digest, dataset_labels
from .rendered import RenderedPoisonedDataset, choose_poisoned, stack_clean
from .triggers import PatchTrigger, Trigger, _batched, register_trigger

CORNERS = {1: ("bottom-right",), 4: ("top-left", "top-right", "bottom-left", "bottom-right")}


@register_trigger
class CornerPatchTrigger(Trigger):
    """The same small pattern pasted in 1 (bottom-right) or all 4 image corners.

    ``amplitude`` < 1 blends the pattern in (``a * pattern + (1 - a) * x`` on the patch):
    Turner et al.'s reduced-amplitude trigger. Four corners keep the trigger visible
    after random flips and crops, as in the paper.
    """

    kind = "corner-patch"

    def __init__(self, pattern: Any, corners: int = 4, amplitude: float = 1.0):
        if corners not in CORNERS:
            raise ConfigError(f"CLB corners must be 1 or 4, got {corners!r}")
        amplitude = float(amplitude)
        if not 0.0 < amplitude <= 1.0:
            raise ConfigError(f"CLB trigger amplitude must be in (0, 1], got {amplitude}")
        first = PatchTrigger(pattern)
        mask = None if amplitude == 1.0 else torch.full(first.pattern.shape[1:], amplitude)
        self.corners, self.amplitude = int(corners), amplitude
        self.patches = [PatchTrigger(first.pattern, pos, mask=mask) for pos in CORNERS[self.corners]]

    @property
    def pattern(self) -> torch.Tensor:
        return self.patches[0].pattern

    def region_mask(self, height: int, width: int) -> torch.Tensor:
        """Boolean H x W mask of the pixels the trigger touches."""
        m = torch.zeros(height, width, dtype=torch.bool)
        h, w = self.pattern.shape[1:]
        for p in self.patches:
            t, l = p.location(height, width)
            m[t:t + h, l:l + w] = True
        return m

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        out = xb
        for p in self.patches:
            out = p.apply(out)
        return out[0] if single else out

    def to_spec(self) -> dict:
        return {"type": self.kind, "pattern": self.pattern.tolist(), "corners": self.corners,
                "amplitude": self.amplitude}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
             steps: int) -> torch.Tensor:
    """Untargeted L_inf PGD from ``x`` (no random start): maximise the cross-entropy of ``y``."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (g,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * g.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return adv.detach()


class CLB(Attack):
    """Clean-label attack: target-class training images are made hard to classify with an
    L_inf adversarial perturbation against a surrogate model trained on CLEAN data, then
    the trigger is pasted; labels never change. The backdoor test set pastes only the
    trigger on the non-target test images.

    Defaults: ``eps = 8/255`` with 100 PGD steps of ``1.5/255`` (BackdoorBench's crafting
    script; Turner et al. report eps 8 and 16 of 255), 80% of the target class poisoned
    (the FIP paper's CLB setting), trigger: the 3x3 black/white checkerboard in all four
    corners at full amplitude (Turner et al.'s four-corner pattern; ``corners=1`` puts it
    bottom-right only, ``amplitude`` < 1 reduces it). Turner et al. attack an
    adversarially trained model; here the surrogate is a normally trained
    ``surrogate_arch`` (PreActResNet18, width ``surrogate_width``) trained for
    ``surrogate_epochs`` with the library's training loop.

    :meth:`prepare` trains (or finds in the cache) the surrogate and records its file and
    SHA-256 under ``surrogate`` in the spec, so :func:`~fipurify.attacks.from_spec`
    rebuilds the same poisoned set; :meth:`poison` runs :meth:`prepare` on the set it is
    given when that has not happened yet. PGD runs once per :meth:`poison` call; the
    perturbed images are kept (on the uint8 grid, within ``eps``) in the returned set.
    """

    name = "clb"
    summary = "clean-label: PGD perturbation, then a patch"
    clean_label = True
    default_poison_rate = 0.8
    needs_preparation = True

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, eps: float = 8 / 255,
                 pgd_steps: int = 100, pgd_step_size: float = 1.5 / 255, patch_size: int = 3,
                 corners: int = 4, amplitude: float = 1.0, surrogate_arch: str = "preactresnet18",
                 surrogate_width: int = 16, surrogate_epochs: int = 10, surrogate_lr: float = 0.1,
                 surrogate_batch_size: int = 128, surrogate: dict | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        eps, step = float(eps), float(pgd_step_size)
        if not (0 < eps <= 1 and math.isfinite(eps)):
            raise ConfigError(f"CLB eps must be in (0, 1] (pixel units of [0, 1]), got {eps}")
        if not (0 < step <= 1):
            raise ConfigError(f"CLB pgd_step_size must be in (0, 1], got {step}")
        for key, v in (("pgd_steps", pgd_steps), ("patch_size", patch_size), ("surrogate_width", surrogate_width),
                       ("surrogate_epochs", surrogate_epochs), ("surrogate_batch_size", surrogate_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"CLB {key} must be an integer >= 1, got {v!r}")
        if not float(surrogate_lr) > 0:
            raise ConfigError(f"CLB surrogate_lr must be > 0, got {surrogate_lr}")
        if surrogate is not None and (not isinstance(surrogate, dict) or not {"path", "sha256"} <= set(surrogate)):
            raise ConfigError("CLB surrogate must be a dict with 'path' and 'sha256' (as prepare() writes it)")
        self.eps, self.pgd_steps, self.pgd_step_size = eps, int(pgd_steps), step
        self.patch_size = int(patch_size)
        self.surrogate_arch, self.surrogate_width = str(surrogate_arch), int(surrogate_width)
        self.surrogate_epochs, self.surrogate_lr = int(surrogate_epochs), float(surrogate_lr)
        self.surrogate_batch_size = int(surrogate_batch_size)
        self.surrogate = dict(surrogate) if surrogate is not None else None
        self.trigger: CornerPatchTrigger = CornerPatchTrigger(checkerboard(self.patch_size), corners, amplitude)

    # -- surrogate -----------------------------------------------------------------------
    def _surrogate_config(self) -> dict:
        return {"arch": self.surrogate_arch, "width": self.surrogate_width, "epochs": self.surrogate_epochs,
                "lr": self.surrogate_lr, "batch_size": self.surrogate_batch_size, "seed": self.seed}

    def prepare(self, train_set, *, cache_dir=None, device="cpu", progress=False) -> None:
        """Train the clean surrogate on ``train_set`` (or reuse a cached one) and record it.

        The file goes to ``cache_dir`` (default ``<fipurify cache>/attacks``) under a name
        derived from the data and the surrogate settings, so the same request reuses it.
        Nothing happens when the recorded surrogate file is already present and intact.
        """
        from .. import models
        from ..datasets.roots import cache_dir as default_cache
        from ..io import load_model, save_model
        from ..training import TrainConfig, train_model

        if self.surrogate is not None and Path(self.surrogate["path"]).is_file() \
                and file_sha256(self.surrogate["path"]) == self.surrogate["sha256"]:
            return
        n_classes = self._bind(train_set)
        folder = Path(cache_dir) if cache_dir is not None else default_cache() / "attacks"
        digest = data_digest(train_set)
        key = hashlib.sha256(json.dumps({"data": digest, **self._surrogate_config()},
                                        sort_keys=True).encode()).hexdigest()[:20]
        path = folder / f"clb-surrogate-{key}.safetensors"
        if path.is_file():
            try:
                load_model(path)  # checks the tensor checksum
            except ModelFileError:
                path.unlink()
        if not path.is_file():
            c, h, w = stack_clean(train_set, np.array([0])).shape[1:]
            torch.manual_seed(self.seed)
            model = models.create(self.surrogate_arch, num_classes=n_classes, width=self.surrogate_width,
                                  in_channels=int(c), input_size=int(h)).to(device)
            cfg = TrainConfig(epochs=self.surrogate_epochs, lr=self.surrogate_lr,
                              batch_size=self.surrogate_batch_size, seed=self.seed)
            log = (lambda m: print(f"[clb surrogate] {m}", file=sys.stderr)) if progress else None
            train_model(model, train_set, cfg, progress=progress, log=log)
            save_model(model, path, {"purpose": "CLB clean surrogate", "data_sha256": digest,
                                     "surrogate_config": self._surrogate_config()})
        self.surrogate = {"path": str(path.resolve()), "sha256": file_sha256(path)}

    @property
    def prepared(self) -> bool:
        """Whether a surrogate is recorded (its file is checked when it is loaded)."""
        return self.surrogate is not None

    def load_surrogate(self, device: str | torch.device = "cpu") -> nn.Module:
        """The recorded surrogate model, after checking the file's SHA-256."""
        from ..io import load_model

        if self.surrogate is None:
            raise ConfigError("the CLB surrogate is not prepared: call attack.prepare(train_set) first")
        path = Path(self.surrogate["path"])
        if not path.is_file():
            raise ModelFileError(f"CLB surrogate {path} is missing; run attack.prepare(train_set) to "
                                 f"train it again (the poisoned set then changes)")
        if file_sha256(path) != self.surrogate["sha256"]:
            raise ModelFileError(f"CLB surrogate {path} differs from the one this attack recorded "
                                 f"(SHA-256 mismatch)")
        model, _ = load_model(path, map_location=device)
        return model.eval()

    # -- poisoning -----------------------------------------------------------------------
    def perturb(self, images: torch.Tensor, labels: torch.Tensor, device: str | torch.device = "cpu",
                batch_size: int = 256) -> torch.Tensor:
        """PGD images (uint8 grid, within ``eps`` of ``images``) against the surrogate, as uint8 N x C x H x W."""
        model = self.load_surrogate(device)
        for p in model.parameters():
            p.requires_grad_(False)
        # Whole grey levels within eps: rounding to the uint8 grid must not leave the ball.
        budget = math.floor(self.eps * 255 + 1e-6)
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            adv = pgd_linf(model, x, labels[i:i + batch_size].to(device), self.eps, self.pgd_step_size,
                           self.pgd_steps).cpu()
            x8 = torch.round(x.cpu() * 255)
            adv8 = torch.round(adv * 255)
            adv8 = torch.min(torch.max(adv8, x8 - budget), x8 + budget).clamp_(0, 255)
            out.append(adv8.to(torch.uint8))
        return torch.cat(out)

    def poison(self, dataset) -> RenderedPoisonedDataset:
        """Perturb ``poison_rate`` of the target-class samples (labels unchanged) and paste the trigger."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        chosen, _ = choose_poisoned(self, labels)
        if self.surrogate is None:
            self.prepare(dataset)
        clean = stack_clean(dataset, chosen)
        adv = self.perturb(clean, torch.from_numpy(labels[chosen]))
        row = np.full(len(labels), -1, dtype=np.int64)
        row[chosen] = np.arange(len(chosen))
        flags = np.zeros(len(labels), dtype=bool)
        flags[chosen] = True
        trigger = self.trigger

        def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
            return trigger.apply(adv[row[positions]].float().div_(255.0)).to(images.dtype)

        ds = RenderedPoisonedDataset(dataset, self.trigger, flags, labels.copy(), labels, n_classes, render)
        ds.perturbed_images = adv
        return ds

    def _spec_args(self) -> dict:
        return {"eps": self.eps, "pgd_steps": self.pgd_steps, "pgd_step_size": self.pgd_step_size,
                "patch_size": self.patch_size, "corners": self.trigger.corners,
                "amplitude": self.trigger.amplitude, "surrogate_arch": self.surrogate_arch,
                "surrogate_width": self.surrogate_width, "surrogate_epochs": self.surrogate_epochs,
                "surrogate_lr": self.surrogate_lr, "surrogate_batch_size": self.surrogate_batch_size,
                "surrogate": self.surrogate}


ATTACKS.register(CLB.name, CLB)
