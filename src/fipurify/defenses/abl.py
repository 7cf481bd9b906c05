"""ABL: Anti-Backdoor Learning (Li et al., NeurIPS 2021, "Anti-Backdoor Learning: Training
Clean Models on Poisoned Data").

Three phases, all through the shared loop:

1. *Isolation* (``isolation_epochs``, paper T_te = 20): train from scratch with the local
   gradient ascent (LGA) loss ``sign(CE - gamma) * CE``: the batch loss is held near
   ``gamma`` (0.5), so the clean samples stay hard while the backdoor samples, learned
   much faster, reach the lowest losses. The ``isolation_ratio`` (1%) share of samples
   with the lowest loss is isolated as likely poisoned.
2. *Continued training* (``finetune_epochs``, 60, lr x0.1 at epoch 40) with plain CE on the
   remaining samples.
3. *Unlearning* (``unlearn_epochs``) by gradient ascent (``-CE``) on the isolated samples
   with a small learning rate (5e-4), no augmentation.

Defaults follow the paper and the authors' code (batch 64, SGD lr 0.1, momentum 0.9,
weight decay 1e-4, Nesterov). The authors' script unlearns for 5 epochs; we default to
20 so that the phases add up to the paper's 100 epochs (set ``unlearn_epochs=5`` for the
script). Their script sorts losses in *descending* order when isolating; the paper
isolates the *lowest*-loss samples, which is what we do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError
from ..tasks import Task
from .base import EpochCallback
from .loop import finetune
from .training_time import (TRAINING_DEFENSES, TrainingDefense, TrainingDefenseConfig, check_count, per_sample_loss, sgd, tag)


@dataclass
class ABLConfig(TrainingDefenseConfig):
    """ABL settings; defaults are the paper's CIFAR-10 ones (see the module docstring)."""
    isolation_epochs: int = 20
    isolation_ratio: float = 0.01
    lga_gamma: float = 0.5
    finetune_epochs: int = 60
    finetune_milestones: tuple[int, ...] = (40,)
    unlearn_epochs: int = 20
    unlearn_lr: float = 5e-4

    def validate(self) -> "ABLConfig":
        super().validate()
        check_count("isolation_epochs", self.isolation_epochs, 1)
        check_count("finetune_epochs", self.finetune_epochs, 0)
        check_count("unlearn_epochs", self.unlearn_epochs, 0)
        if not 0 < self.isolation_ratio < 0.5:
            raise ConfigError(f"isolation_ratio must lie in (0, 0.5), got {self.isolation_ratio}")
        if not self.lga_gamma > 0:
            raise ConfigError(f"lga_gamma must be positive, got {self.lga_gamma}")
        if not self.unlearn_lr > 0:
            raise ConfigError(f"unlearn_lr must be positive, got {self.unlearn_lr}")
        if any(m < 1 for m in self.finetune_milestones):
            raise ConfigError("finetune_milestones must be epochs >= 1")
        return self


class ABL(TrainingDefense):
    """Anti-Backdoor Learning (Li et al., NeurIPS 2021).

    Trains with a local-gradient-ascent loss that keeps clean samples at a loss of about
    ``lga_gamma``, isolates the lowest-loss 1% (likely poisoned) and continues on the rest.
    It then unlearns the isolated samples by gradient ascent, breaking the trigger-target link.
    """

    name = "abl"
    config_class = ABLConfig

    def train(self, model: nn.Module, poisoned_train_set: Dataset | DataLoader, *, task: Task | str | None = None,
              progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        cfg: ABLConfig = self.config
        t_start = time.perf_counter()
        data = self._prepare(model, poisoned_train_set, task)
        task = self.task
        params = list(model.parameters())
        history: list[dict[str, Any]] = []
        seconds: dict[str, float] = {}

        def lga(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            ce = task.loss(m, x, y)
            # sign(CE - gamma) * CE: descend above gamma, ascend below it (the flood level)
            return {"lga": torch.sign(ce.detach() - cfg.lga_gamma) * ce}

        loop_cfg = cfg.phase(cfg.isolation_epochs)
        history += finetune(model, params, data, loop_cfg, optimizer=sgd(params, loop_cfg), progress=progress,
                            callback=tag("isolation", callback), desc="abl: isolation", objective=lga, task=task)
        seconds["isolation"] = time.perf_counter() - t_start

        t0 = time.perf_counter()
        losses = per_sample_loss(model, data, task=task)
        n_iso = max(1, int(round(cfg.isolation_ratio * len(data))))
        order = torch.argsort(losses, stable=True)
        isolated = np.sort(order[:n_iso].numpy())
        rest = np.sort(order[n_iso:].numpy())
        seconds["isolate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if cfg.finetune_epochs > 0 and len(rest):
            loop_cfg = cfg.phase(cfg.finetune_epochs, milestones=cfg.finetune_milestones)
            history += finetune(model, params, Subset(data, rest.tolist()), loop_cfg, optimizer=sgd(params, loop_cfg),
                                progress=progress, callback=tag("finetune", callback), desc="abl: training",
                                task=task)
        seconds["finetune"] = time.perf_counter() - t0

        def ascent(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return {"neg_ce": -task.loss(m, x, y)}

        t0 = time.perf_counter()
        if cfg.unlearn_epochs > 0:
            loop_cfg = cfg.phase(cfg.unlearn_epochs, lr=cfg.unlearn_lr, augment=False)
            history += finetune(model, params, Subset(data, isolated.tolist()), loop_cfg,
                                optimizer=sgd(params, loop_cfg), progress=progress,
                                callback=tag("unlearn", callback), desc="abl: unlearning", objective=ascent,
                                task=task)
        seconds["unlearn"] = time.perf_counter() - t0

        total = time.perf_counter() - t_start
        self.make_report(data, sum(p.numel() for p in params),
                         {"total": total, "setup": seconds["isolate"], "train": total - seconds["isolate"], **seconds},
                         history, n_isolated=int(n_iso), isolated_indices=isolated.tolist(),
                         isolated_loss_max=float(losses[isolated].max()))
        flags = getattr(data, "poison_flag", None)
        if flags is not None:  # diagnostic only (ground truth the defense never uses)
            self.report["isolated_poison_precision"] = float(np.asarray(flags)[isolated].mean())
            self.report["poison_rate"] = float(np.asarray(flags).mean())
        return model.eval()


TRAINING_DEFENSES.register("abl", ABL)
