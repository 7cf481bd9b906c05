"""Post-purification robustness: does a short fine-tune on a few poisoned images bring the backdoor back?

Min et al. (NeurIPS 2024, "Towards stable backdoor purification" / "superficial safety") found that
many purified models relearn their backdoor almost at once: fine-tune the purified model for a few
epochs on its clean images plus a handful of poisoned ones, and the ASR returns to near its
pre-defense level, while the same fine-tune barely teaches a truly clean model the backdoor. A
purifier that really removed the backdoor leaves a model that stays clean-ish under this
*retuning attack*.

:func:`retuning_attack` runs it: ``k = max(1, round(poison_fraction * n))`` of the ``n`` clean
images (seeded choice among those the attack can poison, i.e. not already of the target class)
get the attack's trigger and its target label (the attack's own test-time poisoning, for
clean-label attacks too: the reactivation signal is "trigger -> target"), and the model is
fine-tuned on the ``n + k`` images with plain SGD (constant lr, momentum 0.9, weight decay 5e-4,
BatchNorm in train mode, no augmentation). The protocol's setting (docs/default-purifier-protocol.md):
5 epochs, lr 0.01, 1 % poisoned. :func:`retuned_metrics` measures ACC / ASR after it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from .errors import ConfigError, DataError


@dataclass
class RetuneConfig:
    """Settings of the retuning attack (the protocol's defaults)."""
    epochs: int = 5
    lr: float = 0.01
    poison_fraction: float = 0.01
    batch_size: int = 128
    seed: int = 0

    def validate(self) -> "RetuneConfig":
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"retune epochs must be an integer >= 1, got {self.epochs!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"retune lr must be > 0, got {self.lr}")
        if not 0 < float(self.poison_fraction) <= 1:
            raise ConfigError(f"retune poison_fraction must be in (0, 1], got {self.poison_fraction}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"retune batch_size must be an integer >= 1, got {self.batch_size!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RetuneConfig":
        d = dict(d or {})
        unknown = set(d) - {"epochs", "lr", "poison_fraction", "batch_size", "seed"}
        if unknown:
            raise ConfigError(f"unknown retune option(s) {', '.join(sorted(unknown))}; "
                              "known: epochs, lr, poison_fraction, batch_size, seed")
        return cls(**d).validate()


def poisoned_subset(clean: Dataset, attack, fraction: float, seed: int) -> Dataset:
    """``max(1, round(fraction * len(clean)))`` of ``clean``'s poisonable images, triggered and relabelled
    to the attack's target (seeded choice). DataError when none can be poisoned."""
    triggered = attack.backdoor_test_set(clean)
    if len(triggered) == 0:
        raise DataError("the retuning attack needs clean images outside the target class; the clean set has none")
    k = min(len(triggered), max(1, int(round(fraction * len(clean)))))
    idx = np.sort(np.random.default_rng(seed).choice(len(triggered), size=k, replace=False))
    return Subset(triggered, idx.tolist())


def retuning_attack(model: nn.Module, clean: Dataset, attack, config: RetuneConfig | None = None) -> nn.Module:
    """A copy of ``model`` fine-tuned on ``clean`` plus a few poisoned images (see the module docstring);
    ``model`` itself is left unchanged."""
    cfg = (config or RetuneConfig()).validate()
    return _fine_tune(model, clean, poisoned_subset(clean, attack, cfg.poison_fraction, cfg.seed), cfg)


def retuned_metrics(model: nn.Module, clean: Dataset, attack, test: Dataset,
                    config: RetuneConfig | None = None) -> dict[str, Any]:
    """ACC / ASR of ``model`` after :func:`retuning_attack`, on ``test`` and its triggered copy, and the settings."""
    from .metrics import evaluate

    cfg = (config or RetuneConfig()).validate()
    poisoned = poisoned_subset(clean, attack, cfg.poison_fraction, cfg.seed)
    m = evaluate(_fine_tune(model, clean, poisoned, cfg), test, attack.backdoor_test_set(test))
    out = {"acc": m["acc"], "asr": m.get("asr"), "n_poison": len(poisoned), "n_clean": len(clean),
           "epochs": cfg.epochs, "lr": cfg.lr, "poison_fraction": cfg.poison_fraction}
    if out["asr"] is not None and not math.isfinite(out["asr"]):
        out["asr"] = None
    return out


def _fine_tune(model: nn.Module, clean: Dataset, poisoned: Dataset, cfg: RetuneConfig) -> nn.Module:
    """The retuning itself: a copy of ``model`` trained on ``clean + poisoned`` (validated ``cfg``), in eval mode."""
    from .training import TrainConfig, train_model

    retuned = copy.deepcopy(model)
    train_model(retuned, ConcatDataset([clean, poisoned]),
                TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, schedule="constant",
                            augment=False, seed=cfg.seed, eval_every=cfg.epochs),
                progress=False, log=None)
    return retuned.eval()
