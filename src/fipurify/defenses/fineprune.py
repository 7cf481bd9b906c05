"""FP, Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks").

Channels of the last convolutional feature layer are pruned in increasing order of their mean
activation on clean data (backdoor neurons tend to be dormant on clean inputs) until clean
accuracy drops by more than a threshold; the pruned network is then fine-tuned on the clean set.

The stopping rule only uses clean data: accuracy on the hold-out split of the clean set (on
the training part when there is no hold-out). Pruned channels are zeroed in the weights and
kept at zero through fine-tuning, so the result is a plain model of the same class.
Defaults: 4% accuracy-drop threshold (the FP paper); fine-tuning as BackdoorBench runs FP
(100 epochs, lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..tasks import Task
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense, conv_bn_pairs, example_input, model_device
from .loop import finetune
from .pruning import channel_tensors, zero_channels


@dataclass
class FinePruningConfig(BaselineConfig):
    """Fine-Pruning settings. ``layer``: module name of the pruned layer ("" = the last batch-norm
    layer of the model, or its last conv when it has no BN; a conv that feeds a BN is pruned
    together with that BN). ``acc_drop``: the largest allowed drop of clean hold-out accuracy
    (absolute, 0.04 = 4 points). ``prune_ratio``: prune this share of the layer's channels
    instead of using the accuracy rule."""
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    schedule: str = "cosine"
    layer: str = ""
    acc_drop: float = 0.04
    prune_ratio: float | None = None

    def validate(self) -> "FinePruningConfig":
        super().validate()
        if not 0 <= self.acc_drop <= 1:
            raise ConfigError(f"acc_drop must lie in [0, 1], got {self.acc_drop}")
        if self.prune_ratio is not None and not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"prune_ratio must lie in [0, 1) or be None, got {self.prune_ratio}")
        return self


def default_layer(model: nn.Module) -> str:
    """The last batch-norm layer in module order, else the last conv layer."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError("fine-pruning needs a conv or batch-norm layer; pass layer=<module name>")
    return convs[-1]


@torch.no_grad()
def mean_channel_activation(model: nn.Module, module: nn.Module, data: Dataset, batch_size: int = 256,
                            task: Task | None = None) -> torch.Tensor:
    """Mean of ``module``'s output per channel (dimension 1) over ``data``, model in eval mode
    (run as ``task.forward``, default ``model(x)``)."""
    sums: list[torch.Tensor] = []
    count = [0]

    def hook(_m, _inp, out):
        dims = [d for d in range(out.dim()) if d != 1]
        sums.append(out.double().sum(dim=dims))
        count[0] += out.numel() // out.shape[1]

    h = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            dev = model_device(model)
            task.forward(model, x.to(dev), y.to(dev)) if task is not None else model(x.to(dev))
    finally:
        h.remove()
        model.train(was_training)
    return (torch.stack(sums).sum(0) / count[0]).float().cpu()


class FinePruning(BaselineDefense):
    """Fine-Pruning: prune clean-dormant channels of the last feature layer, then fine-tune."""

    name = "fp"
    config_class = FinePruningConfig

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: FinePruningConfig = self.config
        layer = cfg.layer or default_layer(model)
        mods = dict(model.named_modules())
        if layer not in mods:
            raise ConfigError(f"the model has no layer named {layer!r}")
        bn_after = None
        if isinstance(mods[layer], nn.Conv2d):
            bn_after = conv_bn_pairs(model, example_input(model, train_set)).get(layer)
        tensors = channel_tensors(model, layer, bn_after)
        out_module = mods[bn_after or layer]  # the module whose output the pruned channels zero

        t0 = time.perf_counter()
        act = mean_channel_activation(model, out_module, train_set, task=self.task)
        order = torch.argsort(act).tolist()  # least active on clean data first
        check_set = holdout if holdout is not None else train_set
        pruned, base_acc, pruned_acc = self._search(model, out_module, order, check_set)
        zero_channels(tensors, pruned)
        prune_s = time.perf_counter() - t0

        def keep_pruned(_lr: float) -> None:  # the mask: pruned channels stay exactly zero
            zero_channels(tensors, pruned)

        params = list(model.parameters())
        history = finetune(model, params, train_set, cfg, holdout=holdout, post_step=keep_pruned,
                           scheduler=self.scheduler(), progress=progress, callback=callback, desc=self.name,
                           task=self.task)
        return Step(model.eval(), history, sum(p.numel() for p in params), {"setup": prune_s, "prune": prune_s},
                    {"layer": layer, "bn_after": bn_after, "n_channels": len(order), "pruned_channels": sorted(pruned),
                     "n_pruned": len(pruned), "prune_check_set": "holdout" if holdout is not None else "train",
                     "acc_before_prune": base_acc, "acc_after_prune": pruned_acc})

    def _search(self, model: nn.Module, module: nn.Module, order: list[int], data: Dataset
                ) -> tuple[list[int], float, float]:
        """Prune along ``order`` while clean accuracy (the task's metric) stays within ``acc_drop``
        of the start (or take the ``prune_ratio`` first channels); never prunes every channel."""
        cfg: FinePruningConfig = self.config
        score = self.task.score
        mask = torch.ones(len(order), device=model_device(model))

        def apply_mask(_m, _inp, out):
            shape = [1, -1] + [1] * (out.dim() - 2)
            return out * mask.view(shape)

        h = module.register_forward_hook(apply_mask)
        try:
            base_acc = score(model, data)
            if cfg.prune_ratio is not None:
                pruned = order[:int(round(cfg.prune_ratio * len(order)))]
                mask[pruned] = 0.0
                return pruned, base_acc, score(model, data)
            pruned, acc = [], base_acc
            for c in order[:-1]:
                mask[c] = 0.0
                new_acc = score(model, data)
                if new_acc < base_acc - cfg.acc_drop:
                    mask[c] = 1.0
                    break
                pruned.append(c)
                acc = new_acc
            return pruned, base_acc, acc
        finally:
            h.remove()


DEFENSES.register("fp", FinePruning, **FinePruning.paper_schedule())
