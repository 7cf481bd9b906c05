"""Pieces shared by the baseline defenses (FT-SAM, FP, NAD, MCR, CLP, ANP).

A baseline keeps its own paper's schedule: :meth:`BaselineDefense.paper_schedule` gives
the registry the fields a dataset preset would otherwise overwrite with FIP's schedule.
Also here: the LR schedules the baselines' papers use, batch-norm statistics
recomputation and a conv -> BN pairing walk. (The clean-set split and the report every
defense fills are :class:`~fipurify.defenses.base.Defense`'s.)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..tasks import Task
from .base import Defense, DefenseConfig, as_dataset

#: "multistep": MultiStepLR(milestones, gamma); "cosine": cosine annealing to 0 over the epochs;
#: "flat-linear": constant for the first half, linear decay to 1% at 90%, then 1% (Garipov et al.'s
#: curve-fitting schedule, used by MCR)
SCHEDULES = ("multistep", "cosine", "flat-linear")


@dataclass
class BaselineConfig(DefenseConfig):
    """Defense settings plus the LR schedule kind (see :data:`SCHEDULES`)."""
    schedule: str = "multistep"

    def validate(self) -> "BaselineConfig":
        super().validate()
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        return self


def make_scheduler(kind: str, epochs: int, milestones: tuple[int, ...] = (), gamma: float = 0.1
                   ) -> Callable[[torch.optim.Optimizer], Any]:
    """A factory ``optimizer -> per-epoch LR scheduler`` for the loop's ``scheduler`` hook."""
    if kind == "multistep":
        return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)
    if kind == "cosine":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    if kind == "flat-linear":
        def factor(done: int) -> float:  # done = epochs finished; the factor applies to epoch done + 1
            alpha = (done + 1) / epochs
            if alpha <= 0.5:
                return 1.0
            return 1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9 else 0.01
        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")


class BaselineDefense(Defense):
    """A defense from another paper: its own defaults (:meth:`Defense.paper_schedule`) and LR
    schedule kind; the clean split and report are :class:`Defense`'s."""

    config_class = BaselineConfig

    def copy_model(self, model: nn.Module) -> nn.Module:
        """The working copy: :func:`copy_of` (eval mode, every parameter trainable)."""
        return copy_of(model)

    def scheduler(self, epochs: int | None = None, kind: str | None = None) -> Callable[[torch.optim.Optimizer], Any]:
        cfg: BaselineConfig = self.config
        return make_scheduler(kind or cfg.schedule, epochs or cfg.epochs, cfg.milestones, cfg.gamma)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, data: Dataset, batch_size: int = 128, task: Task | None = None) -> bool:
    """Re-estimate every batch-norm layer's running statistics on ``data`` (exact averages over
    the set, no augmentation; the model run as ``task.forward``, default ``model(x)``). Returns
    False (and changes nothing) when there is no BN layer."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    was_training = model.training
    model.eval()  # only the BN layers collect statistics; dropout etc. stay off
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
        m.train()
    device = model_device(model)
    try:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            task.forward(model, x.to(device), y.to(device)) if task is not None else model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return True


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str | None]:
    """``{conv name: name of the BN that directly consumes its output, or None}`` for every Conv2d.

    Found from one forward pass on ``example``: a conv and a BN are paired if and only if the
    tensor the conv returned is the very tensor the BN received (no assumption that every conv
    has a BN, nor that the next BN in module order belongs to the previous conv).
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str | None] = {}
    handles = []

    def conv_hook(name: str):
        def hook(_m, _inp, out):
            pairs.setdefault(name, None)
            outputs[id(out)] = (name, out)  # keep the tensor alive so its id is not reused
        return hook

    def bn_hook(name: str):
        def hook(_m, inp):
            hit = outputs.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0] and pairs.get(hit[0]) is None:
                pairs[hit[0]] = name
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, m in model.named_modules():  # convs the pass did not reach
        if isinstance(m, nn.Conv2d):
            pairs.setdefault(name, None)
    return pairs


def example_input(model: nn.Module, clean_data: Dataset | DataLoader | None = None,
                  input_size: int | None = None) -> torch.Tensor:
    """One input for a shape-probing forward pass: a clean image when given, else zeros shaped
    from the first conv's input channels and ``input_size`` (or ``model.input_size``, or 32)."""
    if clean_data is not None:
        x, _ = as_dataset(clean_data)[0]
        return torch.as_tensor(x)[None].float()
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    side = input_size or int(getattr(model, "input_size", 0) or 32)
    return torch.zeros(1, channels, side, side)


def copy_of(model: nn.Module) -> nn.Module:
    """A detached deep copy in eval mode with every parameter trainable."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.eval()
