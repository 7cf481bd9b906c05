"""Input-aware Dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a sample-specific trigger.

Two small encoder-decoder generators map an image ``x`` to a pattern ``p(x)`` (colours
in [0, 1]) and a mask ``m(x)`` (values near 0 or 1); the triggered image is
``x + (p(x) - x) * m(x)``. The paper trains them with the classifier:

1. the mask generator alone, with the diversity loss
   ``mean(rms(x1 - x2) / rms(m(x1) - m(x2)))`` (different images get different masks)
   plus ``lambda_norm * mean(relu(mean(m) - mask_density))`` (small masks; the hinge is
   on each image's mean mask value, where the official code applies it per pixel: per
   image, the masks settle at the target density within the few epochs run here);
2. the pattern generator jointly with the classifier, mask frozen: in each batch a share
   ``p_attack`` of the images carries its own trigger and the target label
   (``y -> target``, or ``y -> (y + 1) % C`` for all2all), a share ``p_cross`` carries the
   trigger of ANOTHER image and keeps its true label (the cross-trigger mode that makes a
   trigger useless on other images), the rest is clean; loss = cross-entropy +
   ``lambda_div`` x the diversity loss on the patterns.

Simplification (two stages, documented): :meth:`prepare` runs 1 and 2 with a small
surrogate CNN as the classifier, then freezes the generators; the victim model is then
trained normally on the poisoned set, in which ``poison_rate`` of the eligible images
carry their own trigger (relabelled) and ``cross_rate`` of the remaining images carry
another image's trigger with their label kept (``cross_flag``). No augmentation during
generator training. Paper defaults (official code): lambda_div 1, lambda_norm 100,
mask_density 0.032, p_attack = p_cross = 0.1, Adam lr 0.01 (betas 0.5, 0.9) for the
generators, SGD lr 0.01 for the classifier, 25 mask epochs. The CPU-scale defaults here
are ``mask_epochs=5`` and ``gen_epochs=10`` with width-16 networks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AttackError, ConfigError
from .base import ATTACKS, stack_clean
from .generative import (ConvAutoencoder, GeneratedPoisonedDataset, GeneratorAttack, ImageSource, SmallCNN,
                         nonneg_int, real_in, rms_distance)


def _mask_of(raw: torch.Tensor) -> torch.Tensor:
    # The net's output is squashed to (0, 1) (0.5 at initialisation, where gradients flow),
    # then a steep sigmoid centred at 0.5 pushes the mask to (almost) binary values.
    return torch.sigmoid(40.0 * (torch.sigmoid(raw) - 0.5))


class Dynamic(GeneratorAttack):
    """Input-aware Dynamic attack; registry aliases ``dyn-one`` (all2one) and ``dyn-all`` (all2all).

    Options: ``cross_rate`` (share of the training set given cross triggers, default 0.1),
    ``p_attack`` / ``p_cross`` (per-batch shares in generator training, 0.1 / 0.1),
    ``lambda_div`` (1.0), ``lambda_norm`` (100), ``mask_density`` (0.032),
    ``mask_epochs`` (5), ``gen_epochs`` (10), ``gen_width`` (generators, 16),
    ``clf_width`` (surrogate classifier, 16), ``gen_lr`` (0.01), ``clf_lr`` (0.01),
    ``gen_batch_size`` (128). See the module docstring for the training procedure.
    """

    name = "dynamic"
    summary = "per-image generated pattern and mask"
    label_dependent = True
    generator_format = 2  # 2: the mask stage keeps its last healthy epoch (format 1 could collapse)

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, cross_rate: float = 0.1,
                 p_attack: float = 0.1, p_cross: float = 0.1, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, mask_density: float = 0.032, mask_epochs: int = 5,
                 gen_epochs: int = 10, gen_width: int = 16, clf_width: int = 16, gen_lr: float = 0.01,
                 clf_lr: float = 0.01, gen_batch_size: int = 128, image_shape=None, generator=None,
                 cache_dir: str | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes, image_shape, generator, cache_dir)
        self.cross_rate = real_in("cross_rate", cross_rate, 0.0, 1.0)
        self.p_attack = real_in("p_attack", p_attack, 0.0, 1.0, low_open=True)
        self.p_cross = real_in("p_cross", p_cross, 0.0, 1.0)
        if self.p_attack + self.p_cross > 1.0:
            raise ConfigError(f"p_attack + p_cross must be at most 1, got {self.p_attack:g} + {self.p_cross:g}")
        self.lambda_div = real_in("lambda_div", lambda_div, 0.0, 1e6)
        self.lambda_norm = real_in("lambda_norm", lambda_norm, 0.0, 1e6)
        self.mask_density = real_in("mask_density", mask_density, 0.0, 1.0, low_open=True)
        self.mask_epochs = nonneg_int("mask_epochs", mask_epochs)
        self._set_generator_options(gen_epochs, gen_width, gen_lr, gen_batch_size)
        self._set_surrogate_options(clf_width, clf_lr)
        self.finish_init()

    def generator_options(self) -> dict:
        # cross_rate only shapes the victim's training set, yet it is an option of the attack;
        # it stays out of the generator key (see generator_config).
        return {"cross_rate": self.cross_rate, "p_attack": self.p_attack, "p_cross": self.p_cross,
                "lambda_div": self.lambda_div, "lambda_norm": self.lambda_norm,
                "mask_density": self.mask_density, "mask_epochs": self.mask_epochs,
                "gen_epochs": self.gen_epochs, "gen_width": self.gen_width, "clf_width": self.clf_width,
                "gen_lr": self.gen_lr, "clf_lr": self.clf_lr, "gen_batch_size": self.gen_batch_size}

    def generator_config(self) -> dict:
        cfg = super().generator_config()
        cfg["options"] = {k: v for k, v in cfg["options"].items() if k != "cross_rate"}
        return cfg

    # -- networks ---------------------------------------------------------------------------
    def build_nets(self, channels: int, num_classes: int) -> nn.Module:
        return nn.ModuleDict({"pattern": ConvAutoencoder(channels, channels, self.gen_width),
                              "mask": ConvAutoencoder(channels, 1, self.gen_width)})

    @staticmethod
    def _parts(nets: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(nets["pattern"](x)), _mask_of(nets["mask"](x))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        p, m = self._parts(self.nets, x)
        return x + (p - x) * m

    def pattern_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pattern (N x C x H x W) and mask (N x 1 x H x W) the generators give ``x``."""
        self._require_prepared("pattern")
        dev = next(self.nets.parameters()).device
        with torch.no_grad():
            p, m = self._parts(self.nets, x.to(dev))
        return p.to(x.device), m.to(x.device)

    def cross(self, x: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """``x`` carrying the trigger (pattern and mask) of ``partner`` (same batch shape)."""
        p, m = self.pattern_and_mask(partner)
        return (x + (p - x) * m).clamp_(0.0, 1.0)

    # -- training (stage 1) -------------------------------------------------------------------
    def _mask_is_healthy(self, mask_net: nn.Module, probe: torch.Tensor) -> bool:
        """At least 90% of the probe images get a mask of a quarter of ``mask_density`` or more."""
        with torch.no_grad():
            density = _mask_of(mask_net(probe)).flatten(1).mean(1)
        return bool((density >= self.mask_density / 4).float().mean() >= 0.9)

    def fit(self, nets: nn.Module, source: ImageSource, device: torch.device, progress: bool) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        bs = self.gen_batch_size
        mask_net, pattern_net = nets["mask"], nets["pattern"]
        opt_m = torch.optim.Adam(mask_net.parameters(), self.gen_lr, betas=(0.5, 0.9))
        probe = source.probe(device)
        healthy: dict | None = None
        for _ in tqdm(range(self.mask_epochs), desc="dynamic mask generator", disable=not progress, leave=False):
            for i1, i2 in zip(source.batches(bs, gen), source.batches(bs, gen)):
                k = min(len(i1), len(i2))
                x1, x2 = source.batch(i1[:k], device), source.batch(i2[:k], device)
                m1, m2 = _mask_of(mask_net(x1)), _mask_of(mask_net(x2))
                div = (rms_distance(x1, x2) / (rms_distance(m1, m2) + 1e-7)).mean()
                norm = F.relu(m1.flatten(1).mean(1) - self.mask_density).mean()
                loss = self.lambda_norm * norm + self.lambda_div * div
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
            if self._mask_is_healthy(mask_net, probe):
                healthy = {k: v.detach().clone() for k, v in mask_net.state_dict().items()}
        if self.mask_epochs > 0:
            # The norm term can drive every mask to zero, where the steep squashing leaves no
            # gradient to recover (seen on CIFAR-10 at 45,000 images): keep the last epoch
            # whose masks still cover each image, or stop with a clear error.
            if healthy is None:
                raise AttackError(f"dynamic: the mask generator collapsed in every one of {self.mask_epochs} "
                                  f"epochs (masks far below mask_density={self.mask_density:g} on most "
                                  f"images); try another gen_lr, lambda_norm or seed")
            mask_net.load_state_dict(healthy)
        mask_net.requires_grad_(False).eval()

        clf = SmallCNN(self.image_shape[0], self.num_classes, self.clf_width).to(device)
        opt_c = torch.optim.SGD(clf.parameters(), self.clf_lr, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(pattern_net.parameters(), self.gen_lr, betas=(0.5, 0.9))
        for _ in tqdm(range(self.gen_epochs), desc="dynamic pattern generator", disable=not progress, leave=False):
            for i1, i2 in zip(source.batches(bs, gen), source.batches(bs, gen)):
                k = min(len(i1), len(i2))
                x1, x2 = source.batch(i1[:k], device), source.batch(i2[:k], device)
                y1 = source.labels[i1[:k]].to(device)
                nb = max(1, int(round(self.p_attack * k)))
                nc = min(int(round(self.p_cross * k)), k - nb)
                p1, m1 = torch.sigmoid(pattern_net(x1[:nb])), _mask_of(mask_net(x1[:nb]))
                bd = x1[:nb] + (p1 - x1[:nb]) * m1
                p2, m2 = torch.sigmoid(pattern_net(x2[:max(nb, nc)])), _mask_of(mask_net(x2[:max(nb, nc)]))
                xc = x1[nb:nb + nc]
                cr = xc + (p2[:nc] - xc) * m2[:nc]
                inputs = torch.cat([bd, cr, x1[nb + nc:]])
                targets = torch.cat([torch.from_numpy(self.targets_for(y1[:nb].cpu().numpy())).to(device), y1[nb:]])
                ce = F.cross_entropy(clf(inputs), targets)
                # diversity of the patterns of two different image sets (x1[:nb] vs x2[:nb])
                div = (rms_distance(x1[:nb], x2[:nb]) / (rms_distance(p1, p2[:nb]) + 1e-7)).mean()
                loss = ce + self.lambda_div * div
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()

    # -- victim data (stage 2) ------------------------------------------------------------------
    def poison(self, dataset) -> GeneratedPoisonedDataset:
        """Poison ``dataset``: own triggers on ``poison_rate`` of the eligible images (relabelled),
        other images' triggers on ``cross_rate`` of the rest (labels kept, ``cross_flag``)."""
        poisoned = super().poison(dataset)
        if self.cross_rate == 0:
            return poisoned
        free = np.flatnonzero(~poisoned.poison_flag)
        k = min(len(free), int(round(self.cross_rate * len(poisoned))))
        if k == 0 or len(poisoned) < 2:
            return poisoned
        rng = np.random.default_rng([self.seed, 1])
        rows = np.sort(rng.choice(free, size=k, replace=False))
        partners = (rows + rng.integers(1, len(poisoned), size=k)) % len(poisoned)  # never the image itself
        cross_imgs = [self.cross(stack_clean(dataset, rows[s:s + 256]), stack_clean(dataset, partners[s:s + 256]))
                      for s in range(0, k, 256)]
        all_rows = np.concatenate([poisoned.modified_index, rows])
        all_imgs = torch.cat([poisoned._images, *cross_imgs])
        order = np.argsort(all_rows, kind="stable")
        flag = np.zeros(len(poisoned), dtype=bool)
        flag[rows] = True
        partner = np.full(len(poisoned), -1, dtype=np.int64)
        partner[rows] = partners
        return GeneratedPoisonedDataset(poisoned, all_rows[order], all_imgs[torch.from_numpy(order)], flag, partner)


ATTACKS.register(Dynamic.name, Dynamic)
ATTACKS.alias("dyn-one", "dynamic", mode="all2one")
ATTACKS.alias("dyn-all", "dynamic", mode="all2all")
