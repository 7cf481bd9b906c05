"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022, "Data-Free Backdoor
Removal Based on Channel Lipschitzness").

Data-free: each conv channel's upper bound of its Lipschitz constant (UCLC) is the largest
singular value of its filter (reshaped to in_channels x kernel positions), times
|gamma| / sqrt(running_var + eps) of the batch norm that directly consumes the conv's output,
if and only if one does. Channels whose UCLC exceeds mean + u * std of their layer are
trigger-sensitive outliers and are pruned.

Pruning zeroes the BN channel's weight and bias when the conv feeds a BN (as the paper's
code), else the conv filter (and bias): either way the channel outputs 0 and the result is a
plain model of the same class. The conv -> BN pairing comes from one forward pass on a zero
image (see :func:`~fipurify.defenses.baseline_common.conv_bn_pairs`), so convs without a BN
and BNs after non-conv layers are handled correctly. Default u = 3 (the paper).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..tasks import Task
from ..validation import as_dataset
from .base import DEFENSES, EpochCallback
from .baseline_common import BaselineConfig, BaselineDefense, conv_bn_pairs, copy_of, example_input
from .pruning import channel_tensors, zero_channels


@dataclass
class CLPConfig(BaselineConfig):
    """CLP settings: ``u`` the outlier threshold in standard deviations; ``include_unpaired``
    also scores convs that no BN follows (by their filters alone); ``input_size`` the side of
    the zero image used to find conv -> BN pairs (None: ``model.input_size``, else 32).
    The optimisation fields inherited from DefenseConfig are unused: CLP does not train."""
    u: float = 3.0
    include_unpaired: bool = True
    input_size: int | None = None

    def validate(self) -> "CLPConfig":
        super().validate()
        if not self.u >= 0:
            raise ConfigError(f"u must be >= 0, got {self.u}")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"input_size must be a positive integer or None, got {self.input_size}")
        return self


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm | None = None) -> torch.Tensor:
    """UCLC of every output channel of ``conv`` (scaled by ``bn`` when it directly follows)."""
    w = conv.weight.detach().double()
    sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    if bn is not None:
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
        var = bn.running_var.detach().double() if bn.running_var is not None else torch.ones_like(sigma)
        sigma = sigma * gamma.abs() / torch.sqrt(var + bn.eps)
    return sigma.float()


def outliers(scores: torch.Tensor, u: float) -> list[int]:
    """Indices with score > mean + u * std (unbiased std; none for a single channel)."""
    if scores.numel() < 2:
        return []
    limit = scores.mean() + u * scores.std()
    return torch.nonzero(scores > limit).flatten().tolist()


class CLP(BaselineDefense):
    """Channel Lipschitzness-based Pruning: prune channels with outlying Lipschitz bounds, no data."""

    name = "clp"
    config_class = CLPConfig
    tasks = ("image-classification",)
    task_reason = "it scores Conv2d channels and finds conv -> BN pairs with a zero C x H x W image"

    def purify(self, model: nn.Module, clean_data: Dataset | DataLoader | None = None, *,
               task: Task | str | None = None, progress: bool = True,
               callback: EpochCallback | None = None) -> nn.Module:
        """``clean_data`` is accepted for the common interface and ignored (CLP is data-free) but for
        its task (``task=``, else ``task_of(clean_data)``: image classification without data)."""
        self.use_task(task if task is not None else as_dataset(clean_data) if clean_data is not None else None)
        cfg: CLPConfig = self.config
        t_start = time.perf_counter()
        model = copy_of(model)
        mods = dict(model.named_modules())
        pairs = conv_bn_pairs(model, example_input(model, None, cfg.input_size))
        t_setup = time.perf_counter() - t_start
        pruned: dict[str, list[int]] = {}
        scored: dict[str, Any] = {}
        for conv_name, bn_name in pairs.items():
            if bn_name is None and not cfg.include_unpaired:
                continue
            bn = mods[bn_name] if bn_name is not None else None
            scores = channel_lipschitz(mods[conv_name], bn)
            idx = outliers(scores, cfg.u)
            scored[conv_name] = {"bn": bn_name, "max_uclc": float(scores.max()), "mean_uclc": float(scores.mean())}
            if not idx:
                continue
            if bn is not None:  # zero the BN channel: its output is then exactly 0
                zero_channels(channel_tensors(model, bn_name), idx)
                pruned[bn_name] = idx
            else:
                zero_channels(channel_tensors(model, conv_name), idx)
                pruned[conv_name] = idx
        self.make_report(None, None, 0, {"total": time.perf_counter() - t_start, "setup": t_setup, "train": 0.0},
                         [], pruned_channels=pruned, n_pruned=sum(len(v) for v in pruned.values()),
                         layers_scored=scored)
        return model.eval()


DEFENSES.register("clp", CLP, **CLP.paper_schedule())
