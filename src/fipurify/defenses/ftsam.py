"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023, "Enhancing
Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization").

Every weight is fine-tuned on the clean set with SAM: each update takes the gradient at the
worst-case point of a rho-neighbourhood of the weights. The authors observe that this shrinks
the large norms of backdoor-related neurons, which plain fine-tuning leaves nearly untouched.

Defaults: the FIP paper's appendix A.3.3 (100 epochs, lr 0.01, momentum 0.9, weight decay
1e-4, batch 128) and the FT-SAM authors' code in BackdoorBench (adaptive SAM, i.e. ASAM,
with rho = 2.0, label smoothing 0.1, cosine learning-rate schedule).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..tasks import Classification
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense
from .loop import finetune, make_optimizer
from .sam import SAM


@dataclass
class FTSAMConfig(BaselineConfig):
    """FT-SAM settings (see the module docstring for where each default comes from)."""
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = ()
    schedule: str = "cosine"
    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1

    def validate(self) -> "FTSAMConfig":
        super().validate()
        if not self.rho > 0:
            raise ConfigError(f"rho (the SAM neighbourhood radius) must be positive, got {self.rho}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        return self


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm keeps normalising with batch statistics but stops updating its running ones
    (SAM's second pass sees the same batch again and must not count it twice)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


class FTSAM(BaselineDefense):
    """FT-SAM: fine-tune all weights on clean data with (adaptive) sharpness-aware minimisation."""

    name = "ft-sam"
    summary = {"ft-sam": "fine-tuning with sharpness-aware minimisation",
               "ft-sam-bb": "FT-SAM as BackdoorBench runs it"}
    config_class = FTSAMConfig

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: FTSAMConfig = self.config
        task = self.task
        classification = isinstance(task, Classification)
        if cfg.label_smoothing > 0 and not classification:
            raise ConfigError(f"label_smoothing smooths class labels and needs a classification task, not "
                              f"{task.name}; set label_smoothing=0")
        t_start = time.perf_counter()
        params = list(model.parameters())
        base = make_optimizer(params, cfg)
        sam = SAM(params, base, rho=cfg.rho, adaptive=cfg.adaptive)

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if not classification:  # the task's own loss
                return task.loss(m, x, y)
            return F.cross_entropy(task.forward(m, x, y), y, label_smoothing=cfg.label_smoothing)

        def sam_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            loss = loss_fn(m, x, y)
            sam.zero_grad()
            loss.backward()
            sam.first_step()
            with frozen_bn_stats(m):
                sharp = loss_fn(m, x, y)
            sam.zero_grad()
            sharp.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            sam.second_step()
            return {"ce": loss, "sam_ce": sharp}

        setup_s = time.perf_counter() - t_start
        history = finetune(model, params, train_set, cfg, holdout=holdout, optimizer=base, step_fn=sam_step,
                           scheduler=self.scheduler(), progress=progress, callback=callback, desc=self.name,
                           task=task)
        return Step(model.eval(), history, sum(p.numel() for p in params), {"setup": setup_s})


# baselines keep their own papers' schedules (a dataset preset holds FIP's)
DEFENSES.register("ft-sam", FTSAM, **FTSAM.paper_schedule())
# FT-SAM as BackdoorBench runs it (defense/ft-sam.py, config/defense/ft-sam/cifar10.yaml, with 5% clean data
# there); "ft-sam" is the FIP paper's A.3.3 setting
DEFENSES.register("ft-sam-bb", FTSAM, **{**FTSAM.paper_schedule(), "epochs": 100, "lr": 0.01, "momentum": 0.9,
                                         "weight_decay": 5e-4, "batch_size": 256, "schedule": "cosine",
                                         "milestones": (), "rho": 2.0, "adaptive": True, "label_smoothing": 0.1,
                                         "augment": True, "flip": True})
