"""RNP: Reconstructive Neuron Pruning (Li et al., ICML 2023, "Reconstructive Neuron Pruning
for Backdoor Defense").

1. *Unlearning*: gradient ascent on the clean set (all weights; SGD lr 0.01, momentum
   0.9, weight decay 5e-4, lr x0.1 at epochs 10 and 20, gradient norm clipped at 20) until
   the clean training accuracy of an epoch falls to ``clean_threshold`` (0.2) or below, or
   ``epochs`` (20) have run. Clean features collapse; backdoor features survive.
2. *Recovering*: on the unlearned model (weights frozen) learn one mask value in [0, 1]
   per batch-norm channel ("neuron"), initialised to 1 and multiplying the channel's
   output (i.e. its BN weight and bias), by minimising ``recover_alpha * CE`` on the same
   clean data (SGD lr 0.2, momentum 0.9, 20 epochs, masks clipped after every step).
   Recovering clean accuracy re-enables clean neurons; backdoor neurons keep small masks.
3. *Pruning*: in a copy of the ORIGINAL model, zero the BN weight and bias of every
   channel whose mask is ``<= prune_threshold`` (``prune_by="threshold"``), or of the
   ``prune_ratio`` share of channels with the smallest masks (``prune_by="ratio"``). The
   channel then outputs exactly 0, the same as mask 0.

Defaults follow the authors' code (FIP paper A.3.3: "RNP with learning rate 0.01"). Their
code evaluates a sweep of pruning thresholds on test data; a defense cannot, so we prune
at a fixed threshold, 0.2 by default. Their mask multiplies only the BN weight and pruning
zeroes only it; we mask and zero weight and bias so that a pruned neuron is really off.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step, labelled
from .loop import finetune


@dataclass
class RNPConfig(DefenseConfig):
    """RNP settings; the base fields configure the unlearning phase (see the module docstring)."""
    epochs: int = 20
    lr: float = 0.01
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (10, 20)
    grad_clip: float | None = 20.0
    clean_threshold: float = 0.2
    recover_epochs: int = 20
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    recover_alpha: float = 0.2
    prune_by: str = "threshold"
    prune_threshold: float = 0.2
    prune_ratio: float = 0.05

    def validate(self) -> "RNPConfig":
        super().validate()
        if not 0 <= self.clean_threshold <= 1:
            raise ConfigError(f"clean_threshold must lie in [0, 1], got {self.clean_threshold}")
        if isinstance(self.recover_epochs, bool) or not isinstance(self.recover_epochs, int) \
                or self.recover_epochs < 1:
            raise ConfigError(f"recover_epochs must be an integer >= 1, got {self.recover_epochs!r}")
        if not (self.recover_lr > 0 and self.recover_alpha > 0 and 0 <= self.recover_momentum < 1):
            raise ConfigError("recover_lr and recover_alpha must be positive and recover_momentum lie in [0, 1)")
        if self.prune_by not in ("threshold", "ratio"):
            raise ConfigError(f"prune_by must be 'threshold' or 'ratio', got {self.prune_by!r}")
        if not 0 <= self.prune_threshold < 1:
            raise ConfigError(f"prune_threshold must lie in [0, 1), got {self.prune_threshold}")
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"prune_ratio must lie in [0, 1), got {self.prune_ratio}")
        return self


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, module)`` of every affine batch-norm layer, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def _mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * mask.view(1, -1, *([1] * (output.dim() - 2)))
    return hook


class RNP(Defense):
    """Reconstructive Neuron Pruning (Li et al., ICML 2023).

    Unlearns the model by gradient ascent on clean data until clean accuracy collapses, then
    learns per-neuron (BN channel) masks that restore clean accuracy on the unlearned model;
    neurons left with small masks are the backdoor's and are pruned from the original model.
    """

    name = "rnp"
    config_class = RNPConfig
    tasks = ("classification",)
    task_reason = "its unlearning phase stops when the clean training accuracy (argmax of class scores) collapses"

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: RNPConfig = self.config
        if not batchnorm_layers(model):  # checked after the clean split, as before the template
            raise ConfigError("RNP prunes batch-norm channels, and this model has no batch-norm layer")
        t_start = time.perf_counter()

        # 1. unlearning: gradient ascent until the epoch's clean training accuracy <= threshold
        unlearned = copy.deepcopy(model).requires_grad_(True)
        counts = {"correct": 0, "seen": 0}
        task = self.task

        def ascent(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            out = task.forward(m, x, y)
            counts["correct"] += int((out.argmax(1) == y).sum())
            counts["seen"] += len(y)
            return {"neg_ce": -task.mean_loss(out, y)}

        def reached(rec: dict[str, Any]) -> bool:
            rec["phase"] = "unlearn"
            rec["train_acc"] = counts["correct"] / max(counts["seen"], 1)
            counts.update(correct=0, seen=0)
            return rec["train_acc"] <= cfg.clean_threshold

        params = list(unlearned.parameters())
        history = finetune(unlearned, params, train_set, cfg, holdout=holdout, progress=progress, callback=callback,
                           desc="rnp: unlearning", objective=ascent, stop=reached, task=task)
        unlearn_s = time.perf_counter() - t_start

        # 2. recovering: BN-channel masks on the frozen unlearned model
        t0 = time.perf_counter()
        unlearned.requires_grad_(False)
        layers = batchnorm_layers(unlearned)
        masks = [torch.ones(m.num_features, device=m.weight.device, requires_grad=True) for _, m in layers]
        handles = [m.register_forward_hook(_mask_hook(mk)) for (_, m), mk in zip(layers, masks)]

        def recover(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return {"ce": cfg.recover_alpha * task.loss(m, x, y)}

        @torch.no_grad()
        def clip(lr: float) -> None:
            for mk in masks:
                mk.clamp_(0.0, 1.0)

        rcfg = DefenseConfig(epochs=cfg.recover_epochs, lr=cfg.recover_lr, momentum=cfg.recover_momentum,
                             weight_decay=0.0, batch_size=cfg.batch_size, milestones=(), gamma=1.0,
                             augment=cfg.augment, flip=cfg.flip, holdout=cfg.holdout, min_clean=cfg.min_clean,
                             seed=cfg.seed, bn_mode="train", grad_clip=None).validate()
        try:
            history += finetune(unlearned, masks, train_set, rcfg, holdout=holdout, post_step=clip,
                                progress=progress, callback=labelled(callback, "phase", "recover"),
                                desc="rnp: recovering", objective=recover, task=task)
        finally:
            for hd in handles:
                hd.remove()
        recover_s = time.perf_counter() - t0

        # 3. pruning the original model
        values = torch.cat([mk.detach() for mk in masks])
        if cfg.prune_by == "threshold":
            prune = values <= cfg.prune_threshold
        else:
            prune = torch.zeros_like(values, dtype=torch.bool)
            prune[torch.argsort(values, stable=True)[:int(round(cfg.prune_ratio * len(values)))]] = True
        purified = model  # the template's copy, untouched until now
        pruned: list[dict[str, Any]] = []
        offset = 0
        with torch.no_grad():
            for (name, bn), mk in zip(batchnorm_layers(purified), masks):
                sel = prune[offset:offset + len(mk)]
                bn.weight[sel] = 0.0
                bn.bias[sel] = 0.0
                pruned += [{"layer": name, "index": int(i), "mask": float(mk[i])} for i in torch.nonzero(sel).flatten()]
                offset += len(mk)
        self.masks = {name: mk.detach().cpu() for (name, _), mk in zip(layers, masks)}
        n_unlearn = sum(1 for r in history if r.get("phase") == "unlearn")
        return Step(purified.eval(), history, sum(p.numel() for p in params),
                    {"setup": 0.0, "unlearn": unlearn_s, "recover": recover_s},
                    {"n_masks": int(values.numel()), "unlearn_epochs_run": n_unlearn,
                     "threshold_reached": bool(n_unlearn and history[n_unlearn - 1]["train_acc"]
                                               <= cfg.clean_threshold),
                     "n_pruned": len(pruned), "pruned": pruned})


DEFENSES.register("rnp", RNP, **RNP.paper_schedule())
