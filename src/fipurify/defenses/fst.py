"""FST, Feature Shift Tuning (Min et al., NeurIPS 2023, "Towards Stable Backdoor Purification
through Feature Shift Tuning").

The linear head ``W`` (the last ``nn.Linear`` with one output per class) is re-initialised,
then every weight is fine-tuned on the clean set with

    CE(f(x), y) + alpha * <W, W_0>,     ||W||_F held at ||W_0||_F after every step,

where ``W_0`` is the backdoored model's head. The inner-product term pushes the new head away
from the compromised one (towards a negative cosine), which forces the feature extractor to
shift its features instead of keeping the backdoor features the old head relied on; fixing the
norm stops the term from being minimised by merely shrinking ``W``. The bias is re-initialised
too but neither penalised nor rescaled.

Defaults (the paper: "only 10 epochs"; the authors' code,
github.com/AISafety-HKUST/stable_backdoor_purification, ``fine_tune/ft.py --ft_mode fst`` and
its README's CIFAR-10 command): alpha 0.2 (the code's default; the README example passes 0.1),
10 epochs, SGD lr 0.01, momentum 0.9, no weight decay, batch 128,
cosine annealing over the epochs, model in train mode with the training augmentation
(random crop and flip), re-initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

Differences: the paper tunes on 2% of the training set (1,000 CIFAR-10 images; 5% for
CIFAR-100 and Tiny-ImageNet); fipurify gives every method the same clean set (500 images),
minus the hold-out. The head is found generically (see :func:`linear_head`) instead of by a
``--linear_name`` option, and its norm is also set to ``||W_0||`` right after the
re-initialisation (the authors' first step starts from the raw initial norm).

Variant ``fisher-fst`` (fipurify's, not the paper's; issue 19's candidate 3): FST plus FIP's clean-Fisher
anchor on every weight but the re-initialised head, ``eta_r / 2 * sum_i F_i (theta_i - theta0_i)^2`` with the
mean-normalised diagonal Fisher ``F`` of the backdoored model on the clean images (true labels), applied as an
exact proximal step after each SGD step (:func:`~fipurify.curvature.fisher.proximal_anchor_step`). The
shift term still forces the features to move, but the anchor lets them move only along directions the
clean data does not use: the backdoor's, if FIP's premise holds. ``eta_r = 0`` (FST's default) is plain FST.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..curvature.fisher import diag_fisher, fisher_anchor_loss, proximal_anchor_step, snapshot
from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense, model_device
from .loop import finetune, make_optimizer


@dataclass
class FSTConfig(BaselineConfig):
    """FST settings (see the module docstring for where each default comes from)."""
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    schedule: str = "cosine"
    alpha: float = 0.2
    #: Weight of the clean-Fisher anchor on every weight but the head (0 = plain FST; ``fisher-fst``).
    eta_r: float = 0.0

    def validate(self) -> "FSTConfig":
        super().validate()
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha (the head-shift weight) must be a finite number >= 0, got {self.alpha}")
        if not (self.eta_r >= 0 and math.isfinite(self.eta_r)):
            raise ConfigError(f"eta_r (the clean-Fisher anchor weight) must be a finite number >= 0, got {self.eta_r}")
        return self


def linear_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the classifier head: the last ``nn.Linear`` (in module order) with
    ``out_features == num_classes``. Raises ConfigError when there is none."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise ConfigError(f"no linear head found: the model has no nn.Linear with {num_classes} outputs "
                          f"(one per class), which FST re-initialises")
    return found[-1]


def head_cosine(weight: torch.Tensor, original: torch.Tensor) -> float:
    """Cosine between the flattened head weight and the original head weight."""
    return float(F.cosine_similarity(weight.detach().flatten(), original.flatten(), dim=0))


class FST(BaselineDefense):
    """Feature Shift Tuning (Min et al., NeurIPS 2023).

    Re-initialises the classifier head and fine-tunes the whole model while penalising the
    inner product between the new head and the backdoored one, at the original head's norm.
    Steering the head away from the compromised direction makes the features shift away from
    the backdoor features, which plain fine-tuning tends to keep at low poisoning rates.
    """

    name = "fst"
    summary = {"fst": "Feature Shift Tuning (Min et al., NeurIPS 2023)",
               "fisher-fst": "FST under FIP's clean-Fisher anchor on every weight but the head (eta_r = 1): the "
                             "features may shift only where the clean data does not look"}
    config_class = FSTConfig
    tasks = ("classification",)
    task_reason = "it re-initialises the linear classification head (one output per class)"

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: FSTConfig = self.config
        t_start = time.perf_counter()
        device = model_device(model)
        with torch.no_grad():
            num_classes = model(train_set[0][0][None].to(device)).shape[-1]
        head_name, head = linear_head(model, num_classes)
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        anchor = fdiag = None
        if cfg.eta_r > 0:  # the clean Fisher of the backdoored model, before the head is replaced
            fdiag = diag_fisher(model, DataLoader(train_set, batch_size=64), body, normalize="mean", task=self.task)
            anchor = snapshot(body)
        w0 = head.weight.detach().clone()
        norm0 = w0.norm()
        gen = torch.Generator().manual_seed(cfg.seed)
        bound = 1.0 / math.sqrt(head.in_features)
        with torch.no_grad():
            head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=gen))
            if head.bias is not None:
                head.bias.copy_(torch.empty(head.bias.shape).uniform_(-bound, bound, generator=gen))
            head.weight.mul_(norm0 / head.weight.norm())
        cos_init = head_cosine(head.weight, w0)
        params = list(model.parameters())
        opt = make_optimizer(params, cfg)

        def shift(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            terms = {"shift": cfg.alpha * (head.weight * w0).sum()}
            if anchor is not None:  # logged only; the anchor acts through the proximal step in hold_norm
                with torch.no_grad():
                    terms["anchor"] = 0.5 * cfg.eta_r * fisher_anchor_loss(body, anchor, fdiag)
            return terms

        def hold_norm(lr: float) -> None:
            with torch.no_grad():
                head.weight.mul_(norm0 / head.weight.norm())
                if anchor is not None:
                    proximal_anchor_step(body, anchor, fdiag, lr, cfg.eta_r)

        def annotate(rec: dict[str, Any], *args: Any) -> None:
            rec["head_cosine"] = head_cosine(head.weight, w0)
            if callback is not None:
                callback(rec, *args)
        annotate.needs_model = getattr(callback, "needs_model", False)  # type: ignore[attr-defined]

        setup_s = time.perf_counter() - t_start
        history = finetune(model, params, train_set, cfg, holdout=holdout, optimizer=opt, penalty=shift,
                           post_step=hold_norm, scheduler=self.scheduler(), progress=progress,
                           callback=annotate, desc=self.name, task=self.task)
        return Step(model.eval(), history, sum(p.numel() for p in params), {"setup": setup_s},
                    {"head": head_name, "head_norm": float(norm0), "head_cosine_init": cos_init,
                     "head_cosine": [r["head_cosine"] for r in history]})


DEFENSES.register("fst", FST, **FST.paper_schedule())
DEFENSES.register("fisher-fst", FST, eta_r=1.0, **FST.paper_schedule())
