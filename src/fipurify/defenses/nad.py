"""NAD, Neural Attention Distillation (Li et al., ICLR 2021, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks").

A teacher is obtained by fine-tuning a copy of the backdoored model on the clean set; the
backdoored model (the student) is then fine-tuned with CE + beta * attention-distillation loss,
which pulls the student's attention maps of chosen intermediate layers (channel mean of
|activation|^p, L2-normalised) towards the teacher's, erasing the trigger's attention pattern.

Layers: ``layers`` (module names) or, by default, the outputs of the model's top-level
stages (its top-level ``nn.Sequential`` children: the residual stages of the ResNets, the
transformer blocks of the ViT, the conv body of the VGG); ``betas`` weight the last
``len(betas)`` of them. Defaults are the authors' code (github.com/bboylyg/NAD): beta 5000
on the last stage, p = 2, 20 epochs, lr 0.1 then 0.01 from epoch 3, batch 64, momentum 0.9,
Nesterov, weight decay 1e-4; teacher fine-tuned for 10 epochs the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step, labelled
from .baseline_common import BaselineConfig, BaselineDefense, copy_of
from .loop import finetune, make_optimizer


@dataclass
class NADConfig(BaselineConfig):
    """NAD settings (see the module docstring for where each default comes from)."""
    epochs: int = 20
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (2,)
    gamma: float = 0.1
    nesterov: bool = True
    teacher_epochs: int = 10
    betas: tuple[float, ...] = (5000.0,)
    layers: tuple[str, ...] = ()
    p: float = 2.0

    def validate(self) -> "NADConfig":
        self.betas = tuple(float(b) for b in self.betas)  # JSON lists from the CLI
        self.layers = tuple(str(n) for n in self.layers)
        super().validate()
        if self.teacher_epochs < 1:
            raise ConfigError(f"teacher_epochs must be >= 1, got {self.teacher_epochs}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise ConfigError(f"betas must be one or more weights >= 0, got {list(self.betas)}")
        if self.layers and len(self.layers) != len(self.betas):
            raise ConfigError(f"give one beta per layer: {len(self.layers)} layers but {len(self.betas)} betas")
        if not self.p > 0:
            raise ConfigError(f"p (the attention power) must be positive, got {self.p}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        return self


def top_level_stages(model: nn.Module) -> list[str]:
    """Names of the model's top-level ``nn.Sequential`` children, in order."""
    return [n for n, m in model.named_children() if isinstance(m, nn.Sequential) and len(m) > 0]


def attention_map(a: torch.Tensor, p: float) -> torch.Tensor:
    """Channel mean of ``|a|^p`` per position, L2-normalised per sample: ``(N, positions)``.

    ``a`` is ``(N, C, H, W)`` (conv features) or ``(N, tokens, C)`` (transformer blocks)."""
    if a.dim() == 4:
        am = a.abs().pow(p).mean(1).flatten(1)
    elif a.dim() == 3:
        am = a.abs().pow(p).mean(-1)
    else:
        raise ConfigError(f"attention distillation needs N x C x H x W or N x T x C activations, got {tuple(a.shape)}")
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Mean squared difference of the two normalised attention maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class _Capture:
    """Forward hooks keeping the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_m, _inp, out):
            self.out[name] = out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class NAD(BaselineDefense):
    """Neural Attention Distillation: fine-tune a teacher, then distil its attention into the student."""

    name = "nad"
    config_class = NADConfig

    def _layers(self, model: nn.Module) -> list[str]:
        cfg: NADConfig = self.config
        names = dict(model.named_modules())
        if cfg.layers:
            bad = [n for n in cfg.layers if n not in names or n == ""]
            if bad:
                raise ConfigError(f"the model has no layer(s) named {', '.join(map(repr, bad))}")
            return list(cfg.layers)
        stages = top_level_stages(model)
        if len(stages) < len(cfg.betas):
            raise ConfigError(f"{len(cfg.betas)} betas but the model has {len(stages)} top-level stages "
                              f"({', '.join(stages) or 'none'}); pass layers=[module names]")
        return stages[len(stages) - len(cfg.betas):]

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: NADConfig = self.config
        t_start = time.perf_counter()
        layers = self._layers(model)
        task = self.task

        # 1. the teacher: plain fine-tuning of a copy (``model`` itself becomes the student)
        teacher = copy_of(model)
        t_cfg = replace(cfg, epochs=cfg.teacher_epochs)
        t_params = list(teacher.parameters())
        t_hist = finetune(teacher, t_params, train_set, t_cfg, holdout=holdout,
                          optimizer=make_optimizer(t_params, cfg, nesterov=cfg.nesterov),
                          scheduler=self.scheduler(cfg.teacher_epochs), progress=progress,
                          callback=labelled(callback, "stage", "teacher"), desc=f"{self.name} teacher", task=task)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher_s = time.perf_counter() - t_start

        # 2. the student: CE + sum_l beta_l * AT loss against the teacher
        student = model
        s_cap, t_cap = _Capture(student, layers), _Capture(teacher, layers)

        def distill(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            if any(n not in s_cap.out or s_cap.out[n].shape[0] != x.shape[0] for n in layers):
                task.forward(m, x, y)  # the loop's forward of this batch was not captured (should not happen)
            with torch.no_grad():
                task.forward(teacher, x, y)
            at = sum(beta * attention_loss(s_cap.out[n], t_cap.out[n], cfg.p) for n, beta in zip(layers, cfg.betas))
            return {"at": at}

        s_params = list(student.parameters())
        try:
            s_hist = finetune(student, s_params, train_set, cfg, holdout=holdout, penalty=distill,
                              optimizer=make_optimizer(s_params, cfg, nesterov=cfg.nesterov),
                              scheduler=self.scheduler(), progress=progress,
                              callback=labelled(callback, "stage", "student"), desc=self.name, task=task)
        finally:
            s_cap.remove()
            t_cap.remove()
        history = t_hist + s_hist
        return Step(student.eval(), history, sum(p.numel() for p in s_params), {"setup": 0.0, "teacher": teacher_s},
                    {"layers": layers, "betas": list(cfg.betas)})


DEFENSES.register("nad", NAD, **NAD.paper_schedule())
