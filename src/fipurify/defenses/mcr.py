"""MCR, Mode Connectivity Repair (Zhao et al., ICLR 2020, "Bridging Mode Connectivity in Loss
Landscapes and Adversarial Robustness").

The backdoored model and a copy fine-tuned on the clean set are joined by a quadratic Bezier
curve theta(t) = (1-t)^2 theta_0 + 2t(1-t) theta_mid + t^2 theta_1 whose middle control point is
trained on clean data (a uniformly random t per batch); a model part-way along the learned
low-loss path keeps clean accuracy but loses the backdoor, and is returned.

Choice of t: fixed (``t``, default 0.4, measured from the backdoored end), in the 0.3-0.4
range where the paper's curves show the attack gone while clean accuracy is still high; t is
not tuned on clean accuracy, since clean accuracy alone favours the backdoored end. The
report also lists clean hold-out accuracy along the curve. Batch-norm statistics are
re-estimated on the clean training split at the returned point (as in the paper's code).
Defaults: curve training as the authors' code (100 epochs, lr 0.01, momentum 0.9, weight
decay 1e-4 on the control point, batch 128, flat-then-linear schedule, control point started
at the end points' mean); end-point fine-tuning as BackdoorBench (100 epochs, lr 0.01,
weight decay 5e-4, cosine).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step, labelled
from .baseline_common import BaselineConfig, BaselineDefense, copy_of, recompute_bn_stats
from .loop import finetune


@dataclass
class MCRConfig(BaselineConfig):
    """MCR settings: ``epochs``/``lr``/``weight_decay``/``schedule`` train the curve; ``ft_*``
    make the fine-tuned end point; ``t`` is the returned point; ``scan`` also measures clean
    hold-out accuracy at t = 0, 0.1, ..., 1 for the report."""
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = ()
    schedule: str = "flat-linear"
    ft_epochs: int = 100
    ft_lr: float = 0.01
    ft_weight_decay: float = 5e-4
    t: float = 0.4
    scan: bool = True

    def validate(self) -> "MCRConfig":
        super().validate()
        if not 0 < self.t < 1:
            raise ConfigError(f"t must lie strictly between 0 (backdoored end) and 1 (fine-tuned end), got {self.t}")
        if self.ft_epochs < 1 or not self.ft_lr > 0 or self.ft_weight_decay < 0:
            raise ConfigError("ft_epochs must be >= 1, ft_lr > 0 and ft_weight_decay >= 0")
        return self


class BezierCurve(nn.Module):
    """A quadratic Bezier curve between two models of one architecture; only the middle
    control point is a parameter. In training mode each forward pass runs the model at a
    uniformly random t; in eval mode at ``self.t``."""

    def __init__(self, start: nn.Module, end: nn.Module, seed: int = 0):
        super().__init__()
        s_names = [n for n, _ in start.named_parameters()]
        if s_names != [n for n, _ in end.named_parameters()]:
            raise ConfigError("the curve's end points must have the same architecture")
        self.arch = copy.deepcopy(start)  # structure and (BN) buffers; its own parameters are unused
        for p in self.arch.parameters():
            p.requires_grad_(False)
        self.names = s_names
        ends = dict(end.named_parameters())
        self.start = [p.detach().clone() for p in start.parameters()]
        # curve training moves the arch's BN statistics; points start from the start model's
        self.start_buffers = {n: b.detach().clone() for n, b in start.named_buffers()}
        self.end = [ends[n].detach().clone() for n in s_names]
        self.mid = nn.ParameterList([nn.Parameter((a + b) / 2) for a, b in zip(self.start, self.end)])
        self.t = 0.5
        self.generator = torch.Generator().manual_seed(seed)

    def weights(self, t: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters at ``t``: exactly the start at t = 0 and the end at t = 1."""
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
        return {n: a * s + b * m + c * e for n, s, m, e in zip(self.names, self.start, self.mid, self.end)}

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The model at a random t (training) or ``self.t`` (eval) on whatever the task feeds it
        (``x``; a translation model's source and shifted target)."""
        t = float(torch.rand((), generator=self.generator)) if self.training else self.t
        return functional_call(self.arch, self.weights(t), args, kwargs)

    @torch.no_grad()
    def point(self, t: float) -> nn.Module:
        """A plain model at ``t`` (buffers, e.g. BN statistics, copied from the start model)."""
        model = copy.deepcopy(self.arch)
        params = dict(model.named_parameters())
        for n, w in self.weights(t).items():
            params[n].copy_(w)
            params[n].requires_grad_(True)
        buffers = dict(model.named_buffers())
        for n, b in self.start_buffers.items():
            buffers[n].copy_(b)
        return model.eval()


class MCR(BaselineDefense):
    """Mode Connectivity Repair: a model part-way along a learned curve to a fine-tuned copy."""

    name = "mcr"
    config_class = MCRConfig

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: MCRConfig = self.config
        task = self.task
        key = "holdout_acc" if task.metric == "accuracy" else f"holdout_{task.metric}"
        t_start = time.perf_counter()

        # 1. the second end point: the backdoored model fine-tuned on the clean set (``model``, the
        # template's copy, stays the backdoored end point)
        end = copy_of(model)
        ft_cfg = replace(cfg, epochs=cfg.ft_epochs, lr=cfg.ft_lr, weight_decay=cfg.ft_weight_decay)
        ft_hist = finetune(end, list(end.parameters()), train_set, ft_cfg, holdout=holdout,
                           scheduler=self.scheduler(cfg.ft_epochs, "cosine"), progress=progress,
                           callback=labelled(callback, "stage", "endpoint"), desc=f"{self.name} end point",
                           task=task)
        endpoint_s = time.perf_counter() - t_start

        # 2. the curve's middle control point
        curve = BezierCurve(model, end, seed=cfg.seed)
        curve_hist = finetune(curve, list(curve.mid), train_set, cfg, scheduler=self.scheduler(), progress=progress,
                              callback=labelled(callback, "stage", "curve"), desc=f"{self.name} curve", task=task)

        # 3. the returned point, with BN statistics of its own
        t0 = time.perf_counter()
        scan = []
        if cfg.scan and holdout is not None:
            for i in range(11):
                m = curve.point(i / 10)
                recompute_bn_stats(m, train_set, cfg.batch_size, task)
                scan.append({"t": i / 10, key: task.score(m, holdout)})
        purified = curve.point(cfg.t)
        bn_recomputed = recompute_bn_stats(purified, train_set, cfg.batch_size, task)
        picked_acc = task.score(purified, holdout) if holdout is not None else None
        history = ft_hist + curve_hist
        return Step(purified.eval(), history, sum(p.numel() for p in curve.mid),
                    {"setup": 0.0, "endpoint": endpoint_s, "select": time.perf_counter() - t0},
                    {"t": cfg.t, f"{key}_at_t": picked_acc, "curve_scan": scan, "bn_recomputed": bn_recomputed})


DEFENSES.register("mcr", MCR, **MCR.paper_schedule())
